"""Preference-optimisation maths (DPO, IPO, SimPO): pure functions on per-sequence log-probabilities.

Reference: TRL v1.9.0, ``trl/trainer/dpo_trainer.py`` (``sigmoid``, ``ipo``, the logged metrics)
and ``trl/experimental/cpo/cpo_trainer.py`` (``simpo``); ``sigmoid`` with label smoothing is the
conservative DPO of TRL <= 0.28 (see :func:`dpo_loss`). Notation, per preference pair:

* ``pi_c``, ``pi_r``: the policy's summed log-probabilities of the chosen / rejected completion;
* ``ref_c``, ``ref_r``: the same under the frozen reference model;
* ``n_c``, ``n_r``: the number of scored completion tokens.

Log-probabilities are summed over completion tokens only (labels -100 elsewhere), in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rwkvtune.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


class PreferenceLoss(NamedTuple):
    """Per-pair results [P] of :func:`dpo_loss`.

    ``losses`` keeps its graph; ``chosen_rewards``/``rejected_rewards`` (detached) are the implicit
    rewards TRL logs; ``chosen_logps``/``rejected_logps`` (detached) are the policy log-probs TRL
    logs as ``logps/*``: summed for sigmoid and ipo (DPOTrainer), per-token means for simpo
    (CPOTrainer computes and logs length-normalised log-probs for it).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probabilities of ``labels`` under ``logits``, and token counts.

    ``logits`` [B, T, V] (any float dtype, computed in fp32), ``labels`` [B, T]: already the next
    tokens (this project's datasets shift them), position t scored against ``labels[t]``; -100
    marks positions that are not scored (the prompt, padding). Returns ``(sum_logps [B] fp32,
    n_tokens [B] int64)``. log p = logit[label] - logsumexp(logits), which never builds the full
    [B, T, V] log-softmax (only the fp32 upcast of bf16 logits, as the cross-entropy does).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ConfigError(f"sequence_logps: expected logits [B, T, V] and labels [B, T], found logits "
                          f"{list(logits.shape)} and labels {list(labels.shape)}; pass one batch's logits and labels")
    x = logits.float()
    scored = labels != -100
    picked = x.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]; -100 -> any token, masked below
    token_logps = (picked - torch.logsumexp(x, dim=-1)) * scored
    return token_logps.sum(-1), scored.sum(-1)


def _check_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"dpo loss_type: expected one of {', '.join(LOSS_TYPES)}, found {loss_type!r}; pick one")
    if not beta > 0:
        raise ConfigError(f"dpo beta: expected a number > 0, found {beta!r}; TRL's default is 0.1 (simpo: 2.0 "
                          f"in the SimPO paper)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo label_smoothing: expected 0 <= value < 0.5 (the probability that a preference "
                          f"label is wrong), found {label_smoothing!r}; use 0 to turn it off")
    if loss_type == "ipo" and label_smoothing > 0:
        raise ConfigError(f"dpo label_smoothing: loss_type 'ipo' has no label smoothing (TRL ignores it), found "
                          f"{label_smoothing!r}; set label_smoothing 0 or use loss_type 'sigmoid'")


def _need(name: str, loss_type: str, value):
    if value is None:
        raise ConfigError(f"dpo_loss: loss_type {loss_type!r} needs {name}, found None; pass it (sequence_logps "
                          f"gives log-probs and token counts)")
    return value


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z): the preference is right with
    probability 1 - eps (conservative DPO); eps = 0 is plain -log sigmoid(z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             chosen_n_tokens: torch.Tensor | None = None, rejected_n_tokens: torch.Tensor | None = None,
             simpo_gamma: float = 0.5) -> PreferenceLoss:
    """Per-pair preference losses and implicit rewards; all inputs [P] (summed log-probs, counts).

    * ``sigmoid`` (DPO): h = (pi_c - ref_c) - (pi_r - ref_r);
      loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = ``label_smoothing``.
      TRL <= 0.28 computed exactly this; TRL >= 0.29 dropped eps from ``sigmoid`` (it only feeds
      ``robust``/``exo_pair``/``aot`` there), so with eps = 0 this equals every TRL version.
      Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    * ``ipo``: as TRL, on per-token means of the log-ratios (TRL's length normalisation, which the
      IPO authors confirmed): h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r;
      loss = (h - 1 / (2 beta))^2 (beta is the paper's tau). Rewards as sigmoid (summed
      log-ratios, what TRL's DPOTrainer logs). Needs the token counts.
    * ``simpo`` (reference-free; TRL CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0``):
      h = pi_c / n_c - pi_r / n_r - gamma / beta; loss as sigmoid's with beta h (label smoothing
      included, as CPOTrainer). Rewards: beta pi_c / n_c, beta pi_r / n_r. The reference log-probs
      are not used (may be None). CPOTrainer's optional NLL term (``cpo_alpha``) is not here.

    Token counts below 1 count as 1 (a pair with an empty completion does not divide by zero).
    """
    _check_options(loss_type, beta, label_smoothing)
    pi_c, pi_r = policy_chosen_logps, policy_rejected_logps
    if loss_type == "simpo":
        n_c = _need("chosen_n_tokens", loss_type, chosen_n_tokens).to(pi_c.dtype).clamp(min=1.0)
        n_r = _need("rejected_n_tokens", loss_type, rejected_n_tokens).to(pi_r.dtype).clamp(min=1.0)
        avg_c, avg_r = pi_c / n_c, pi_r / n_r
        # gamma / beta inside, times beta outside: the margin gamma is in units of beta * logp
        losses = _smoothed_sigmoid_loss(beta * (avg_c - avg_r - simpo_gamma / beta), label_smoothing)
        return PreferenceLoss(losses, (beta * avg_c).detach(), (beta * avg_r).detach(), avg_c.detach(),
                              avg_r.detach())
    ratio_c = pi_c - _need("ref_chosen_logps", loss_type, ref_chosen_logps)
    ratio_r = pi_r - _need("ref_rejected_logps", loss_type, ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * (ratio_c - ratio_r), label_smoothing)
    else:  # ipo
        n_c = _need("chosen_n_tokens", loss_type, chosen_n_tokens).to(pi_c.dtype).clamp(min=1.0)
        n_r = _need("rejected_n_tokens", loss_type, rejected_n_tokens).to(pi_r.dtype).clamp(min=1.0)
        losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, (beta * ratio_c).detach(), (beta * ratio_r).detach(), pi_c.detach(),
                          pi_r.detach())


def preference_metrics(result: PreferenceLoss) -> dict[str, float]:
    """TRL's logged preference metrics, means over the pairs of ``result``:

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen - rejected),
    ``rewards/accuracies`` (fraction of pairs with chosen reward strictly above rejected: a tie
    counts as wrong, as TRL's ``>``), ``logps/chosen``, ``logps/rejected``. Under DDP, TRL
    gathers the per-pair values from every rank before the mean; average these over equal-sized
    ranks, or gather ``result`` first.
    """
    c, r = result.chosen_rewards.float(), result.rejected_rewards.float()
    return {
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margins": float((c - r).mean()),
        "rewards/accuracies": float((c > r).float().mean()),
        "logps/chosen": float(result.chosen_logps.float().mean()),
        "logps/rejected": float(result.rejected_logps.float().mean()),
    }
