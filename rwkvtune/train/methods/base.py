"""What a training method is: the batch, the loss and the metrics; the trainer does the rest.

A method (``--method``; the language-model objective ``sft`` is the default) plugs into the one
training loop of :mod:`rwkvtune.train.trainer`, which owns the optimizer, schedule, gradient
accumulation, DDP, resume, logging and outputs. A method says

* what its data is (:meth:`TrainingMethod.build_datasets`) and what a batch is (:meth:`collate`),
* how many loss units a batch holds (:meth:`count`): the denominator of the step's loss over
  every micro-batch of every process, so accumulation and DDP equal one big batch,
* how one micro-batch's loss is computed and back-propagated (:meth:`forward_backward`), returning
  sums that the trainer adds up over micro-batches and processes,
* what to log from those sums (:meth:`step_metrics`) and how to evaluate (:meth:`evaluate`),
* what it must keep in a resumable checkpoint (:meth:`state_dict`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, NamedTuple

import torch.nn as nn

from rwkvtune.train.memory_check import run_tokens
from rwkvtune.train.runtime import gradient_sync


class BatchCount(NamedTuple):
    """What :meth:`TrainingMethod.count` says of a batch."""

    units: float  # loss units: the denominator of the step's loss (tokens, pairs or completions)
    tokens: float  # tokens the model processes for it (throughput)


def no_tick(what: str, done: int, of: int) -> None:
    """A StepContext's ``tick`` when nothing shows progress (tests, other processes)."""


@dataclasses.dataclass
class StepContext:
    """What a method needs to run one micro-batch."""

    cfg: Any                                   # the resolved TrainConfig
    device: str
    autocast: Callable[[], ContextManager]     # the run's mixed-precision context
    scale: float = 1.0                         # multiply a summed loss by this before backward
    runner: nn.Module | None = None            # the module to call: DDP-wrapped under torchrun
    sync: bool = True                          # whether this micro-batch's backward syncs gradients
    mode: Any = None                           # the run's Mode (for reference passes)
    step: int = 0                              # the optimizer step being computed (1-based)
    # Progress inside a step or an eval for the progress line: tick("eval batch", 3, 9).
    tick: Callable[[str, int, int], None] = no_tick

    def sync_context(self, sync_now: bool) -> ContextManager:
        """Under DDP or FSDP, skip the gradient reduction of a backward that is not the step's last."""
        if self.runner is None:
            return contextlib.nullcontext()
        return gradient_sync(self.runner, sync_now)


class TrainingMethod:
    """Base class; see the module docstring. Subclasses set ``name`` and override the hooks."""

    name = ""
    item_name = "windows"  # what one dataset item is, for people ("pairs", "prompts")
    token_units = True  # whether a loss unit is a token (then the logged token count is the units)

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def opts(self):
        """This method's own options (``cfg.dpo``, ``cfg.grpo``; rwkvtune.models.rwkv7.method_config),
        or None (sft has none)."""
        return self.cfg.method_options()

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per batch of data (GRPO: num_iterations updates per batch of rollouts)."""
        return 1

    @classmethod
    def problems(cls, cfg) -> list[str]:
        """This method's problems with the rest of the run (mode, strategy), each "field: found X,
        expected Y"; its own options' rules are their class's (DPOConfig.problems, ...)."""
        return []

    def memory_shape(self, dataset) -> tuple[int, int]:
        """For the memory estimate: (sequences per dataset item that run through the model in one
        graph, the most tokens such a sequence holds). SFT: one window, at most ctx_len (less when
        the data's longest window is shorter)."""
        return 1, run_tokens(dataset, self.cfg)

    def keeps_reference_copy(self, mode) -> bool:
        """Whether the run keeps a frozen copy of the whole model as its reference (full mode
        only; lora and state switch their trained parts off instead)."""
        return False

    def setup(self, run) -> None:
        """Called once the run is built, before the first step (and on resume): e.g. to prepare a
        reference model. ``run`` is the trainer's :class:`~rwkvtune.train.trainer.Run`."""

    def close(self) -> None:
        """Release what the method started (GRPO: its reward worker process); called once when
        train() returns, also on errors."""

    def build_datasets(self, tokenizer, vocab_size: int):
        """(training set, evaluation set or None): indexable datasets of items for :meth:`collate`."""
        raise NotImplementedError

    def splits(self, read):
        """(training set, evaluation set or None): ``read(path)`` of the data and the eval data."""
        return read(self.cfg.data), (read(self.cfg.eval_data) if self.cfg.eval_data else None)

    def collate(self, items: list, device) -> dict:
        raise NotImplementedError

    def count(self, batch: dict) -> BatchCount:
        """The batch's loss units and the tokens the model processes for it."""
        raise NotImplementedError

    def begin_step(self, module, micro_batches: list[dict], ctx: StepContext) -> list[dict]:
        """Called once per optimizer step before its micro-batches run (e.g. to sample rollouts);
        ``micro_batches`` is empty on the steps that reuse the data of an earlier one
        (:attr:`steps_per_batch` > 1). Returns the micro-batches to run."""
        return micro_batches

    def forward_backward(self, module, batch: dict, ctx: StepContext) -> dict[str, float]:
        """Forward and backward of one micro-batch; returns sums, ``"loss"`` among them (the summed
        loss whose gradient was taken, scaled by ``ctx.scale``)."""
        raise NotImplementedError

    def step_metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        """Logged values from sums over a step (or several): by default every sum per loss unit."""
        return {k: v / units for k, v in sums.items()}

    def evaluate(self, module, dataset, ctx: StepContext) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
