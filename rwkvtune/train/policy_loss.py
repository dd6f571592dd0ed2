"""GRPO maths: group-relative advantages and the clipped policy loss, as pure functions (the
training method around them is :mod:`rwkvtune.train.methods.grpo`).

Reference: TRL v1.9.0, ``trl/trainer/grpo_trainer.py`` (``_generate_and_score_completions`` for
the advantages, ``_compute_loss`` for the loss and its logged metrics) and ``grpo_config.py``
(option names and defaults). Shapes: N completions = prompts x G generations, laid out group by
group (the G completions of a prompt are consecutive); per-token tensors are [B, T] over the
completion tokens, with ``mask`` 1 on the tokens that count (0 on padding).
"""

from __future__ import annotations

import torch

from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.method_config import GRPO_LOSS_TYPES, SCALE_REWARDS, GRPOConfig

# Added to the standard deviation before dividing (TRL's constant): a group whose completions all
# got the same reward has std 0 and advantage 0, not a division by zero.
STD_EPS = 1e-4
LOSS_TYPES = GRPO_LOSS_TYPES


def _scale_option(scale_rewards) -> str:
    # TRL accepts the booleans of its older API: True -> "group", False -> "none".
    value = {True: "group", False: "none"}[scale_rewards] if isinstance(scale_rewards, bool) else scale_rewards
    if value not in SCALE_REWARDS:
        raise ConfigError(f"grpo scale_rewards: expected one of {', '.join(SCALE_REWARDS)} (or true/false), found "
                          f"{scale_rewards!r}; 'group' is TRL's default, 'none' is Dr. GRPO's")
    return value


def _std(values: torch.Tensor, dim=None) -> torch.Tensor:
    """Unbiased standard deviation; 0 for a single value (TRL's convention)."""
    n = values.numel() if dim is None else values.shape[dim]
    if n < 2:
        return values.new_zeros(()) if dim is None else values.new_zeros(values.shape[:dim] + values.shape[dim + 1:])
    return values.std() if dim is None else values.std(dim)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards="group") -> torch.Tensor:
    """Advantages [N] of the rewards [N] of N = prompts x G completions (groups consecutive).

    A_i = r_i - mean(r over i's group), then divided by (std + 1e-4) where std is
    ``scale_rewards``: ``"group"`` (True): the standard deviation within i's group; ``"batch"``: the
    standard deviation over all N rewards (the mean is still the group's; PPO-Lite); ``"none"``
    (False): no division (Dr. GRPO). Standard deviations are unbiased (divide by n - 1), as TRL's;
    with a single value (G = 1, or N = 1 for batch) the std is taken as 0, as TRL does.
    """
    mode = _scale_option(scale_rewards)
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ConfigError(f"grpo num_generations: expected an integer >= 1, found {num_generations!r}; use the "
                          f"number of completions sampled per prompt")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ConfigError(f"group_advantages: expected rewards [N] with N a multiple of num_generations "
                          f"{num_generations}, found shape {list(rewards.shape)}; pass all G completions of each "
                          f"prompt, group by group")
    G = num_generations
    grouped = rewards.float().view(-1, G)
    advantages = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if mode == "none":
        return advantages
    if mode == "group":
        std = _std(grouped, 1).repeat_interleave(G)
    else:
        std = _std(rewards.float()).expand_as(advantages)
    return advantages / (std + STD_EPS)


def reward_metrics(rewards: torch.Tensor, num_generations: int, scale_rewards="group") -> dict[str, float]:
    """TRL's reward logs for one batch: ``reward`` (mean), ``reward_std`` (unbiased std over the
    batch) and ``frac_reward_zero_std``: the fraction of completions whose std (their group's for
    ``scale_rewards`` group/none, the batch's for batch, as TRL) is 0, i.e. that get a zero
    advantage and teach nothing."""
    mode = _scale_option(scale_rewards)
    r = rewards.float()
    if mode == "batch":
        std = _std(r).expand_as(r)
    else:
        std = _std(r.view(-1, num_generations), 1).repeat_interleave(num_generations)
    zero = torch.isclose(std, torch.zeros_like(std)).float()
    return {"reward": float(r.mean()), "reward_std": float(_std(r)), "frac_reward_zero_std": float(zero.mean())}


def token_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities [B, T] (fp32) of ``ids`` [B, T] under ``logits`` [B, T, V] / temperature.

    Position t of ``logits`` scores ``ids[t]`` (already the next tokens). TRL divides the logits by
    the sampling temperature before the log-softmax, so the ratio is taken under the distribution
    the completions were sampled from. log p = logit[id] - logsumexp(logits), without building the
    full [B, T, V] log-softmax.
    """
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ConfigError(f"token_logps: expected logits [B, T, V] and ids [B, T], found logits "
                          f"{list(logits.shape)} and ids {list(ids.shape)}; pass the completion positions only")
    x = logits.float() / temperature
    return x.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def _check_loss_options(loss_type, epsilon, epsilon_high, beta, max_completion_length, ref_logps):
    # The options' rules are GRPOConfig's (one set: the config's and this function's).
    problems = GRPOConfig(loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta).problems(
        active=False)
    if problems:
        raise ConfigError(f"grpo {problems[0]}; pass values that a grpo run's config accepts (TRL's defaults: "
                          f"epsilon 0.2, epsilon_high epsilon, beta 0)")
    if beta != 0 and ref_logps is None:
        raise ConfigError(f"grpo_loss: beta {beta} needs ref_logps (the reference model's token log-probs), found "
                          f"None; pass them or set beta 0")
    if loss_type == "dr_grpo" and not (isinstance(max_completion_length, int) and max_completion_length >= 1):
        raise ConfigError(f"grpo max_completion_length: loss_type 'dr_grpo' divides by batch size x "
                          f"max_completion_length, found {max_completion_length!r}; pass the generation limit")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def _clip_metrics(ratio, advantages, mask, epsilon, epsilon_high) -> dict[str, float]:
    """TRL's clip logs: the fraction of tokens where the clip removed the gradient. Low: ratio
    below 1 - epsilon with a negative advantage; high: above 1 + epsilon_high with a positive one
    (the other cases are not clipped by the min); region: either. ``low_min``/``high_max``: the
    smallest / largest per-sequence fraction (sequences with at least one token)."""
    low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
    n = mask.sum(-1)
    has = n > 0
    per_seq_low = (low * mask).sum(-1)[has] / n[has]
    per_seq_high = (high * mask).sum(-1)[has] / n[has]
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask),
        "clip_ratio/low_min": float(per_seq_low.min()) if per_seq_low.numel() else 0.0,
        "clip_ratio/high_max": float(per_seq_high.max()) if per_seq_high.numel() else 0.0,
    }


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
              beta: float = 0.0, loss_type: str = "dapo", max_completion_length: int | None = None,
              num_items_in_batch: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective; returns (loss, metrics).

    ``logps`` [B, T]: the policy's token log-probs (with graph); ``old_logps`` [B, T]: those of the
    policy that sampled the completions (None: ``logps`` detached, TRL's shortcut when each batch
    is used for one update, num_iterations = 1: the ratio is then exactly 1); ``ref_logps`` [B, T]:
    the reference model's (may be None when ``beta`` is 0); ``advantages`` [B]; ``mask`` [B, T].

    Per token: ratio = exp(logps - old_logps); clipped = clamp(ratio, 1 - epsilon, 1 +
    epsilon_high) (``epsilon_high`` None: = epsilon; DAPO's asymmetric clip uses e.g. 0.2/0.28);
    loss_t = -min(ratio A, clipped A) + beta KL_t, with the k3 estimator
    KL_t = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for KL(policy || ref)).
    Aggregation (``loss_type``):

    * ``grpo``: mean over each sequence's tokens, then mean over the B sequences;
    * ``dapo``: sum over all tokens / ``num_items_in_batch`` (default: this batch's token count;
      TRL passes the token count of the whole accumulated global batch divided by the number of
      processes, so accumulation and DDP equal one big batch);
    * ``dr_grpo``: sum over all tokens / (B x ``max_completion_length``).

    TRL further divides ``grpo`` and ``dr_grpo`` by the gradient-accumulation steps; that is the
    trainer's business, not this function's. Metrics (TRL's names): ``kl`` (token mean of KL_t,
    only when beta != 0) and ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``,
    ``/low_min``, ``/high_max`` (see :func:`_clip_metrics`).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    _check_loss_options(loss_type, epsilon, epsilon_high, beta, max_completion_length, ref_logps)
    if logps.dim() != 2 or mask.shape != logps.shape or advantages.shape != logps.shape[:1]:
        raise ConfigError(f"grpo_loss: expected logps and mask [B, T] and advantages [B], found logps "
                          f"{list(logps.shape)}, mask {list(mask.shape)}, advantages {list(advantages.shape)}; "
                          f"pass one batch's completion tensors")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    A = advantages.to(logps.dtype).unsqueeze(1)  # [B, 1]: one advantage for all of a sequence's tokens
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * A, clipped * A)
    metrics = {}
    if beta != 0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    B = logps.shape[0]
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        n = mask.sum().clamp(min=1.0) if num_items_in_batch is None else max(float(num_items_in_batch), 1.0)
        loss = (per_token * mask).sum() / n
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (B * max_completion_length)
    metrics.update(_clip_metrics(ratio.detach(), A, mask, epsilon, epsilon_high))
    return loss, metrics
