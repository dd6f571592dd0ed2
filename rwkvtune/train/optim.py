"""Optimizer, learning-rate schedule and loss of the reference trainer (docs/rwkv7.md §5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def param_groups(named_params, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: att.w0 at 2x lr without decay; decay only on 2-D ``.weight`` matrices.

    Every trainable parameter lands in exactly one group; frozen ones are left out.
    """
    w0, decay, no_decay = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            w0.append(p)
        elif weight_decay > 0 and p.dim() == 2 and name.endswith(".weight"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        {"params": w0, "weight_decay": 0.0, "lr_scale": 2.0, "name": "w0"},
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def lr_at(step: int, lr: float, lr_final: float, warmup_steps: int, total_steps: int) -> float:
    """Warmup multiplier 0.01 + 0.99*step/warmup, then cosine from lr to lr_final (``step`` from 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (0.01 + 0.99 * step / warmup_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds ``factor * max_logit`` to each position's largest logit.

    This is the reference trainer's penalty that keeps logits from drifting upward. ``factor``
    is 1e-4 divided by the number of loss positions in the global batch, so gradient
    accumulation and data parallelism give the same update as one big batch.
    """

    @staticmethod
    def forward(ctx, loss, logits, mask, factor: float):
        ctx.save_for_backward(logits, mask)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        logits, mask = ctx.saved_tensors
        maxx, ids = torch.max(logits, -1, keepdim=True)
        gy = torch.zeros_like(logits)
        gy.scatter_(-1, ids, maxx * ctx.factor * mask.unsqueeze(-1).to(logits.dtype))
        return grad_output, gy, None, None


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, l2wrap_factor: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not -100.

    ``labels`` are already the next tokens (datasets shift them), so position t of ``logits``
    is scored against ``labels[t]``. Summing (not averaging) lets the caller divide by the
    token count of the whole global batch.
    """
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    if l2wrap_factor > 0 and loss.requires_grad:
        loss = L2Wrap.apply(loss, logits, labels != -100, l2wrap_factor)
    return loss
