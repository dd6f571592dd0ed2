"""Sampling maths for one row of logits (``sample_logits``, used by streaming).

RWKV's usual pipeline: penalties on the logits, then top-p on the softmax probabilities (the
most likely tokens whose cumulative probability first reaches ``top_p``; ties with the cut-off
are kept), top-k, and ``p ** (1 / temperature)`` over what is kept, renormalised. Temperature 0
(or top-k 1) is the argmax.
"""

from __future__ import annotations

import torch

from rwkvtune.generate.config import DEFAULTS, GenerationError, check_option


def _check_sampling(temperature, top_p, top_k) -> tuple[float, float, int]:
    return (check_option("temperature", temperature), check_option("top_p", top_p),
            check_option("top_k", top_k))


# --------------------------------------------------------------------------------- one row
def sampling_probs(logits: torch.Tensor, temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
                   top_k: int = DEFAULTS.top_k) -> torch.Tensor:
    """The distribution :func:`sample_logits` draws from (fp32, sums to 1). ``temperature > 0``.

    top-p keeps the most likely tokens whose cumulative probability first reaches ``top_p``
    (at least one token; ties with the cut-off probability are kept), top-k keeps the ``top_k``
    most likely; then p ** (1 / temperature), renormalised.
    """
    temperature, top_p, top_k = _check_sampling(temperature, top_p, top_k)
    if temperature == 0:
        raise GenerationError("temperature: 0 is greedy (argmax), which has no distribution; pass a temperature > 0 "
                              "to sampling_probs")
    probs = torch.softmax(logits.detach().float().reshape(-1), dim=-1)
    if top_p < 1:
        sorted_p = torch.sort(probs, descending=True).values
        cum = torch.cumsum(sorted_p, dim=0)
        cut_index = min(int(torch.searchsorted(cum, torch.tensor([float(top_p)])).item()), probs.numel() - 1)
        probs = torch.where(probs < sorted_p[cut_index], torch.zeros_like(probs), probs)
    if 0 < top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:  # extreme temperature underflow: fall back to greedy
        probs = torch.zeros_like(probs)
        probs[int(torch.argmax(logits.reshape(-1)))] = 1.0
        return probs
    return probs / total


def sample_logits(logits: torch.Tensor, temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p,
                  top_k: int = DEFAULTS.top_k, generator: torch.Generator | None = None) -> int:
    """Draw one token id from ``logits`` [V]. ``temperature == 0`` returns the argmax."""
    temperature, top_p, top_k = _check_sampling(temperature, top_p, top_k)
    logits = logits.detach().float().reshape(-1).cpu()
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, temperature, top_p, top_k)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence_penalty: float = DEFAULTS.presence_penalty,
                    frequency_penalty: float = DEFAULTS.frequency_penalty) -> torch.Tensor:
    """logits - (presence * [count > 0] + frequency * count), per token (RWKV's usual penalty).

    ``counts`` [V] (or [B, V] with ``logits`` [B, V]) holds the (decayed) number of times each
    token was generated so far.
    """
    if presence_penalty == 0 and frequency_penalty == 0:
        return logits
    seen = (counts > 0).to(logits.dtype)
    return logits - (presence_penalty * seen + frequency_penalty * counts.to(logits.dtype))


def update_counts(counts: torch.Tensor, token: int, penalty_decay: float = DEFAULTS.penalty_decay,
                  count_token: bool = True) -> torch.Tensor:
    """Decay every count by ``penalty_decay``, then add 1 for ``token`` (in place; returns counts)."""
    counts.mul_(penalty_decay)
    if count_token:
        counts[token] += 1.0
    return counts
