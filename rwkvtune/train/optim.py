"""Optimizer and learning-rate schedule of the reference trainer (docs/rwkv7.md §5); the loss is in
:mod:`rwkvtune.train.loss`."""

from __future__ import annotations

import math

import torch


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
