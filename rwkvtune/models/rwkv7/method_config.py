"""Options of the training methods that have their own (TRL's DPOConfig / GRPOConfig): one
dataclass per method, its defaults, its bounds and its rules, each in this file and nowhere else.

:class:`~rwkvtune.models.rwkv7.config.TrainConfig` holds one of each (``cfg.dpo``, ``cfg.grpo``);
a recipe sets them as a section (``dpo: {beta: 0.1}``) or with today's flat keys (``beta: 0.1``,
``num_generations: 8``). ``beta`` and ``loss_type`` exist in both sections with different
meanings and defaults: a flat one belongs to the run's method (see TrainConfig.update).

The loss functions (:func:`rwkvtune.train.methods.dpo.dpo_loss`,
:func:`rwkvtune.train.policy_loss.grpo_loss`) check their arguments with the same rules
(:meth:`DPOConfig.problems`, :meth:`GRPOConfig.problems`), so a value the config accepts is never
refused by the maths, nor the other way round.

Plain data: imports nothing above the models layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from rwkvtune.bounds import Bound, bound_problems

DPO_LOSS_TYPES = ("sigmoid", "ipo", "simpo")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclasses.dataclass
class DPOConfig:
    """``--method dpo`` (TRL's DPOConfig names and defaults)."""

    beta: float = 0.1  # strength of the reference: how far the policy may move from it (> 0; SimPO's paper uses 2.0)
    loss_type: str = "sigmoid"  # sigmoid (DPO), ipo, simpo (reference-free, length-normalised)
    label_smoothing: float = 0.0  # sigmoid: conservative DPO (assumed probability of a flipped label)
    simpo_gamma: float = 0.5  # simpo: the target reward margin
    precompute_ref: bool = False  # reference log-probs computed once before training, cached in the run

    # Accepted values of each numeric option (rwkvtune/bounds.py): finite, of its type, in range.
    BOUNDS: ClassVar[dict[str, Bound]] = {
        "beta": Bound(float, 0, 1e4),
        "label_smoothing": Bound(float, 0, 0.5, hi_open=True, note="the probability that a preference label is wrong"),
        "simpo_gamma": Bound(float, 0, 1e4),
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"loss_type": DPO_LOSS_TYPES}

    def problems(self, active: bool = True) -> list[str]:
        """Every problem of these options, each "field: found X, expected Y". ``active``: the run's
        method is dpo (a run of another method checks only that each value is one dpo accepts)."""
        out = _checked(self)
        if out:
            return out  # the rules below compare numbers that are in their bounds
        if not self.beta > 0:
            out.append(f"beta: found {self.beta!r}, expected > 0 for method dpo (the strength of the preference; "
                       f"TRL's default is 0.1)")
        if self.loss_type == "ipo" and self.label_smoothing:
            out.append(f"label_smoothing: found {self.label_smoothing!r}, but loss_type 'ipo' has no label "
                       f"smoothing (TRL ignores it); set label_smoothing 0 or use loss_type 'sigmoid'")
        return out


@dataclasses.dataclass
class GRPOConfig:
    """``--method grpo`` (TRL's GRPOConfig names and defaults, but loss_type dapo as TRL's current one)."""

    beta: float = 0.0  # KL weight against the reference (0: no reference pass)
    loss_type: str = "dapo"  # grpo (per-sequence mean), dapo (per-token over the batch), dr_grpo (per max length)
    reward: tuple[str, ...] = ()  # reward functions (repeatable --reward SPEC; see rwkvtune/train/rewards.py)
    reward_weights: tuple[float, ...] = ()  # one weight per reward (default: all 1)
    reward_timeout: float = 60.0  # seconds per reward call (and reward file import); past it the run stops
    num_generations: int = 8  # completions sampled per prompt (the group)
    max_completion_length: int = 128  # most tokens per completion
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling of the rollouts
    stop: tuple[str, ...] = ()  # a completion ends at any of these strings (kept in its tokens, cut from its text)
    epsilon: float = 0.2  # clipping of the probability ratio (lower side)
    epsilon_high: float | None = None  # upper side (DAPO's clip-higher; default: epsilon)
    num_iterations: int = 1  # optimizer steps per batch of rollouts (old log-probs stored)
    scale_rewards: str = "group"  # advantages divided by the group's std, the batch's, or none

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "beta": Bound(float, 0, 1e4, note="0 turns the KL term off"),
        "reward_weights": Bound(float, -1e6, 1e6, each=True),
        "reward_timeout": Bound(float, 0, 86400, lo_open=True,
                                note="seconds a reward function may take per call; at most a day"),
        "num_generations": Bound(int, 2, 2 ** 16, note="advantages compare a group"),
        "max_completion_length": Bound(int, 1, 2 ** 24),
        "temperature": Bound(float, 0, 1e4, lo_open=True, note="rollouts are sampled"),
        "top_p": Bound(float, 0, 1, lo_open=True),
        # The one epsilon rule: 0 would clip every update away, 1 would allow a ratio of 0.
        "epsilon": Bound(float, 0, 1, lo_open=True, hi_open=True),
        "epsilon_high": Bound(float, 0, 1e4, lo_open=True, optional=True),
        "num_iterations": Bound(int, 1, 10 ** 4),
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"loss_type": GRPO_LOSS_TYPES, "scale_rewards": SCALE_REWARDS}

    def problems(self, active: bool = True) -> list[str]:
        """Every problem of these options (see :meth:`DPOConfig.problems`)."""
        out = _checked(self)
        if active and not self.reward:
            out.append("reward: missing; method grpo needs at least one --reward SPEC (e.g. exact_match:answer)")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            out.append(f"reward_weights: found {len(self.reward_weights)} weight(s) for {len(self.reward)} "
                       f"reward(s), expected one per --reward")
        if not out and self.epsilon_high is not None and not self.epsilon_high >= self.epsilon:
            out.append(f"epsilon_high: found {self.epsilon_high}, expected >= epsilon ({self.epsilon})")
        return out

    @property
    def clip_high(self) -> float:
        """The upper clip: ``epsilon_high``, or ``epsilon`` when unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# The sections of TrainConfig: recipe key -> options class.
METHOD_SECTIONS: dict[str, type] = {"dpo": DPOConfig, "grpo": GRPOConfig}


def _checked(options: Any) -> list[str]:
    """The bound and choice problems of ``options`` (a DPOConfig or GRPOConfig)."""
    out = bound_problems(options, options.BOUNDS)
    for name, allowed in options.CHOICES.items():
        value = getattr(options, name)
        if value not in allowed:
            out.append(f"{name}: found {value!r}, expected one of {', '.join(allowed)}")
    return out


def section_fields(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHOD_SECTIONS[section])]


def flat_keys() -> dict[str, tuple[str, ...]]:
    """Each flat recipe key of a method option -> the sections that have it: one section (e.g.
    num_generations -> ("grpo",)), or several for the ambiguous ones (beta, loss_type), which
    belong to the run's method."""
    out: dict[str, tuple[str, ...]] = {}
    for section in METHOD_SECTIONS:
        for name in section_fields(section):
            out[name] = out.get(name, ()) + (section,)
    return out
