"""Losses: L2Wrap against the reference trainer's gradient formula, chunked cross-entropy against
the unchunked loss (values and gradients), and the trainer's call site."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

from helpers import write_checkpoint
from rwkvtune.errors import ConfigError
from rwkvtune.peft.lora import LoRALinear
from rwkvtune.train.loss import chunked_loss_sum, loss_sum

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
    """The sft method's micro-batch, with the trainer's scale, gives the head the reference
    trainer's gradient: (softmax - onehot + 1e-4 * max at argmax) / n_tok, through ln_out's output."""
    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.train.objective import TrainModule
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT

    ckpt = write_checkpoint(tmp_path / "m.pth", n_layer=1, n_embd=32, head_size=16, vocab=64, d_decay=4, d_aaa=4,
                            d_mv=4, d_gate=4)
    model = RWKV7.from_checkpoint(ckpt).train()
    with torch.no_grad():
        model.head.weight.mul_(20)  # large logits so the L2 term is far above fp32 rounding
    seen = {}
    model.ln_out.register_forward_hook(lambda m, i, o: seen.update(h=o.detach()))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (2, 8), generator=g)
    labels = torch.randint(0, 64, (2, 8), generator=g)
    labels[0, :3] = -100
    n_tok = int((labels != -100).sum())
    cfg = TrainConfig(ctx_len=8)
    ctx = StepContext(cfg=cfg, device="cpu", autocast=contextlib.nullcontext, scale=1 / n_tok)
    SFT(cfg).forward_backward(TrainModule(model), {"input_ids": idx, "labels": labels}, ctx)
    h = seen["h"].double()
    logits = h @ model.head.weight.detach().double().T
    G = _reference_grad(logits, labels, L2, 1 / n_tok)  # [B, T, V]
    expected = torch.einsum("btv,btc->vc", G, h)
    without_l2 = torch.einsum("btv,btc->vc", _reference_grad(logits, labels, 0.0, 1 / n_tok), h)
    got = model.head.weight.grad.double()
    assert (got - expected).abs().max() < 1e-6 * expected.abs().max()
    assert (expected - without_l2).abs().max() > 100 * (got - expected).abs().max()


# ---- chunked cross-entropy -----------------------------------------------------------------


class _RowCounter(nn.Module):
    """Wraps a head; records how many rows each call saw (forward and recomputation)."""

    def __init__(self, head):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, x):
        self.rows.append(x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1])
        return self.head(x)


def _hidden_labels(B, T, C, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    return hidden, labels


def _linear(C, V, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.mul_(30)  # large max logits: the L2 term matters in the gradients compared
    return head


def _both(head, hidden, labels, chunk_tokens, factor=L2, upstream=0.37, autocast=contextlib.nullcontext):
    """Loss and gradients (hidden, then each trainable head parameter) of the unchunked and the
    chunked path, each from fresh leaves and zeroed gradients."""
    out = []
    for chunked in (False, True):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        with autocast():
            loss = (chunked_loss_sum(h, head, labels, factor, chunk_tokens=chunk_tokens) if chunked
                    else loss_sum(head(h), labels, factor))
        (loss * upstream).backward()
        grads = [h.grad] + [p.grad for p in head.parameters() if p.requires_grad]
        out.append((loss.detach(), grads))
    return out


def _close(a, b, rel):
    return (a.double() - b.double()).abs().max() <= rel * b.double().abs().max()


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 1000])
def test_chunked_equals_unchunked_linear_head(chunk_tokens):
    # 2 x 13 = 26 rows: no chunk size here divides the scored rows evenly except 1
    hidden, labels = _hidden_labels(2, 13, 8, 50)
    labels[0, 2:9] = -100  # a run of ignored positions longer than most slices
    head = _linear(8, 50)
    (l0, g0), (l1, g1) = _both(head, hidden, labels, chunk_tokens)
    assert l1.dtype == torch.float32 and abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    for a, b in zip(g1, g0):
        assert _close(a, b, 1e-5)
    assert g0[0][0, 2:9].abs().max() == 0 and g1[0][0, 2:9].abs().max() == 0


def test_chunked_matches_plain_fp64_implementation():
    hidden, labels = _hidden_labels(2, 6, 8, 30, seed=4)
    labels[1, 0] = -100
    head = _linear(8, 30, seed=4)
    h = hidden.clone().requires_grad_(True)
    chunked_loss_sum(h, head, labels, L2, chunk_tokens=5).backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = head.weight.detach().double().requires_grad_(True)
    _plain_l2_loss(h64 @ w64.T, labels, L2).backward()
    assert _close(h.grad, h64.grad, 1e-5) and _close(head.weight.grad, w64.grad, 1e-5)


def test_chunked_lora_head_gradients_of_A_and_B():
    C, V = 8, 40
    hidden, labels = _hidden_labels(2, 9, C, V, seed=5)
    head = LoRALinear(_linear(C, V, seed=5), r=4, alpha=8)
    with torch.no_grad():
        head.lora_B.normal_(0, 0.5)  # B = 0 (the init) would give A a zero gradient in both paths
    (l0, g0), (l1, g1) = _both(head, hidden, labels, chunk_tokens=5)
    assert len(g0) == 3 and head.base.weight.grad is None  # hidden, lora_A, lora_B; the base is frozen
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    for a, b in zip(g1, g0):
        assert a is not None and a.abs().max() > 0 and _close(a, b, 1e-5)


def test_chunked_all_ignored_gives_zero_loss_and_zero_gradients():
    hidden, labels = _hidden_labels(2, 5, 8, 20)
    labels[:] = -100
    head = _linear(8, 20)
    (l0, g0), (l1, g1) = _both(head, hidden, labels, chunk_tokens=3)
    assert float(l0) == float(l1) == 0.0
    for a, b in zip(g1, g0):  # zero, not None: DDP needs a gradient for every trainable parameter
        assert a is not None and a.abs().max() == 0 and b.abs().max() == 0


def test_chunked_never_runs_the_head_on_more_than_chunk_tokens_rows():
    hidden, labels = _hidden_labels(3, 10, 8, 20)
    labels[2, :] = -100  # 20 scored rows -> slices of 6, 6, 6, 2
    head = _RowCounter(_linear(8, 20))
    h = hidden.clone().requires_grad_(True)
    chunked_loss_sum(h, head, labels, L2, chunk_tokens=6).backward()
    # forward once per slice, recomputed once per slice in backward; masked rows never reach the head
    assert sorted(head.rows) == [2, 2, 6, 6, 6, 6, 6, 6]


def test_chunked_without_grad_matches_and_builds_no_graph():
    hidden, labels = _hidden_labels(2, 7, 8, 20)
    head = _RowCounter(_linear(8, 20))
    with torch.no_grad():
        ref = loss_sum(head(hidden), labels)
        head.rows.clear()
        got = chunked_loss_sum(hidden, head, labels, chunk_tokens=4)
    assert not got.requires_grad and head.rows == [4, 4, 4, 2]
    assert abs(float(got) - float(ref)) <= 1e-6 * float(ref)


def test_chunked_under_bf16_autocast_upcasts_for_the_loss():
    hidden, labels = _hidden_labels(2, 6, 16, 64, seed=6)
    head = _linear(16, 64, seed=6)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    seen = []
    head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    (l0, g0), (l1, g1) = _both(head, hidden, labels, chunk_tokens=5, autocast=bf16)
    assert set(seen) == {torch.bfloat16}  # the head ran in bf16 in both paths (and the recomputation)
    assert l0.dtype == l1.dtype == torch.float32
    assert abs(float(l1) - float(l0)) <= 1e-3 * abs(float(l0))
    for a, b in zip(g1, g0):
        assert _close(a, b, 2e-2)  # bf16 logits and gradients: rows may round differently per slice


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_chunked_refuses_bad_chunk_tokens(bad):
    hidden, labels = _hidden_labels(1, 4, 8, 20)
    with pytest.raises(ConfigError, match=r"chunked_loss_sum: chunk_tokens must be an integer >= 1 .* found"):
        chunked_loss_sum(hidden, _linear(8, 20), labels, chunk_tokens=bad)


def test_chunked_refuses_mismatched_shapes():
    hidden, labels = _hidden_labels(2, 4, 8, 20)
    with pytest.raises(ConfigError, match=r"expected hidden \[B, T, C\] and labels \[B, T\], found hidden "
                                          r"\[2, 4, 8\] and labels \[2, 3\]"):
        chunked_loss_sum(hidden, _linear(8, 20), labels[:, :3])


def test_chunked_through_a_whole_model_gives_the_same_parameter_gradients(tmp_path):
    """On a tiny RWKV-7 (LoRA on the head too), every trainable parameter gets the same gradient
    from chunked_loss_sum over ln_out's output as from loss_sum over the model's logits."""
    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.peft.lora import apply_lora

    ckpt = write_checkpoint(tmp_path / "m.pth", n_layer=1, n_embd=32, head_size=16, vocab=64, d_decay=4, d_aaa=4,
                            d_mv=4, d_gate=4)
    model = RWKV7.from_checkpoint(ckpt).train()
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, ["att.key", "head"], r=2, alpha=4)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.3)  # nonzero B so every A gets a gradient
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 9), generator=g)
    labels = torch.randint(0, 64, (2, 9), generator=g)
    labels[1, :4] = -100
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(h=i[0]))
    grads = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        loss = chunked_loss_sum(seen["h"], model.head, labels, L2, chunk_tokens=4) if chunked \
            else loss_sum(logits, labels, L2)
        (loss / 14).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 4  # A and B of att.key and of head
    for n in grads[0]:
        assert grads[0][n].abs().max() > 0 and _close(grads[1][n], grads[0][n], 1e-5), n
