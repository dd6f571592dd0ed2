"""Training losses: next-token cross-entropy plus the reference trainer's L2Wrap (docs/rwkv7.md §5).

Two ways to get the same summed loss:

* :func:`loss_sum` scores logits the model has already produced ([B, T, V]);
* :func:`chunked_loss_sum` takes the hidden states that feed the head ([B, T, C], the output of
  ``ln_out``) and the head itself, and runs head + cross-entropy a slice of rows at a time, so the
  whole [B, T, V] fp32 logits never exist (1 GiB per sample at T=4096, V=65536; its log-softmax
  and gradient are as large again).

Both return a *sum* over the positions whose label is not -100: the trainer multiplies it by
``world_size / n_tok`` (the token count of the whole global batch), so gradient accumulation and
DDP give the update of one big batch. L2Wrap's ``factor`` is therefore the reference trainer's
per-token coefficient, 1e-4: the division by the number of loss positions reaches the penalty
through the upstream gradient of that scaled sum, exactly as it reaches the cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvtune.constants import IGNORE_INDEX
from rwkvtune.errors import ConfigError


# Rows (positions, summed over the batch) of logits alive at once in chunked_loss_sum. Measured with
# bench/bench_loss.py on the 0.1B head (C=768, V=65536), B=1, T=4096, fp32: what head + loss add to
# the peak RSS is 4.1 GB unchunked, 0.69 / 0.82 / 1.34 / 2.35 GB with 256 / 512 / 1024 / 2048 rows
# (repeatable to 1%): about 1 MiB per row (4 fp32 rows of V) plus 0.3-0.45 GB (the head weight's
# gradient, 192 MB, and temporaries). 1024 rows is a 1024 x 768 x 65536 matmul per slice, big
# enough to run at full GEMM efficiency, while going lower saves only ~0.5 GB more for twice the
# passes. Time on the shared 2-core machine was too noisy to rank sizes (unchunked 11-23 s, 1024
# rows 11-21 s wall, over four runs at load 2-4); the recomputation costs one head matmul more
# (4 instead of 3 per slice).
DEFAULT_CHUNK_TOKENS = 1024


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds ``grad_output * factor * max_logit`` to each scored
    position's largest logit.

    This is the gradient of ``factor / 2 * sum_t max_v(logits[t, v])**2`` (hence "L2"): the
    reference trainer's penalty that keeps logits from drifting upward. Scaling by ``grad_output``
    (the upstream gradient of the loss) makes the penalty follow whatever the caller does to the
    loss: for ``loss_sum(...) / (B*T)`` with factor 1e-4 it adds 1e-4/(B*T) * max logit, the
    reference trainer's value for its mean loss; multiplying the loss by k multiplies it by k.
    ``mask`` [B, T] (bool) marks the scored positions; the others get no penalty.
    """

    @staticmethod
    def forward(ctx, loss, logits, mask, factor: float):
        # Backward needs only each position's max and its index: keeping those ([..., 1]) instead
        # of the logits lets the [B, T, V] logits be freed after the cross-entropy's forward.
        maxx, ids = logits.detach().max(-1, keepdim=True)
        ctx.save_for_backward(maxx, ids, mask)
        ctx.factor, ctx.shape, ctx.dtype = factor, logits.shape, logits.dtype
        return loss.clone()  # a tensor of its own: an input returned as is would be a view of it

    @staticmethod
    def backward(ctx, grad_output):
        maxx, ids, mask = ctx.saved_tensors
        gy = None
        if ctx.needs_input_grad[1]:
            # fp32 product whatever the logits' dtype, cast once when written into the gradient
            g = grad_output.float() * ctx.factor * maxx.float() * mask.unsqueeze(-1)
            gy = torch.zeros(ctx.shape, dtype=ctx.dtype, device=maxx.device)
            gy.scatter_(-1, ids, g.to(ctx.dtype))
        return grad_output, gy, None, None


# Rows of low-precision logits upcast to fp32 at a time (16 x V fp32: 4 MiB at V = 65536, so the
# upcast and its log-softmax stay in cache instead of making an fp32 copy of all the logits).
# Measured on 1 busy core, 512 x 65536 bf16 logits: 40 ms in blocks of 16 rows, 80 ms of 64, 97 ms
# for one bf16 log_softmax over all rows, ~300 ms for the fp32 copy and its log_softmax.
BLOCK_ROWS = 16


def _upcast_blocks(z: torch.Tensor):
    """(start, rows, the fp32 copy of those rows) over z [n, V]: BLOCK_ROWS rows at a time on CPU
    through one reused buffer; on an accelerator all rows at once (its memory bandwidth makes the
    copy cheap, and a loop of small kernels would not be)."""
    n = z.shape[0]
    step = BLOCK_ROWS if z.device.type == "cpu" else max(n, 1)
    buf = torch.empty(min(step, n), z.shape[1], dtype=torch.float32, device=z.device)
    for s in range(0, n, step):
        zb = buf[:min(step, n - s)]
        zb.copy_(z[s:s + step])
        yield s, slice(s, s + step), zb


def _add_at(dz: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
    """dz[i, cols[i]] += values[i, 0] for every row i of a contiguous dz, summed in fp32, rounded
    once. Through flat indices: scatter_ on a bf16 tensor costs a pass over the whole tensor on CPU
    (187 ms for 512 x 65536), indexing only the n places."""
    flat = dz.view(-1)
    at = torch.arange(dz.shape[0], device=dz.device) * dz.shape[1] + cols
    flat[at] = (flat[at].float() + values[:, 0]).to(dz.dtype)


class LowPrecisionNLL(torch.autograd.Function):
    """Per-row cross-entropy [n] (fp32; 0 where the label is -100) of bf16/fp16 logits [n, V],
    with the L2Wrap gradient of ``factor`` folded into its backward.

    What a bf16 step needs from its loss: the fp32 value of upcasting the logits (fp32 log-softmax)
    without an fp32 [n, V] copy, its log-softmax and its gradient (4 B per logit, read and written
    several times: on CPU that memory traffic cost as much as the head's bf16 matmuls). Forward and
    backward upcast :data:`BLOCK_ROWS` rows at a time into one cache-sized fp32 buffer; backward
    writes softmax x upstream gradient in the logits' dtype (rounded once, relative 2^-9, as the
    upcast path's gradient is when cast back to that dtype), then adds the -1 at each label and the
    L2Wrap term at each row's max (found in the forward's fp32 blocks) at n places.
    """

    @staticmethod
    def forward(ctx, z, labels, factor: float):
        keep = labels != IGNORE_INDEX
        target = torch.where(keep, labels, 0)
        n = z.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=z.device)
        l2 = factor > 0 and ctx.needs_input_grad[0]
        maxx, ids = (torch.empty(n, dtype=torch.float32, device=z.device),
                     torch.empty(n, dtype=torch.long, device=z.device)) if l2 else (None, None)
        for _, rows, zb in _upcast_blocks(z):
            nll[rows] = torch.log_softmax(zb, -1).gather(1, target[rows, None]).squeeze(1)
            if l2:  # each row's max (exact: an upcast bf16 value) while the block is in cache
                torch.max(zb, -1, out=(maxx[rows], ids[rows]))
        nll = -nll * keep
        ctx.save_for_backward(z, target, keep, maxx, ids)
        ctx.factor = factor
        return nll

    @staticmethod
    def backward(ctx, g):
        z, target, keep, maxx, ids = ctx.saved_tensors
        gk = (g.float() * keep)[:, None]                       # upstream gradient of the scored rows
        dz = torch.empty_like(z)
        for _, rows, zb in _upcast_blocks(z):
            dz[rows] = torch.softmax(zb, -1).mul_(gk[rows])  # rounded to z's dtype once, here
        # The -1 at each label, then the L2Wrap term at each row's max (a row whose max is its label
        # gets both).
        _add_at(dz, target, -gk)
        if maxx is not None:
            _add_at(dz, ids, gk * ctx.factor * maxx[:, None])
        return dz, None, None


def _low_precision(logits: torch.Tensor) -> bool:
    return logits.dtype in (torch.bfloat16, torch.float16)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, l2wrap_factor: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy (fp32) over positions whose label is not -100, plus L2Wrap.

    ``logits`` [..., V] (any float dtype: fp32 and fp64 through torch's cross-entropy, bf16 and
    fp16 through :class:`LowPrecisionNLL`, which accumulates in fp32 without an fp32 copy),
    ``labels`` [...] are already the next tokens (datasets shift them), so position t of ``logits``
    is scored against ``labels[t]``. Summing (not averaging) lets the caller divide by the token
    count of the whole global batch. ``l2wrap_factor``: see :class:`L2Wrap` (1e-4 reproduces the
    reference).
    """
    V = logits.shape[-1]
    if _low_precision(logits):
        return LowPrecisionNLL.apply(logits.reshape(-1, V), labels.reshape(-1), l2wrap_factor).sum()
    loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    if l2wrap_factor > 0 and loss.requires_grad:
        loss = L2Wrap.apply(loss, logits, labels != IGNORE_INDEX, l2wrap_factor)
    return loss


def _slice_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, l2wrap_factor: float) -> torch.Tensor:
    return loss_sum(head(rows), targets, l2wrap_factor)


def _zero_loss(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """A zero loss (no position scored) that still reaches ``hidden`` and every trainable head
    parameter, so backward gives them zero gradients rather than none (DDP needs every parameter
    to receive one on every rank)."""
    zero = hidden.sum().float() * 0.0
    for p in head.parameters():
        if p.requires_grad:
            zero = zero + p.sum().float() * 0.0
    return zero


def chunked_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, l2wrap_factor: float = 0.0,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """``loss_sum(head(hidden), labels, l2wrap_factor)`` without materialising the [B, T, V] logits.

    ``hidden`` [B, T, C]: the input of the head (the output of ``ln_out``); ``head``: any module
    mapping C -> V (``nn.Linear``, a LoRA-wrapped Linear); ``labels`` [B, T], -100 ignored.
    Positions labelled -100 never reach the head (no logits are computed for them: a prompt
    masked out of the loss costs no head FLOPs). The remaining rows go through head + loss
    ``chunk_tokens`` rows at a time, each slice under a non-reentrant ``torch.utils.checkpoint``:
    its forward keeps none of the slice's logits, and backward recomputes them one slice at a time.
    Peak memory is then about 4 fp32 tensors of ``chunk_tokens`` x V (logits, log-softmax, their
    gradient, the L2Wrap gradient) instead of B x T x V.

    Trade-off (why checkpointing rather than a fused autograd Function that computes the
    gradients during forward): the recomputation costs one more head matmul per slice (about a
    third of the head's FLOPs: forward, recomputed forward and two backward matmuls instead of
    three), but it works for any head module (LoRA, dropout with the same RNG, bf16 autocast,
    frozen or trainable weights) through ordinary autograd, and holds no V x C gradient buffer
    between forward and backward. Under autocast the logits stay in the head's dtype (bf16) and
    the cross-entropy accumulates in fp32 without an fp32 copy of them, as in :func:`loss_sum`. Equal to the unchunked loss within fp32 rounding
    (slice sums are added in another order).
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ConfigError(f"chunked_loss_sum: chunk_tokens must be an integer >= 1 (rows of logits per slice), "
                          f"found {chunk_tokens!r}; pass e.g. {DEFAULT_CHUNK_TOKENS}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ConfigError(f"chunked_loss_sum: expected hidden [B, T, C] and labels [B, T], found hidden "
                          f"{list(hidden.shape)} and labels {list(labels.shape)}; pass the output of ln_out and "
                          f"the labels of the same batch")
    B, T, C = hidden.shape
    rows, targets = hidden.reshape(B * T, C), labels.reshape(B * T)
    if rows.device.type == "cpu":
        # Drop the unscored rows before the head. On an accelerator this selection would copy the
        # row count to the host every step, so there every row goes through (the loss ignores them).
        keep = targets != IGNORE_INDEX
        if not bool(keep.all()):
            rows, targets = rows[keep], targets[keep]
        if rows.shape[0] == 0:
            return _zero_loss(hidden, head)
    N = rows.shape[0]
    recompute = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = None
    for s in range(0, N, chunk_tokens):
        x, y = rows[s:s + chunk_tokens], targets[s:s + chunk_tokens]
        if recompute:
            part = checkpoint(_slice_loss, head, x, y, l2wrap_factor, use_reentrant=False)
        else:  # no graph (eval): nothing would be kept anyway
            part = _slice_loss(head, x, y, l2wrap_factor)
        total = part if total is None else total + part
    return total


def _slice_nll(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(rows)
    if temperature == 1.0 and _low_precision(logits):
        return LowPrecisionNLL.apply(logits, targets, 0.0)
    logits = logits.float()
    return F.cross_entropy(logits / temperature if temperature != 1.0 else logits, targets, reduction="none")


def _row_nll(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int, temperature: float,
             what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll of each scored row, its flat position in [B*T], a zero that keeps the graph): the head and
    log-softmax in checkpointed slices of rows, as :func:`chunked_loss_sum` does."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ConfigError(f"{what}: expected hidden [B, T, C] and labels [B, T], found hidden "
                          f"{list(hidden.shape)} and labels {list(labels.shape)}")
    B, T, C = hidden.shape
    rows, targets = hidden.reshape(B * T, C), labels.reshape(B * T)
    where = torch.arange(B * T, device=hidden.device)
    if rows.device.type == "cpu":  # as in chunked_loss_sum: select scored rows only where it costs no sync
        keep = targets != IGNORE_INDEX
        rows, targets, where = rows[keep], targets[keep], where[keep]
    zero = hidden.sum().float() * 0.0  # no scored row at all: zero gradients, not missing ones
    recompute = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for s in range(0, rows.shape[0], chunk_tokens):
        x, y = rows[s:s + chunk_tokens], targets[s:s + chunk_tokens]
        parts.append(checkpoint(_slice_nll, head, x, y, temperature, use_reentrant=False) if recompute
                     else _slice_nll(head, x, y, temperature))
    nll = torch.cat(parts) if parts else zero.expand(0)
    return nll, where, zero


def chunked_sequence_nll(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-sequence summed negative log-likelihood of ``labels`` [B] (fp32): what preference
    losses need (log p of a completion = minus this), computed like :func:`chunked_loss_sum`
    (head and log-softmax in checkpointed slices, -100 ignored, never the [B, T, V] logits).
    No L2Wrap (it belongs to the language-model objective)."""
    B, T = labels.shape
    nll, where, zero = _row_nll(hidden, head, labels, chunk_tokens, 1.0, "chunked_sequence_nll")
    return (zero + torch.zeros(B, device=hidden.device)).index_add(0, torch.div(where, T, rounding_mode="floor"), nll)


def chunked_token_nll(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, temperature: float = 1.0,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Negative log-likelihood of each scored token [B, T] (0 where labels are -100), of the logits
    divided by ``temperature`` (the policy as it samples): what policy-gradient losses need."""
    B, T = labels.shape
    nll, where, zero = _row_nll(hidden, head, labels, chunk_tokens, temperature, "chunked_token_nll")
    return (zero + torch.zeros(B * T, device=hidden.device)).index_add(0, where, nll).view(B, T)
