"""RWKV7 model: exactness against the `rwkv` package, state handling, checkpoints, init, input checks.

The oracle is the `rwkv` package (0.8.x, RWKV_V7_ON=1, strategy "cpu fp32"), run one sequence at
a time on the same ``.pth``. Checkpoints are tiny random files in the official layout built by
tests/helpers.py (never rwkvtune's own init), so the comparison is independent.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import make_state_dict, write_checkpoint
from rwkvtune.configs.model_loader import ModelConfig
from rwkvtune.errors import CheckpointError
from rwkvtune.models.rwkv7.model import LAYER0_V_KEYS, ModelInputError, RWKV7, RWKV7State

os.environ["RWKV_V7_ON"] = "1"  # must precede the first `import rwkv.model` (conftest sets it too)

T_ODD = 37  # not a multiple of 16 (the reference kernel's requirement) nor of the chunk size 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP spin-waiting when other
    processes share the cores (two threads on a busy 2-core machine ran 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _oracle(path_pth: str):
    from rwkv.model import RWKV

    assert path_pth.endswith(".pth")
    return RWKV(path_pth[:-4], "cpu fp32")


def _oracle_logits(oracle, ids: list[int]):
    """Logits [T, V] and the state list [att_x_prev, wkv, ffn_x_prev] * L of the oracle."""
    logits, state = oracle.forward(list(ids), None, full_output=True)
    return logits.float(), [s.clone() for s in state]


def _ids(B, T, V, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# Four different low-rank dim sets; H > 1 and H == 1; L = 1..3; odd vocab; both layer-0 layouts,
# fp32 and bf16 files, and the Lightning `_forward_module.` key prefix.
SHAPES = {
    "c64h4": dict(n_layer=2, n_embd=64, head_size=16, vocab=256, d_decay=8, d_aaa=12, d_mv=4, d_gate=16),
    "c128h4-bf16-nov0": dict(n_layer=3, n_embd=128, head_size=32, vocab=300, d_decay=16, d_aaa=16, d_mv=8,
                             d_gate=32, layer0_v=False, dtype=torch.bfloat16),
    "c96h3-prefix": dict(n_layer=2, n_embd=96, head_size=32, vocab=200, d_decay=32, d_aaa=24, d_mv=32,
                         d_gate=64, prefix="_forward_module."),
    "c64h1-bf16": dict(n_layer=1, n_embd=64, head_size=64, vocab=128, d_decay=4, d_aaa=8, d_mv=12, d_gate=8,
                       dtype=torch.bfloat16, seed=3),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (path for rwkvtune, path for the oracle, kwargs). The oracle cannot strip prefixes."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, kw in SHAPES.items():
        kw = dict(kw)
        prefix = kw.pop("prefix", "")
        path = write_checkpoint(d / f"{name}.pth", prefix=prefix, **kw)
        oracle_path = write_checkpoint(d / f"{name}-plain.pth", **kw) if prefix else path
        out[name] = (path, oracle_path, kw)
    return out


@pytest.fixture(scope="module")
def tiny(ckpts):
    return RWKV7.from_checkpoint(ckpts["c64h4"][0])


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_rwkv_package(ckpts, name):
    path, oracle_path, kw = ckpts[name]
    model = RWKV7.from_checkpoint(path)
    assert model.layer0_v == kw.get("layer0_v", True)
    oracle = _oracle(oracle_path)
    B, V = 3, kw["vocab"]
    idx = _ids(B, T_ODD, V, seed=1)
    with torch.no_grad():
        logits, state = model(idx, return_state=True)
    assert logits.shape == (B, T_ODD, V) and logits.dtype == torch.float32
    for b in range(B):
        ref, ref_state = _oracle_logits(oracle, idx[b].tolist())
        assert (logits[b] - ref).abs().max().item() < 1e-4, name
        # The RNN state has the same layout as the oracle's (row = value, column = key).
        for i in range(kw["n_layer"]):
            torch.testing.assert_close(state.att_x_prev[i, b], ref_state[3 * i], atol=1e-5, rtol=0)
            torch.testing.assert_close(state.wkv[i, b], ref_state[3 * i + 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.ffn_x_prev[i, b], ref_state[3 * i + 2], atol=1e-5, rtol=0)


def test_decoding_with_state_matches_rwkv_package(ckpts):
    """Prefill then one token at a time, continuing the oracle's own state."""
    path, _, kw = ckpts["c64h4"]
    model, oracle = RWKV7.from_checkpoint(path), _oracle(path)
    ids = _ids(1, 12, kw["vocab"], seed=2)[0].tolist()
    _, ostate = oracle.forward(ids[:8], None)
    with torch.no_grad():
        _, state = model(torch.tensor([ids[:8]]), return_state=True)
        for t in ids[8:]:
            ref, ostate = oracle.forward([t], ostate)
            out, state = model(torch.tensor([[t]]), state=state, return_state=True)
            assert (out[0, -1] - ref).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- state handling
@pytest.mark.parametrize("name", ["c64h4", "c128h4-bf16-nov0"])
def test_whole_vs_tokens_vs_chunks(ckpts, name):
    model = RWKV7.from_checkpoint(ckpts[name][0])
    idx = _ids(2, T_ODD, ckpts[name][2]["vocab"], seed=4)
    with torch.no_grad():
        whole, s_whole = model(idx, return_state=True)
        # token by token (T = 1 uses the per-token reference backend under "auto")
        state, outs = model.zero_state(2), []
        for t in range(T_ODD):
            o, state = model(idx[:, t:t + 1], state=state, return_state=True)
            outs.append(o)
        tokens = torch.cat(outs, 1)
        # chunks 10 + 20 + 7 (each chunk through the chunked parallel path)
        state, outs = None, []
        for a, b in ((0, 10), (10, 30), (30, 37)):
            o, state = model(idx[:, a:b], state=state, return_state=True)
            outs.append(o)
        chunks = torch.cat(outs, 1)
    assert (tokens - whole).abs().max().item() < 1e-5
    assert (chunks - whole).abs().max().item() < 1e-5
    for s in (state,):
        for f in ("att_x_prev", "wkv", "ffn_x_prev"):
            assert (getattr(s, f) - getattr(s_whole, f)).abs().max().item() < 1e-5


def test_last_only_logits(tiny):
    idx = _ids(2, 11, 256, seed=12)
    with torch.no_grad():
        full, s_full = tiny(idx, return_state=True)
        last, s_last = tiny(idx, return_state=True, last_only=True)
    assert last.shape == (2, 1, 256)
    # The head's matmul on [B, 1, C] and on [B, T, C] takes other GEMM blockings (another summation
    # order): fp32 rounding reaches ~1e-6 on these logits (seen 1.19e-6 under load). A wrong row
    # would be off by O(1).
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    assert torch.equal(s_full.wkv, s_last.wkv)


def test_backends_agree(tiny):
    idx = _ids(2, T_ODD, 256, seed=5)
    out = {}
    with torch.no_grad():
        for backend in ("chunked", "reference"):
            tiny.set_wkv_backend(backend)
            out[backend] = tiny(idx, return_state=True)
    tiny.set_wkv_backend("auto")
    assert (out["chunked"][0] - out["reference"][0]).abs().max().item() < 1e-5
    assert (out["chunked"][1].wkv - out["reference"][1].wkv).abs().max().item() < 1e-5


def test_wkv_init_equals_initial_state(tiny):
    c = tiny.config
    g = torch.Generator().manual_seed(6)
    wkv_init = torch.randn(c.n_layer, c.n_head, c.head_size_a, c.head_size_a, generator=g) * 0.3
    idx = _ids(2, 9, 256, seed=6)
    state = tiny.zero_state(2)
    state.wkv[:] = wkv_init[:, None]
    with torch.no_grad():
        a = tiny(idx, wkv_init=wkv_init)
        b = tiny(idx, state=state)
        plain = tiny(idx)
    assert (a - b).abs().max().item() < 1e-5
    assert (a - plain).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------- checkpoints
def _tiny_config_json(model_name, model_file, kw):
    return {
        "model_name": model_name,
        "model_file": model_file,
        "architecture": {"n_layer": kw["n_layer"], "n_embd": kw["n_embd"], "vocab_size": kw["vocab"],
                         "head_size_a": kw["head_size"], "ctx_len": 512},
        "lora_dims": {"dim_att_lora": kw["d_decay"], "dim_aaa_lora": kw["d_aaa"],
                      "dim_gate_lora": kw["d_gate"], "dim_mv_lora": kw["d_mv"]},
    }


def test_from_checkpoint_by_registry_name(tmp_path, monkeypatch):
    models, configs = tmp_path / "models", tmp_path / "configs"
    models.mkdir()
    configs.mkdir()
    kw = dict(SHAPES["c64h4"])
    (configs / "tinytest.json").write_text(json.dumps(_tiny_config_json("Tiny", "tiny-test.pth", kw)))
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(models))
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(configs))
    with pytest.raises(CheckpointError) as e:
        RWKV7.from_checkpoint("tinytest")
    msg = str(e.value)
    assert f"tiny-test.pth is not in the models directory {models}" in msg and "RWKVTUNE_MODEL_DIR" in msg
    write_checkpoint(models / "tiny-test.pth", **kw)
    model = RWKV7.from_checkpoint("tinytest")
    assert model.config.n_embd == 64 and model.config.vocab_size == 256
    by_path = RWKV7.from_checkpoint(models / "tiny-test.pth")
    idx = _ids(1, 5, 256)
    with torch.no_grad():
        assert torch.equal(model(idx), by_path(idx))
    # A file of another shape under the registry's file name is refused, not loaded with its own
    # dims: every differing dim is named, and the registry entry the file does fit.
    (configs / "tinybig.json").write_text(json.dumps(_tiny_config_json("TinyBig", "tiny-big.pth",
                                                                       dict(kw, n_embd=128, head_size=32))))
    write_checkpoint(models / "tiny-big.pth", **kw)  # c64 dims, named as the c128 model
    with pytest.raises(CheckpointError) as e:
        RWKV7.from_checkpoint("tinybig")
    msg = str(e.value)
    assert str(models / "tiny-big.pth") in msg and "TinyBig" in msg
    assert "n_embd: expected 128, found 64" in msg and "'tinytest'" in msg
    # The same check when the caller states the dims it expects (the trainer does).
    from rwkvtune.configs.model_loader import load_model_config

    with pytest.raises(CheckpointError, match="n_embd: expected 128, found 64"):
        RWKV7.from_checkpoint(models / "tiny-big.pth", expect=load_model_config("tinybig"))
    assert RWKV7.from_checkpoint(models / "tiny-test.pth", expect=load_model_config("tinytest")).config.n_embd == 64


@pytest.mark.parametrize("name", ["c64h4", "c128h4-bf16-nov0", "c96h3-prefix"])
def test_save_checkpoint_official_layout(ckpts, tmp_path, name):
    path, _, kw = ckpts[name]
    src = torch.load(path, map_location="cpu", weights_only=True)
    src = {k.removeprefix("_forward_module."): v for k, v in src.items()}
    model = RWKV7.from_checkpoint(path)
    out = tmp_path / "saved.pth"
    model.save_checkpoint(out)
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert set(saved) == set(src)  # official layout: no prefix, layer-0 v keys as in the input
    for k, v in src.items():
        assert saved[k].shape == v.shape, k
        assert saved[k].dtype == torch.bfloat16, k  # bf16 by default, like released files
    idx = _ids(1, T_ODD, kw["vocab"], seed=7)
    oracle = _oracle(str(out))
    reloaded = RWKV7.from_checkpoint(out)
    with torch.no_grad():
        ours = reloaded(idx)[0]
        orig = model(idx)[0]
    ref, _ = _oracle_logits(oracle, idx[0].tolist())
    assert (ours - ref).abs().max().item() < 1e-4
    if kw.get("dtype", torch.float32) == torch.bfloat16:
        assert torch.equal(ours, orig)  # bf16 values survive a bf16 round trip exactly
    else:
        assert (ours - orig).abs().max().item() < 0.1 * orig.abs().max().item()  # bf16 rounding only
    # fp32 storage: exact round trip, and the oracle still agrees.
    out32 = tmp_path / "saved32.pth"
    model.save_checkpoint(out32, dtype=torch.float32)
    saved32 = torch.load(out32, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved32.values())
    with torch.no_grad():
        assert torch.equal(RWKV7.from_checkpoint(out32)(idx)[0], orig)
    ref32, _ = _oracle_logits(_oracle(str(out32)), idx[0].tolist())
    assert (orig - ref32).abs().max().item() < 1e-4


def test_load_official_state_dict_shape_mismatch_names_registry_entry(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    kw_a = dict(SHAPES["c64h4"])
    kw_b = dict(n_layer=2, n_embd=128, head_size=32, vocab=256, d_decay=16, d_aaa=16, d_mv=8, d_gate=32)
    (configs / "tiny-a.json").write_text(json.dumps(_tiny_config_json("TinyA", "a.pth", kw_a)))
    (configs / "tiny-b.json").write_text(json.dumps(_tiny_config_json("TinyB", "b.pth", kw_b)))
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(configs))
    from rwkvtune.configs.model_loader import load_model_config

    model = RWKV7(load_model_config("tiny-a"))
    with pytest.raises(CheckpointError) as e:
        model.load_official_state_dict(make_state_dict(**kw_b), source="other.pth")
    msg = str(e.value)
    assert "other.pth" in msg and "TinyA" in msg
    assert "emb.weight: expected [256, 64], found [256, 128]" in msg
    assert "blocks.0.ln0.weight: expected [64], found [128]" in msg
    assert "'tiny-b'" in msg
    # The right shape loads (with and without layer-0 v keys, with a prefix).
    model.load_official_state_dict(make_state_dict(**kw_a))
    sd = {"_forward_module." + k: v for k, v in make_state_dict(**kw_a, layer0_v=False).items()}
    model.load_official_state_dict(sd)


# ---------------------------------------------------------------------------------- init
def _cfg(**over):
    base = dict(model_name="t", n_layer=4, n_embd=128, dim_att_lora=32, dim_gate_lora=32, dim_mv_lora=32,
                vocab_size=1024, head_size_a=32)
    base.update(over)
    return ModelConfig(**base)


def test_init_weights_official_values():
    cfg = _cfg()
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    model = RWKV7(cfg).init_weights_(seed=0)
    eye = torch.eye(C)
    for l, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        assert torch.all(att.k_a == 1.02) and torch.all(att.r_k == -0.04)
        assert torch.all(att.output.weight == 0) and torch.all(ffn.value.weight == 0)
        for p in (att.w1, att.a1, att.g1, att.v1):
            assert torch.all(p == 0)
        torch.testing.assert_close(att.ln_x.weight, torch.full((C,), ((1 + l) / L) ** 0.7))
        assert torch.all(att.ln_x.bias == 0)
        r = att.receptance.weight
        torch.testing.assert_close(r @ r.T, eye, atol=1e-4, rtol=0)
        kw = att.key.weight
        torch.testing.assert_close(kw @ kw.T, 0.01 * eye, atol=1e-5, rtol=0)
        for p in (att.w2, att.a2, att.g2, att.v2):  # [D, C], D < C: rows orthonormal * 0.1
            torch.testing.assert_close(p @ p.T, 0.01 * torch.eye(p.shape[0]), atol=1e-5, rtol=0)
        fk = ffn.key.weight  # [4C, C]: gain 1 * sqrt(rows/cols) = 2
        torch.testing.assert_close(fk.T @ fk, 4 * eye, atol=1e-3, rtol=0)
    assert model.emb.weight.abs().max().item() <= 1e-4 and model.emb.weight.std().item() > 1e-5
    h = model.head.weight  # [V, C], V > C: columns orthogonal, gain 0.5 * sqrt(V / C)
    torch.testing.assert_close(h.T @ h, 0.25 * V / C * eye, atol=1e-3, rtol=0)
    for ln in (model.ln_out, model.blocks[0].ln0, model.blocks[1].ln1, model.blocks[2].ln2):
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    # The per-channel vectors against fixed numbers: docs/rwkv7.md §4's formulas evaluated by hand (plain
    # floats, rounded to 6 decimals) for L=4, C=128, N=32 at layers 1 and 3, channels 0/37/64/127.
    expected = {
        (1, 37): dict(x_r=0.169865, x_w=0.567317, x_k=0.47878, ffn_x_k=0.324766, w0=-5.927243, a0=-0.411134,
                      v0=0.813465, k_k=0.730866),
        (1, 64): dict(x_r=0.09875, x_w=0.373668, x_k=0.305041, ffn_x_k=0.196932, w0=-6.152988, a0=-0.488425,
                      v0=0.728425, k_k=0.709606),
        (3, 37): dict(x_r=0.060169, x_w=0.243649, x_k=0.195227, ffn_x_k=0.004836, w0=-6.137973, a0=-0.411134,
                      v0=0.813465, k_k=0.730866),
        (3, 64): dict(x_r=0.034064, x_w=0.144405, x_k=0.114232, ffn_x_k=0.002704, w0=-6.476285, a0=-0.488425,
                      v0=0.728425, k_k=0.709606),
        (3, 127): dict(x_r=0.000392, x_w=0.001763, x_k=0.001372, ffn_x_k=3.1e-05, w0=3.0, a0=0.31, v0=0.53, k_k=0.66),
        (1, 0): dict(x_r=1.0, x_w=1.0, x_k=1.0, ffn_x_k=1.0, w0=-8.0, a0=-0.69, v0=0.93, k_k=0.76),
    }
    for (l, n), values in expected.items():
        att, ffn = model.blocks[l].att, model.blocks[l].ffn
        got = dict(x_r=att.x_r, x_w=att.x_w, x_k=att.x_k, ffn_x_k=ffn.x_k, w0=att.w0, a0=att.a0, v0=att.v0,
                   k_k=att.k_k)
        for name, value in values.items():
            assert got[name][0, 0, n].item() == pytest.approx(value, abs=2e-6), (l, n, name)
        # pairs the reference ties together
        assert torch.equal(att.x_g, att.x_r) and torch.equal(att.x_a, att.x_w) and torch.equal(att.x_v, att.x_k)
    # Same seed, same weights.
    again = RWKV7(cfg).init_weights_(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_init_loss_is_log_vocab():
    cfg = _cfg()
    model = RWKV7.from_config(cfg, seed=1)
    idx = _ids(2, 64, cfg.vocab_size, seed=8)
    with torch.no_grad():
        logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1)).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.3, loss


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_model_input_error(tiny, ckpts):
    V = tiny.config.vocab_size
    good = _ids(2, 4, V)
    cases = [
        (torch.tensor([[1, V]]), "vocab"),
        (torch.tensor([[1, -3]]), "-3"),
        (good.float(), "LongTensor"),
        (good[0], "[B, T]"),
        (good[:, :0], "T >= 1"),
        ([[1, 2]], "LongTensor"),
    ]
    for idx, words in cases:
        with pytest.raises(ModelInputError) as e:
            tiny(idx)
        assert words in str(e.value), (words, str(e.value))
    with torch.no_grad():
        _, state = tiny(good, return_state=True)
    with pytest.raises(ModelInputError, match="batch"):
        tiny(good[:1], state=state)  # batch 2 state for batch 1 input
    other = RWKV7.from_checkpoint(ckpts["c96h3-prefix"][0])
    with pytest.raises(ModelInputError, match="another model"):
        other(good % 200, state=state)
    with pytest.raises(ModelInputError, match="RWKV7State"):
        tiny(good, state=[state.att_x_prev, state.wkv, state.ffn_x_prev])
    assert issubclass(ModelInputError, ValueError)


def test_idx_and_state_on_another_device(tiny):
    """A second real device is not needed: the 'meta' device is another device to the check."""
    idx = torch.tensor([[1, 2]], device="meta")
    with pytest.raises(ModelInputError, match="idx is on meta but the model is on cpu"):
        tiny(idx)
    s = tiny.zero_state(1)
    meta_state = RWKV7State(s.att_x_prev.to("meta"), s.wkv.to("meta"), s.ffn_x_prev.to("meta"))
    with pytest.raises(ModelInputError, match="state is on meta"):
        tiny(torch.tensor([[1, 2]]), state=meta_state)


# ------------------------------------------------------------------------------- precision
def test_bf16_model_close_to_fp32(ckpts):
    path = ckpts["c64h4"][0]
    m32 = RWKV7.from_checkpoint(path)
    m16 = RWKV7.from_checkpoint(path, dtype=torch.bfloat16)
    assert m16.head.weight.dtype == torch.bfloat16
    idx = _ids(2, T_ODD, 256, seed=9)
    with torch.no_grad():
        a = m32(idx)
        b, state = m16(idx, return_state=True)
    assert b.dtype == torch.bfloat16 and state.wkv.dtype == torch.float32
    b = b.float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.999
    # Same argmax almost everywhere.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9


# --------------------------------------------------------------------------- training paths
def test_grad_checkpoint_same_gradients(ckpts):
    path = ckpts["c64h4"][0]
    idx = _ids(2, T_ODD, 256, seed=10)

    def grads(flag):
        model = RWKV7.from_checkpoint(path).train()
        model.grad_checkpoint = flag
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    assert not any(k in plain for k in LAYER0_V_KEYS)  # unused layer-0 value-residual stays frozen
    for k in plain:
        assert plain[k] is not None, k
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)
    assert plain["blocks.1.att.w1"].abs().sum() > 0


def test_state_helpers(tiny):
    s = tiny.zero_state(3)
    c = tiny.config
    assert s.wkv.shape == (c.n_layer, 3, c.n_head, c.head_size_a, c.head_size_a) and s.wkv.dtype == torch.float32
    one = s.select([1])
    assert isinstance(one, RWKV7State) and one.att_x_prev.shape == (c.n_layer, 1, c.n_embd)
    cl = s.clone()
    cl.wkv += 1
    assert torch.all(s.wkv == 0)


def test_bf16_autocast_training_step(ckpts):
    """Under bf16 autocast (precision bf16 training) the mixes and the value residual see mixed
    bf16/fp32 operands: forward and backward run, and the logits stay near fp32's."""
    path = ckpts["c64h4"][0]
    idx = _ids(2, T_ODD, 256, seed=12)
    model = RWKV7.from_checkpoint(path).train()
    with torch.no_grad():
        want = model(idx[:, :-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 256), idx[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[1].att.v1.grad.abs().sum() > 0
    torch.testing.assert_close(logits.float(), want, atol=0.15, rtol=0.05)
