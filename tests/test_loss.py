"""Losses: L2Wrap against the reference trainer's gradient formula, and the trainer's call site."""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import write_checkpoint
from rwkvtune.train.loss import loss_sum

L2 = 1e-4  # the reference trainer's per-token L2Wrap coefficient


def _logits_labels(B=2, T=3, V=5, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 8).requires_grad_(True)  # large max logits: visible L2 term
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, t in ignore:
        labels[b, t] = -100
    return logits, labels


def _reference_grad(logits, labels, factor, upstream):
    """The reference trainer's gradient, written out by hand in fp64: for every scored position,
    upstream * (softmax - onehot(label)) plus upstream * factor * max logit at the argmax."""
    x = logits.detach().double()
    V = x.shape[-1]
    valid = (labels != -100).unsqueeze(-1).double()
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), V).double()
    ce = torch.softmax(x, -1) - onehot
    maxx, ids = x.max(-1, keepdim=True)
    l2 = torch.zeros_like(x).scatter_(-1, ids, maxx * factor)
    return upstream * (ce + l2) * valid


def _plain_l2_loss(logits, labels, factor):
    """An independent autograd implementation in fp64: summed CE plus factor/2 * sum(max logit^2),
    whose gradient is the L2Wrap gradient (its value is not the loss; only gradients are compared)."""
    x = logits.double()
    valid = labels != -100
    logp = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ce = -(logp * valid).sum()
    return ce + factor / 2 * ((x.max(-1).values ** 2) * valid).sum()


# ---- L2Wrap ------------------------------------------------------------------------------------


def test_l2wrap_gradient_is_reference_formula_for_a_mean_loss():
    B, T = 2, 3
    logits, labels = _logits_labels(B, T)
    (loss_sum(logits, labels, L2) / (B * T)).backward()
    expected = _reference_grad(logits, labels, L2, 1 / (B * T))
    assert (logits.grad.double() - expected).abs().max() < 1e-7  # fp32 rounding of values up to ~0.2
    # The L2 term is really there (it is far above the tolerance): without it the gradient differs.
    assert (expected - _reference_grad(logits, labels, 0.0, 1 / (B * T))).abs().max() > 1e-4
    # The plain fp64 autograd implementation agrees.
    plain = logits.detach().clone().requires_grad_(True)
    (_plain_l2_loss(plain, labels, L2) / (B * T)).backward()
    assert (logits.grad.double() - plain.grad).abs().max() < 1e-7


@pytest.mark.parametrize("k", [1 / 7, 3.0, 250.0])
def test_l2wrap_follows_any_scaling_of_the_loss(k):
    # The old L2Wrap added factor * max regardless of the upstream gradient: it fails here.
    logits, labels = _logits_labels(seed=1)
    (loss_sum(logits, labels, L2) * k).backward()
    expected = _reference_grad(logits, labels, L2, k)
    assert (logits.grad.double() - expected).abs().max() < 1e-6 * k


def test_l2wrap_leaves_ignored_positions_alone():
    logits, labels = _logits_labels(seed=2, ignore=[(0, 1), (1, 2)])
    loss_sum(logits, labels, L2).backward()
    assert logits.grad[0, 1].abs().max() == 0 and logits.grad[1, 2].abs().max() == 0
    assert (logits.grad.double() - _reference_grad(logits, labels, L2, 1.0)).abs().max() < 1e-6


def test_l2wrap_changes_no_loss_value():
    logits, labels = _logits_labels(seed=3)
    assert float(loss_sum(logits, labels, L2).detach()) == float(loss_sum(logits, labels, 0.0).detach())


def test_trainer_micro_batch_gives_reference_gradient(tmp_path):
    """run_micro_batch with the trainer's scale and l2 gives the head the reference trainer's
    gradient: (softmax - onehot + 1e-4 * max at argmax) / n_tok, mapped through ln_out's output."""
    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.train.trainer import TrainModule, run_micro_batch

    ckpt = write_checkpoint(tmp_path / "m.pth", n_layer=1, n_embd=32, head_size=16, vocab=64, d_decay=4, d_aaa=4,
                            d_mv=4, d_gate=4)
    model = RWKV7.from_checkpoint(ckpt).train()
    with torch.no_grad():
        model.head.weight.mul_(20)  # large logits so the L2 term is far above fp32 rounding
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(h=i[0].detach(), logits=o.detach()))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (2, 8), generator=g)
    labels = torch.randint(0, 64, (2, 8), generator=g)
    labels[0, :3] = -100
    n_tok = int((labels != -100).sum())
    cfg = TrainConfig(ctx_len=8)
    run_micro_batch(TrainModule(model), {"input_ids": idx, "labels": labels}, cfg, 1 / n_tok, L2,
                    sync_last=True, autocast=contextlib.nullcontext)
    G = _reference_grad(seen["logits"], labels, L2, 1 / n_tok)  # [B, T, V]
    expected = torch.einsum("btv,btc->vc", G, seen["h"].double())
    without_l2 = torch.einsum("btv,btc->vc", _reference_grad(seen["logits"], labels, 0.0, 1 / n_tok),
                              seen["h"].double())
    got = model.head.weight.grad.double()
    assert (got - expected).abs().max() < 1e-6 * expected.abs().max()
    assert (expected - without_l2).abs().max() > 100 * (got - expected).abs().max()
