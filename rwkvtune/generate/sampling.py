"""Sampling maths: one row (``sample_logits``, used by streaming) and many rows at once
(``sample_rows``, used by batched generation).

Both draw from the same distribution, RWKV's usual pipeline: penalties on the logits, then top-p
on the softmax probabilities (the most likely tokens whose cumulative probability first reaches
``top_p``; ties with the cut-off are kept), top-k, and ``p ** (1 / temperature)`` over what is
kept, renormalised. Temperature 0 (or top-k 1) is the argmax.

The batched sampler never sorts the vocabulary (a sort of [32, 65536] took ~70 ms on 2 cores,
``torch.multinomial`` ~30 ms, about as much as the model's decode step itself). Instead:
* top-k: ``torch.topk`` gives each row's k-th probability, a threshold (cheap for moderate k);
* temperature: the tempered distribution is ``exp((logit - max) / T)``, which cannot underflow to
  all zeros (the max gets 1), so very small temperatures become greedy by themselves;
* sampling: inverse CDF, one uniform number per row (cumsum + searchsorted);
* top-p by rejection: draw from the tempered top-k distribution, accept the token if it is in
  the top-p set. Membership needs no sort: token x (probability p_x) is kept exactly when the
  probability mass strictly above p_x is below ``top_p``, or is 0 (x is a most likely token). A rejected
  row draws again; what is accepted is distributed exactly as the target (rejection sampling).
  The acceptance rate is the tempered mass of the kept set, >= top_p at temperature <= 1; rows
  still unresolved after a few rounds (very high temperature with a small top_p) take the exact
  sorted path.
"""

from __future__ import annotations

import torch

from rwkvtune.generate.config import DEFAULTS, GenerationError, SamplingConfig, check_option

# Random numbers per row and token: 8 rejection rounds for top-p, then the exact sorted fallback.
UNIFORMS_PER_ROW = 9


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


# ------------------------------------------------------------------------------ many rows
def _top_p_kept(probs: torch.Tensor, x: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B] bool: is token x[b] in row b's top-p set? (see the module docstring; no sort). The
    mass strictly above p_x is exactly 0 for a most likely token, which is always kept."""
    px = probs.gather(1, x[:, None])
    mass = torch.where(probs > px, probs, 0.0).sum(-1)
    return (mass < top_p) | (mass == 0)


def _top_p_mask_sorted(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, V] bool top-p sets by sorting: the reference semantics of :func:`sampling_probs`."""
    sorted_p = torch.sort(probs, dim=-1, descending=True).values
    cum = sorted_p.cumsum(-1)
    target = torch.full((probs.shape[0], 1), float(top_p), dtype=cum.dtype, device=cum.device)
    cut = torch.searchsorted(cum, target).clamp_max(probs.shape[-1] - 1)
    return probs >= sorted_p.gather(1, cut)


def _inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token per row with P(x) proportional to the increments of ``cdf`` [B, V]; u [B] in [0, 1)."""
    x = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].to(cdf.dtype), right=True)[:, 0]
    return x.clamp_max(cdf.shape[-1] - 1)  # u * total rounding up to total


def sample_rows(logits: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor | None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (fp32, penalties already applied) -> LongTensor [B].

    ``u`` [B, UNIFORMS_PER_ROW]: uniform numbers in [0, 1) for each row (column k for rejection
    round k, the last one for the sorted fallback); unused (may be None) when greedy. A fixed
    number per row and token keeps each row's random stream independent of the other rows.
    Each [B, V] pass costs about 1 ms at B = 32 on CPU, so they are few: softmax, cumsum, and 3
    per top-p rejection round.
    """
    B, V = logits.shape
    if cfg.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits, -1)  # top-p and top-k act on these, as in sampling_probs
    if cfg.temperature == 1:
        q = probs
    else:  # p ** (1 / T) up to a factor: exp((logit - max) / T), max entry 1, so never all zero
        q = (logits - logits.amax(-1, keepdim=True)).div_(cfg.temperature).exp_()
    if 0 < cfg.top_k < V:
        kth = torch.topk(probs, cfg.top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        q = torch.where(probs >= kth, q, 0.0)
    cdf = q.cumsum(-1)
    out = _inverse_cdf(cdf, u[:, 0])
    if cfg.top_p >= 1:
        return out
    pending = (~_top_p_kept(probs, out, cfg.top_p)).nonzero()[:, 0]
    for k in range(1, UNIFORMS_PER_ROW - 1):  # later rounds: only the rejected rows
        if not len(pending):
            return out
        x = _inverse_cdf(cdf[pending], u[pending, k])
        ok = _top_p_kept(probs[pending], x, cfg.top_p)
        out[pending[ok]] = x[ok]
        pending = pending[~ok]
    if len(pending):  # rare: the kept set holds little of the tempered mass. Exact, sorting these rows.
        keep = _top_p_mask_sorted(probs[pending], cfg.top_p)
        out[pending] = _inverse_cdf(torch.where(keep, q[pending], 0.0).cumsum(-1), u[pending, -1])
    return out


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[b, tokens[b]] for each row: the model's own probability (temperature
    1, no penalties, no truncation) of the sampled token, as GRPO's old log-probs need."""
    return logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, -1)
