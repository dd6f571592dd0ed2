"""Training losses: next-token cross-entropy plus the reference trainer's L2Wrap (reference §5).

It returns a *sum* over the positions whose label is not -100: the trainer multiplies it by
``world_size / n_tok`` (the token count of the whole global batch), so gradient accumulation and
DDP give the update of one big batch. L2Wrap's ``factor`` is therefore the reference trainer's
per-token coefficient, 1e-4: the division by the number of loss positions reaches the penalty
through the upstream gradient of that scaled sum, exactly as it reaches the cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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
        return loss

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


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, l2wrap_factor: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy (fp32) over positions whose label is not -100, plus L2Wrap.

    ``logits`` [..., V] (any float dtype; upcast to fp32 for the cross-entropy), ``labels`` [...]
    are already the next tokens (datasets shift them), so position t of ``logits`` is scored
    against ``labels[t]``. Summing (not averaging) lets the caller divide by the token count of the
    whole global batch. ``l2wrap_factor``: see :class:`L2Wrap` (1e-4 reproduces the reference).
    """
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    if l2wrap_factor > 0 and loss.requires_grad:
        loss = L2Wrap.apply(loss, logits, labels != IGNORE_INDEX, l2wrap_factor)
    return loss
