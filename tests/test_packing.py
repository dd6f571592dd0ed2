"""Packing with exact document boundaries: a packed batch equals its documents run one by one.

The oracle is always the documents run alone (their own windows, or whole samples), never the
packed code itself: per-token losses and every trainable gradient must agree in fp32, in full,
LoRA and state modes, with boundaries inside a WKV chunk, on a chunk edge, back to back, and in
chunked BPTT across ctx_len windows.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from helpers import TINY, write_checkpoint
from rwkvtune.data.dataset import PackedDataset
from rwkvtune.data.formats import Sample
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.models.rwkv7.model import ModelInputError
from rwkvtune.models.rwkv7.wkv import wkv7
from rwkvtune.peft import get_mode
from rwkvtune.train.objective import TrainModule
from rwkvtune.train.data import WholeSamples, build_dataset, collate
from rwkvtune.train.methods.base import StepContext
from rwkvtune.train.methods.sft import SFT

F64 = torch.float64
# Documents laid out so that, in a 64-token window, the second document starts exactly at the
# WKV chunk edge (32), the third inside a chunk (45), a one-token document follows back to back
# (46), and the window after them holds documents cut across windows.
LENGTHS = [32, 13, 1, 7, 9, 70, 5, 11, 3, 20]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("packing") / "tiny.pth", **TINY)


def _samples(lengths, seed=0, eot=True):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = rng.integers(1, TINY["vocab"], n).astype(np.int32)
        if eot:
            t[-1] = 0
        out.append(Sample(t, rng.random(n) < 0.8))
    return out


def _module(ckpt, mode, **kw):
    model = RWKV7.from_checkpoint(ckpt)
    cfg = TrainConfig(model=ckpt, mode=mode, lora_r=4, batch_size=1, **kw).resolve(model.config)
    module = TrainModule.for_mode(get_mode(mode), model, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking extras, so that a reset to them is visible
        for name, p in module.named_parameters():
            if "lora_B" in name or name == "wkv_init":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module, cfg


def _run(module, cfg, batches):
    """Summed loss, per-target token NLLs in data order, and the trainable gradients."""
    module.zero_grad(set_to_none=True)
    ctx = StepContext(cfg=cfg, device="cpu", autocast=contextlib.nullcontext, scale=1.0)
    loss, nll = 0.0, []
    for batch in batches:
        loss += SFT(cfg).forward_backward(module, batch, ctx)["loss"]
        with torch.no_grad():
            tok, state = [], None
            idx, labels, starts = batch["input_ids"], batch["labels"], batch.get("doc_start")
            for s in range(0, idx.shape[1], cfg.ctx_len):
                part = {} if starts is None else {"doc_start": starts[:, s:s + cfg.ctx_len]}
                t, state = module.token_nll(idx[:, s:s + cfg.ctx_len], labels[:, s:s + cfg.ctx_len], state, **part)
                tok.append(t)
            tok = torch.cat(tok, 1)
        nll += [tok[r][labels[r] != -100] for r in range(len(idx))]
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}
    return loss, torch.cat(nll), grads


def _assert_same(packed, alone):
    (lp, np_, gp), (la, na, ga) = packed, alone
    assert lp == pytest.approx(la, rel=1e-5)
    assert np_.shape == na.shape and (np_ - na).abs().max() < 1e-4
    assert gp.keys() == ga.keys() and gp
    for name in ga:
        scale = float(ga[name].abs().max()) + 1e-6
        assert float((gp[name] - ga[name]).abs().max()) <= 2e-4 * scale, name


# ---- the kernel ---------------------------------------------------------------------------------


def _kernel_inputs(B, T, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, dtype=F64)  # noqa: E731
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    xs = [rnd() * 0.5, -0.606531 * torch.sigmoid(rnd()), rnd() * 0.5, rnd() * 0.5, -kk, kk * torch.sigmoid(rnd())]
    return [x.requires_grad_() for x in xs], (torch.randn(B, H, N, N, generator=g, dtype=F64) * 0.3).requires_grad_()


@pytest.mark.parametrize("chunk_size", [None, 8, 1])
def test_kernel_resets_equal_documents_run_alone(chunk_size):
    B, T, H, N = 2, 70, 2, 8
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [0, 8, 32, 33, 45, 64]] = True   # chunk edges (8, 32, 64), inside, back to back
    starts[1, [5, 6, 40]] = True               # row 1 begins by continuing the carried state
    xs, s_reset = _kernel_inputs(B, T, H, N, seed=1)
    s_carry = torch.randn(B, H, N, N, dtype=F64) * 0.3
    y, s_final = wkv7(*xs, s_carry, backend="chunked", chunk_size=chunk_size, doc_start=starts,
                      reset_state=s_reset)
    g = torch.Generator().manual_seed(2)
    wy, ws = torch.randn(y.shape, generator=g, dtype=F64), torch.randn(s_final.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((y * wy).sum() + (s_final * ws).sum(), [*xs, s_reset])
    # Oracle: each document alone through the per-token recurrence, from the reset state (or, for
    # a row's first piece that starts no document, from the carried state).
    ys, finals = [], []
    for b in range(B):
        cuts = sorted({0, T} | set(starts[b].nonzero().squeeze(1).tolist()))
        row, S = [], None
        for s, e in zip(cuts[:-1], cuts[1:]):
            S0 = s_carry[b:b + 1] if s == 0 and not starts[b, 0] else s_reset[b:b + 1]
            piece, S = wkv7(*(x[b:b + 1, s:e] for x in xs), S0, backend="reference")
            row.append(piece)
        ys.append(torch.cat(row, 1))
        finals.append(S)
    y_ref, s_ref = torch.cat(ys), torch.cat(finals)
    ref_grads = torch.autograd.grad((y_ref * wy).sum() + (s_ref * ws).sum(), [*xs, s_reset])
    assert (y - y_ref).abs().max() < 1e-10 and (s_final - s_ref).abs().max() < 1e-10
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max() < 1e-10


def test_kernel_without_starts_is_unchanged_and_bad_inputs_are_named():
    xs, s_reset = _kernel_inputs(1, 40, 1, 4, seed=3)
    none = torch.zeros(1, 40, dtype=torch.bool)
    y0, s0 = wkv7(*xs, backend="chunked")
    y1, s1 = wkv7(*xs, backend="chunked", doc_start=none, reset_state=s_reset)
    assert (y0 - y1).abs().max() < 1e-12 and (s0 - s1).abs().max() < 1e-12
    with pytest.raises(ValueError, match="doc_start must be a bool tensor"):
        wkv7(*xs, doc_start=none.long())
    with pytest.raises(ValueError, match="reset_state must have shape"):
        wkv7(*xs, doc_start=none, reset_state=s_reset[:, :, :2])
    with pytest.raises(ValueError, match="pass doc_start"):
        wkv7(*xs, reset_state=s_reset)


def test_fla_adapter_builds_cu_seqlens_and_per_sequence_states(monkeypatch):
    """fla is GPU-only: a stand-in kernel with fla's varlen contract (one row, cu_seqlens, one
    initial state per sequence, key-major) checks the adapter's flattening, state choice and
    final-state pick against the reference."""
    import rwkvtune.models.rwkv7.wkv as wkv_mod

    calls = []

    def fake(r, k, v, a, b, w, scale, initial_state, output_final_state, cu_seqlens, head_first):
        assert r.shape[0] == 1 and initial_state.shape[0] == len(cu_seqlens) - 1 and scale == 1.0
        calls.append(cu_seqlens.tolist())
        ys, finals = [], []
        for i, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            y, S = wkv_mod._wkv_reference(*(x[:, s:e] for x in (r, w, k, v, a, b)), initial_state[i:i + 1].mT)
            ys.append(y)
            finals.append(S.mT)
        return torch.cat(ys, 1), torch.cat(finals)

    params = frozenset(("r", "k", "v", "a", "b", "w", "scale", "initial_state", "output_final_state",
                        "cu_seqlens", "head_first"))
    monkeypatch.setattr(wkv_mod, "_fla_kernel", lambda: (fake, params))
    xs, s_reset = _kernel_inputs(2, 12, 1, 4, seed=4)
    xs = [x.detach().float() for x in xs]
    s_reset, carry = s_reset.detach().float(), torch.randn(2, 1, 4, 4)
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[0, [0, 5]] = True
    starts[1, [3, 4, 11]] = True
    y, s = wkv_mod._wkv_fla(*xs, carry, starts, s_reset)
    y_ref, s_ref = wkv7(*xs, carry, backend="reference", doc_start=starts, reset_state=s_reset)
    assert calls == [[0, 5, 12, 15, 16, 23, 24]]
    assert (y - y_ref).abs().max() < 1e-5 and (s - s_ref).abs().max() < 1e-5
    # an fla without varlen support is named, not silently run across documents
    monkeypatch.setattr(wkv_mod, "_fla_kernel", lambda: (fake, params - {"cu_seqlens"}))
    with pytest.raises(ValueError, match="takes no cu_seqlens"):
        wkv_mod._wkv_fla(*xs, carry, starts, s_reset)


# ---- the model, the data and the SFT step --------------------------------------------------------


def test_packed_layout_marks_every_document_start():
    samples = _samples([4, 3, 5], eot=False) + _samples([2, 6])
    ds = PackedDataset(samples, 32)
    assert len(ds) == 1
    item = ds[0]
    starts = item["doc_start"].nonzero().squeeze(1).tolist()
    # docs without a trailing 0 get an inserted one (input only); docs ending in 0 lend theirs
    assert starts == [0, 5, 9, 15, 17]
    assert (item["input_ids"][starts] == 0).all()
    assert item["num_targets"] == sum(int(s.mask.sum()) for s in samples)
    plain = PackedDataset(samples, 32, packing=False)
    assert len(plain) == len(samples) and "doc_start" not in plain[0]
    batch = collate([ds[0]], "cpu")
    assert batch["doc_start"].dtype == torch.bool and batch["doc_start"].shape == batch["input_ids"].shape


def test_model_rejects_bad_doc_start(ckpt):
    model = RWKV7.from_checkpoint(ckpt)
    idx = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ModelInputError, match="doc_start: expected a bool tensor shaped like idx"):
        model(idx, doc_start=torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["full", "lora", "state"])
def test_packed_windows_equal_documents_one_by_one(ckpt, mode):
    samples = _samples(LENGTHS)
    module, cfg = _module(ckpt, mode, ctx_len=64)
    packed = PackedDataset(samples, 64)
    alone = PackedDataset(samples, 64, packing=False)
    assert len(packed) < len(alone)
    assert packed[0]["doc_start"].nonzero().squeeze(1).tolist() == [0, 32, 45, 46, 53]
    got = _run(module, cfg, [collate([packed[i] for i in range(len(packed))], "cpu")])
    want = _run(module, cfg, [collate([alone[i]], "cpu") for i in range(len(alone))])
    _assert_same(got, want)


@pytest.mark.parametrize("mode", ["full", "state"])
def test_packed_long_context_full_bptt_equals_whole_samples(ckpt, mode):
    # Rows as long as the longest sample, run in ctx_len 16 windows carrying the state; documents
    # start on a window edge (32), inside windows, and span several windows.
    samples = _samples([32, 9, 20, 3, 45, 12, 30], seed=1)
    module, cfg = _module(ckpt, mode, ctx_len=16, long_context=True, bptt="full")
    packed = PackedDataset(samples, max(len(s.tokens) for s in samples))
    assert 32 in packed[0]["doc_start"].nonzero().squeeze(1).tolist()
    got = _run(module, cfg, [collate([packed[i] for i in range(len(packed))], "cpu")])
    whole = WholeSamples(samples)
    want = _run(module, cfg, [collate([whole[i]], "cpu") for i in range(len(whole))])
    _assert_same(got, want)


def test_packed_long_context_truncated_bptt_losses_exact(ckpt, tmp_path):
    # Truncated BPTT cuts the graph on the row's ctx_len grid, not each document's, so only the
    # forward (every token's loss) is exact there; bptt=full is exact in gradients too (above).
    samples = _samples([32, 9, 20, 3, 45], seed=2)
    module, cfg = _module(ckpt, "full", ctx_len=16, long_context=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"text": "%s"}\n' % ("word " * n) for n in (5, 9, 3)))
    from rwkvtune.tokenizer import get_tokenizer

    assert isinstance(build_dataset(str(data), get_tokenizer(), cfg, 65536), PackedDataset)
    cfg.packing = False
    assert isinstance(build_dataset(str(data), get_tokenizer(), cfg, 65536), WholeSamples)
    packed = PackedDataset(samples, 45)
    whole = WholeSamples(samples)
    (lp, np_, _), (la, na, _) = (_run(module, cfg, [collate([packed[i] for i in range(len(packed))], "cpu")]),
                                 _run(module, cfg, [collate([whole[i]], "cpu") for i in range(len(whole))]))
    assert lp == pytest.approx(la, rel=1e-5) and (np_ - na).abs().max() < 1e-4


def test_packing_flag_reaches_the_config():
    import argparse

    from rwkvtune.cli.train import add_arguments

    assert TrainConfig().packing is True
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "x", "--data", "y", "--no-packing"])
    assert args.packing is False
