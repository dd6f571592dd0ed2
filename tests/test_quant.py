"""A quantized frozen base (--base-quant int8 / nf4): the layers against their own dequantized
matmul and against torchao's NF4, whole-model logits against fp32, LoRA training and merging over
a quantized base, the memory plan, and the refusals.

No quantized file is ever written (the quantized base is rebuilt from the full-precision file at
each load), so there is no quantized file format to round-trip or to damage; what stands in for the
round trip is that quantizing is deterministic (a resumed run gets the same base, bit for bit).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import train_losses, write_checkpoint, write_word_text
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.constants import BASE_QUANTS
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.models.rwkv7.quant import (BIG_MATRICES, QUANT_KINDS, QuantError, QuantLinear, dequantize_nf4,
                                         quantize_int8, quantize_nf4)
from rwkvtune.train import memory
from rwkvtune.train.trainer import train

SMALL = dict(n_layer=2, n_embd=64, head_size=16, vocab=512, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
# The World vocabulary, so the bundled tokenizer's ids fit (training, merge-lora's report).
WORLD = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    text = Path(write_word_text(d / "text.jsonl"))
    return {"small": write_checkpoint(d / "small.pth", **SMALL), "world": write_checkpoint(d / "world.pth", **WORLD),
            "text": str(text), "dir": d}


def _cfg(files, out, **kw):
    base = dict(model=files["world"], data=files["text"], out=str(out), ctx_len=16, batch_size=4,
                lr=1e-2, warmup_steps=0, save_every=0, tensorboard=False, save_dtype="fp32", mode="lora", max_steps=6)
    base.update(kw)
    return TrainConfig(**base)


def test_the_names_agree_across_layers():
    assert BASE_QUANTS == QUANT_KINDS
    assert memory.QUANT_MATRICES == BIG_MATRICES


# ---- the layers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 1 and 5: torch's int8 kernel (no grad); 40: dequantized
def test_int8_layer_equals_its_dequantized_matmul(dtype, rows):
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    w[3] = 0  # an all-zero row
    layer = QuantLinear.from_weight(w, "int8")
    q, s = quantize_int8(w)
    assert torch.equal(layer.qweight, q) and q.dtype == torch.int8 and s.dtype == torch.float32
    deq = layer.dequantize()
    # the format: per-output-row absmax, symmetric, round to nearest: |W - q s| <= s / 2 per row
    assert ((w - deq).abs() <= s[:, None] / 2 + 1e-7).all() and torch.equal(deq[3], torch.zeros(128))
    x = torch.randn(rows, 128).to(dtype)
    with torch.no_grad():
        y = layer(x)
    if rows <= 16:  # the int8 kernel: bf16 input and output (see quant.py), fp32 sums
        ref = (x.bfloat16().float() @ deq.t()).bfloat16().to(dtype)
        assert y.dtype == dtype and torch.allclose(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
        assert (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()  # one bf16 rounding
    else:
        ref = (x.float() @ deq.t()).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert y.dtype == dtype and torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol * 10)


def test_nf4_equals_torchao_and_its_dequantized_matmul():
    from torchao.quantization import to_nf4

    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.05  # 2 double-quantization blocks of 64 x 256 values
    ours = quantize_nf4(w)
    ref = to_nf4(w, 64, 256)
    assert torch.equal(ours["codes"], ref.quantized_data) and torch.equal(ours["qscalers"], ref.quantized_scalers)
    deq = dequantize_nf4(ours["codes"], ours["qscalers"], ours["factor"], ours["mean"], w.shape)
    assert torch.equal(deq, ref.get_original_weight())
    layer = QuantLinear.from_weight(w, "nf4")
    assert layer.nbytes() < w.numel() * 0.53  # 4-bit codes + int8 scalers per 64 + fp32 per 16384
    x = torch.randn(3, 7, 128, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, x @ deq.t(), atol=1e-5)
    y.sum().backward()  # the input's gradient goes through the dequantized weight
    assert torch.allclose(x.grad, torch.ones(3, 7, 256) @ deq, atol=1e-5)


def test_nf4_pads_odd_sizes_and_quantizing_is_deterministic():
    torch.manual_seed(1)
    w = torch.randn(100, 64)  # 6400 values: padded to one 16384-value block
    a, b = QuantLinear.from_weight(w, "nf4"), QuantLinear.from_weight(w.clone(), "nf4")
    for name, t in a.named_buffers():
        assert torch.equal(t, getattr(b, name)), name
    deq = a.dequantize()
    assert deq.shape == w.shape
    # NF4's error: half the widest gap between levels (-1 to -0.6962) times the block absmax, plus the
    # double-quantized absmax's own error (one int8 step of its range: measured 0.025 here)
    absmax = w.reshape(-1, 64).abs().amax(1)[:, None]
    assert ((w.reshape(-1, 64) - deq.reshape(-1, 64)).abs() <= 0.1519 * absmax + 0.03).all()
    assert torch.equal(QuantLinear.from_weight(torch.zeros(64, 64), "nf4").dequantize(), torch.zeros(64, 64))


def test_casting_a_model_keeps_codes_and_fp32_scales():
    layer = QuantLinear.from_weight(torch.randn(64, 64), "int8")
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.scale.dtype == torch.float32


# ---- the whole model -------------------------------------------------------------------------------
# Bounds on the SMALL random model (64 wide, 512 vocab, 32 tokens x 2): int8 measured KL 7e-5 nats and
# 98% top-1; nf4 KL 0.016 and 67% (random weights give nearly flat logits, so top-1 flips easily).
BOUNDS = {"int8": (1e-3, 0.95), "nf4": (0.05, 0.5)}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_model_logits_close_to_fp32(files, kind):
    idx = torch.randint(0, SMALL["vocab"], (2, 32), generator=torch.Generator().manual_seed(0))
    ref = RWKV7.from_checkpoint(files["small"])
    model = RWKV7.from_checkpoint(files["small"], quant=kind)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(names) == 6 * SMALL["n_layer"] + 1 and "head" in names  # the big matrices, nothing else
    assert all(isinstance(getattr(model.blocks[0].att, n), torch.nn.Parameter) for n in ("w1", "a2", "g1", "v2"))
    with torch.no_grad():
        p, q = ref(idx).log_softmax(-1), model(idx).log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    top1 = float((p.argmax(-1) == q.argmax(-1)).float().mean())
    max_kl, min_top1 = BOUNDS[kind]
    assert kl < max_kl and top1 >= min_top1, (kind, kl, top1)


def test_int8_decoding_one_token_at_a_time_stays_close_to_fp32(files):
    """Decoding (one row per product: the int8 kernel, bf16 input) against the fp32 model decoded
    alike: KL below 2e-3 nats per token (measured 1e-4) over 16 tokens."""
    ids = torch.randint(0, SMALL["vocab"], (1, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for kind in ("none", "int8"):
        model, state, rows = RWKV7.from_checkpoint(files["small"], quant=kind), None, []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                logits, state = model(ids[:, t:t + 1], state=state, return_state=True)
                rows.append(logits[0, 0].log_softmax(-1))
        out[kind] = torch.stack(rows)
    p, q = out["none"], out["int8"]
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 2e-3


# ---- LoRA over a quantized base --------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(files):
    """6 LoRA steps of the repeating-words task over each base: run directories and their losses."""
    out = {}
    for kind in ("none", "int8", "nf4"):
        train(_cfg(files, files["dir"] / f"lora-{kind}", base_quant=kind, save_format="pth"))
        out[kind] = (files["dir"] / f"lora-{kind}", train_losses(files["dir"] / f"lora-{kind}"))
    return out


def test_lora_on_a_quantized_base_learns_like_fp32(runs):
    """Over each quantized base the loss starts where the fp32 base's does (B = 0: the quantized base's
    own loss, within 0.05) and falls at least 90% as far (measured: 99.6% nf4, 99.9% int8)."""
    losses = {kind: run[1] for kind, run in runs.items()}
    drop = losses["none"][0] - losses["none"][-1]
    assert drop > 2.5, losses["none"]
    for kind in ("int8", "nf4"):
        assert abs(losses[kind][0] - losses["none"][0]) < 0.05
        assert losses[kind][0] - losses[kind][-1] >= 0.9 * drop, (kind, losses[kind], losses["none"])


def test_adapter_of_a_quantized_base_merges_into_the_full_precision_file(files, runs, tmp_path, capsys):
    """final.pth equals merge-lora of the adapter into the fp32 file (bit for bit), and merge-lora
    reports the quality change of that merge in one line."""
    from rwkvtune.cli import main

    run = runs["nf4"][0]
    adapter = torch.load(run / "adapter.pth", weights_only=True)
    assert adapter["base_quant"] == "nf4"
    assert adapter["base_fingerprint"] == torch.load(runs["none"][0] / "adapter.pth")["base_fingerprint"]
    merged = tmp_path / "merged.pth"
    assert main(["merge-lora", files["world"], str(run / "adapter.pth"), str(merged), "--save-dtype", "fp32"]) == 0
    final, written = torch.load(run / "final.pth"), torch.load(merged)
    assert set(final) == set(written) and all(torch.equal(final[k], written[k]) for k in final)
    report = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quality:")]
    assert len(report) == 1 and "nf4 base + adapter" in report[0] and "top-1 agreement" in report[0], report
    assert main(["merge-lora", files["world"], str(runs["none"][0] / "adapter.pth"), str(tmp_path / "m2.pth")]) == 0
    assert "quality:" not in capsys.readouterr().err  # a full-precision adapter: nothing to report


def test_eval_and_generate_take_base_quant_and_an_adapter(files, runs, capsys):
    from rwkvtune.cli import main

    assert main(["eval", "--model", files["world"], "--data", files["text"], "--adapter",
                 str(runs["nf4"][0] / "adapter.pth"), "--base-quant", "nf4"]) == 0
    tuned = json.loads(capsys.readouterr().out.splitlines()[-1])["eval_loss"]
    assert tuned < runs["none"][1][0] - 1  # the adapter applies to the quantized base as in training
    assert main(["generate", "--model", files["world"], "--base-quant", "int8", "--prompt", "alpha beta",
                 "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out


def test_state_tuning_on_a_quantized_base_trains_also_sharded(files, tmp_path):
    """State tuning over an nf4 base trains; under fsdp (one process here: the quantized base built
    as a sharded run builds it) its state.pth equals the unsharded run's (measured: bit for bit)."""
    states = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        train(_cfg(files, out, mode="state", base_quant="nf4", max_steps=3, strategy=strategy))
        losses = train_losses(out)
        assert losses[-1] < losses[0] and not (out / "final.pth").exists()
        states[strategy] = torch.load(out / "state.pth", weights_only=True)["wkv_init"]
    a, b = states["ddp"], states["fsdp"]
    assert a.abs().max() > 0 and float((a - b).norm()) <= 1e-5 * float(a.norm())
    # each matrix is checked as it is read for quantizing: a damaged one is named in one line
    from helpers import make_state_dict
    from rwkvtune.errors import CheckpointError

    bad = make_state_dict(**WORLD)
    bad["blocks.1.ffn.key.weight"][0, 3] = float("inf")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: tensor blocks\.1\.ffn\.key\.weight holds 1 non-finite") as e:
        train(_cfg(files, tmp_path / "bad", model=str(tmp_path / "bad.pth"), mode="state", base_quant="nf4",
                   strategy="fsdp"))
    assert "\n" not in str(e.value) and not (tmp_path / "bad" / "state.pth").exists()


# ---- strategy fsdp -------------------------------------------------------------------------------------
def test_fsdp_lora_on_an_int8_base_equals_one_process_merges_and_resumes(files, tmp_path):
    """Under fsdp every process quantizes the whole base as it fills its shards (the codes are buffers:
    FSDP2 shards only the full-precision rest, and checkpoints never hold them). 2 processes x 2
    samples equal 1 process x 4 (ddp) on the same int8 base: losses within 1e-6 and adapters within
    2e-5, relative (measured 2e-7 and 5.4e-6: AdamW turns the split gradient sum's different rounding
    into visible steps on the smallest entries); final.pth is merge-lora of the adapter into the
    full-precision file, bit for bit; a sharded checkpoint resumed retrains its steps as they were."""
    from test_fsdp import COMMON, _run, _torchrun

    from rwkvtune.cli import main
    from rwkvtune.train.dcp_safe import SafeReader

    opts = dict(mode="lora", lora_r=4, base_quant="int8", max_steps=4, save_every=2, **COMMON)

    def run(out, **kw):
        train(TrainConfig(model=files["world"], data=files["text"], out=str(out), batch_size=4, **{**opts, **kw}))
        return train_losses(out), torch.load(out / "adapter.pth", weights_only=True)["lora"]

    def close(a, b, tol):
        return set(a) == set(b) and all(float((a[k] - b[k]).norm()) <= tol * float(a[k].norm()) for k in a)

    (la, aa), sharded = run(tmp_path / "ddp", save_every=0), tmp_path / "fsdp"
    _run(_torchrun({"ckpt": files["world"], "text": files["text"]}, sharded, **opts))  # batch_size 2 each
    lb, adapter = train_losses(sharded), torch.load(sharded / "adapter.pth", weights_only=True)
    assert len(lb) == 4 and max(abs(x - y) / abs(x) for x, y in zip(la, lb)) < 1e-6, (la, lb)
    assert adapter["base_quant"] == "int8" and close(aa, adapter["lora"], 2e-5)
    assert all(float(t.abs().max()) > 0 for k, t in adapter["lora"].items() if k.endswith("lora_B"))  # it trained
    merged = tmp_path / "merged.pth"
    assert main(["merge-lora", files["world"], str(sharded / "adapter.pth"), str(merged), "--save-dtype", "fp32",
                 "--no-quant-report"]) == 0
    final, written = torch.load(sharded / "final.pth"), torch.load(merged)
    assert set(final) == set(written) and all(torch.equal(final[k], written[k]) for k in final)
    saved = list(SafeReader(sharded / "checkpoints" / "step-0000002").read_metadata().state_dict_metadata)
    assert any(k.endswith(".lora_A") for k in saved)
    assert not [k for k in saved if k.rsplit(".", 1)[-1] in ("qweight", "scale")]  # rebuilt from the file
    # Resume (one process, so the global batch is the saved one): steps 3-4 again, as they were.
    one = tmp_path / "one"
    lc, ac = run(one, strategy="fsdp")
    assert max(abs(x - y) / abs(x) for x, y in zip(la, lc)) < 1e-6 and close(aa, ac, 2e-5)
    train(TrainConfig(resume=str(one / "checkpoints" / "step-0000002")))
    ld, ad = train_losses(one), torch.load(one / "adapter.pth", weights_only=True)["lora"]
    assert len(ld) == 4 and max(abs(x - y) for x, y in zip(lc, ld)) < 1e-6 and close(ac, ad, 1e-6)


# ---- refusals: one line, nothing written -----------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rwkvtune", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (("--base-quant", "int4", "--mode", "lora"), ["base_quant: found 'int4'", "none, int8, nf4"]),
    (("--base-quant", "nf4", "--mode", "full"), ["base_quant", "full fine-tune", "mode lora or state"]),
    (("--base-quant", "int8", "--mode", "full", "strategy=fsdp"), ["base_quant", "full fine-tune"]),
])
def test_bad_base_quant_is_one_line_and_writes_nothing(files, tmp_path, args, words):
    out = tmp_path / "run"
    res = _cli("train", "--model", files["world"], "--data", files["text"], "--out", str(out), *args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def test_nf4_without_torchao_is_one_line_naming_the_install(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao imports
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QuantError, match=r"pip install torchao") as e:
        train(_cfg(files, tmp_path / "run", base_quant="nf4"))
    assert "\n" not in str(e.value) and isinstance(e.value, ConfigError)
    assert not (tmp_path / "run").exists()
    with pytest.raises(QuantError, match=r"pip install torchao"):
        RWKV7.from_checkpoint(files["small"], quant="nf4")
    RWKV7.from_checkpoint(files["small"], quant="int8")  # torch's own int8 path needs nothing else


def test_generate_refuses_an_unknown_base_quant(files):
    res = _cli("generate", "--model", files["small"], "--base-quant", "int4", "--prompt", "x")
    assert res.returncode == 2 and "--base-quant" in res.stderr and "Traceback" not in res.stderr


# ---- the memory plan ---------------------------------------------------------------------------------
def test_plan_knows_quantized_bytes_and_lora_nf4_fits_7b_on_24_gb():
    from rwkvtune.configs.model_loader import load_model_config
    from rwkvtune.train.plan import card_gib

    c = load_model_config("7.2b")
    est = {q: memory.estimate_memory(c, memory.Settings(mode="lora", precision="bf16", ctx_len=1024, device="gpu",
                                                        base_quant=q)) for q in ("none", "int8", "nf4")}
    w = {q: e.terms["weights"] for q, e in est.items()}
    assert w["nf4"] < w["int8"] < w["none"]
    # the big matrices are ~92% of 7.2B: bf16 2 B -> nf4 ~0.52 B per parameter
    assert 0.3 < w["nf4"] / w["none"] < 0.35 and 0.5 < w["int8"] / w["none"] < 0.58
    assert est["nf4"].peak <= memory.FIT_FRACTION * card_gib(24) * memory.GIB < est["none"].peak
    full = memory.estimate_memory(c, memory.Settings(mode="full", precision="bf16", device="gpu", base_quant="nf4"))
    assert full.peak == memory.estimate_memory(c, memory.Settings(mode="full", precision="bf16", device="gpu")).peak
    res = _cli("plan", "7.2b", "--host-memory", "64")
    row = [line.split() for line in res.stdout.splitlines() if line.split()[:1] == ["lora+nf4"]]
    assert res.returncode == 0 and row and row[0][-4:] == ["yes", "yes", "yes", "yes"], res.stdout[-1500:]
    # the per-card summary names a quantized launch for a 24 GB card, where no full-precision one fits
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("24 GB: lora --base-quant"))
    assert "on 1 GPU" in line, line
    row13 = _cli("plan", "13.3b", "--host-memory", "64").stdout
    assert any(ln.strip().startswith("24 GB: lora --base-quant nf4") for ln in row13.splitlines()), row13[-1500:]


def test_plan_under_fsdp_holds_the_whole_quantized_base_on_every_process():
    """FSDP2 shards parameters; a quantized base's codes are buffers, whole on every process and never
    gathered: the per-process weights are the quantized bytes plus 1/W of the rest (was: all / W)."""
    from rwkvtune.configs.model_loader import load_model_config
    from rwkvtune.models.rwkv7.quant import is_big_matrix

    c = load_model_config("7.2b")

    def est(quant, world_size):
        return memory.estimate_memory(c, memory.Settings(mode="lora", precision="bf16", ctx_len=1024, device="gpu",
                                                         strategy="fsdp", world_size=world_size, base_quant=quant))

    for kind in ("int8", "nf4"):
        codes = sum(int(s[0] * s[1] * memory.QUANT_BYTES[kind]) for k, s in c.param_shapes().items()
                    if k.endswith(".weight") and len(s) == 2 and is_big_matrix(k.removesuffix(".weight")))
        one, four = est(kind, 1).terms, est(kind, 4).terms
        assert abs(four["weights"] - (codes + (one["weights"] - codes) / 4)) <= 4, (kind, four["weights"], codes)
        assert four["weights"] > codes > 3 * (one["weights"] - codes)  # the codes dominate: 4 GPUs save little
        # what FSDP all-gathers (a block at a time, the root) holds no quantized matrix
        assert four["fsdp_buffers"] < 0.5 * est("none", 4).terms["fsdp_buffers"]
    plain = est("none", 1).terms["weights"], est("none", 4).terms["weights"]
    assert abs(plain[1] - plain[0] / 4) <= 1  # a full-precision frozen base is sharded as before
    # the inventory's gathered counts are the parameters of the module a sharded run builds (meta)
    from rwkvtune.models.rwkv7.model import meta_model
    from rwkvtune.peft import get_mode
    from rwkvtune.train.objective import TrainModule

    small = load_model_config("0.1b")
    cfg = TrainConfig(model="0.1b", data="x", mode="lora", precision="bf16", base_quant="nf4")
    with torch.device("meta"):
        module = TrainModule.for_mode(get_mode("lora"), meta_model(small, quant="nf4"), cfg)
    inv = memory.inventory(small, memory.Settings(mode="lora", precision="bf16", base_quant="nf4"))
    blocks = [sum(p.numel() for p in b.parameters()) for b in module.model.blocks]
    assert inv.block == max(blocks) and inv.root == sum(p.numel() for p in module.parameters()) - sum(blocks)
