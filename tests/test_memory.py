"""The memory planner (rwkvtune.train.memory, memory_check, plan): the estimate against measured peaks
of real training runs on CPU, the check that refuses a run before loading weights, dry runs on the
meta device, ctx_len bounded by the data, `rwkvtune plan`, and train_with_config.sh's launch.

Measured runs: tests/memory_probe.py runs `rwkvtune train` in a subprocess (torchrun for two
processes) and reports each process's peak RSS over its RSS just before the model is built. Runs
of the tiny shapes are part of the suite; the 0.1B shape's (about a minute each on 2 cores) run
with RWKVTUNE_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_checkpoint, write_full_corpus
from rwkvtune.configs.model_loader import load_model_config
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train import memory_check
from rwkvtune.train.memory import GIB, Settings, estimate_memory, inventory, saved_per_token_layer
from rwkvtune.train.objective import TrainModule

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "memory_probe.py"
TOLERANCE = 0.20  # the estimate must be within 20% of the measured peak
# The quickstart's model (examples/configs/rwkv7-tiny.json): its cost is the 65536-row head and loss.
TINY = dict(n_layer=4, n_embd=128, head_size=32, vocab=65536, d_decay=32, d_aaa=32, d_mv=32, d_gate=32)
# A shape whose cost is activations (small vocab, wide and long windows).
WIDE = dict(n_layer=4, n_embd=256, head_size=64, vocab=1024, d_decay=32, d_aaa=32, d_mv=32, d_gate=64)
M01 = dict(n_layer=12, n_embd=768, head_size=64, vocab=65536, d_decay=64, d_aaa=64, d_mv=32, d_gate=128)  # 0.1B
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("memory")
    tiny = load_model_config(str(REPO / "examples" / "configs" / "rwkv7-tiny.json"))
    assert (tiny.n_layer, tiny.n_embd, tiny.head_size_a, tiny.dim_gate_lora) == (4, 128, 32, 32)  # = TINY
    return {"tiny": write_checkpoint(d / "tiny.pth", dtype=torch.bfloat16, **TINY),
            "wide": write_checkpoint(d / "wide.pth", dtype=torch.bfloat16, **WIDE),
            "data": write_full_corpus(d / "corpus", 1024 * 64, 65536),
            "data_small_vocab": write_full_corpus(d / "small", 1024 * 64, 1024),
            "dir": d}


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def measure(files, name, ckpt, nproc=1, strategy="ddp", batch=2, ctx=128, data="data", steps=2, extra=()) -> list:
    """Run `rwkvtune train` under the probe; per process: (measured peak bytes, the trainer's estimate)."""
    out, prefix = files["dir"] / f"run-{name}", files["dir"] / f"probe-{name}"
    args = ["--model", ckpt, "--data", files[data], "--out", str(out), "--ctx-len", str(ctx), "--batch-size",
            str(batch), "--max-steps", str(steps), "--save-every", "0", "tensorboard=false", f"strategy={strategy}",
            *extra]
    cmd = [sys.executable, str(PROBE), str(prefix), "--", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               _port(), str(PROBE), str(prefix), "--", *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a 0.1B run writes 2.7 GB of outputs
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(nproc)]
    assert all(r["reset"] for r in ranks)  # the peak is over the baseline, not an earlier transient
    return [(r["peak_over_baseline"], r["estimate"]) for r in ranks]


def _assert_within(results, name):
    for rank, (measured, estimate) in enumerate(results):
        ratio = estimate["bytes"] / measured
        assert abs(ratio - 1) <= TOLERANCE, (f"{name} rank {rank}: estimate {estimate['gib']:.2f} GiB "
                                             f"({estimate['phase']}) vs measured {measured / GIB:.2f} GiB")


# ---- the estimate against measured peaks -----------------------------------------------------------
TINY_RUNS = {  # name: (checkpoint, processes, strategy, batch, ctx_len, data)
    "tiny-1p": ("tiny", 1, "ddp", 4, 128, "data"),
    "tiny-ddp": ("tiny", 2, "ddp", 4, 128, "data"),
    "tiny-fsdp": ("tiny", 2, "fsdp", 4, 128, "data"),
    "wide-1p": ("wide", 1, "ddp", 4, 512, "data_small_vocab"),
}


def measured(files, name):
    """A TINY_RUNS run's results, run once per module (the dry-run test reuses the 1-process ones)."""
    key = ("measured", name)
    if key not in files:
        ckpt, nproc, strategy, batch, ctx, data = TINY_RUNS[name]
        files[key] = measure(files, name, files[ckpt], nproc, strategy, batch, ctx, data)
    return files[key]


@pytest.mark.parametrize("name", TINY_RUNS)
def test_estimate_within_20_percent_of_measured_peak(files, name):
    results = measured(files, name)
    _assert_within(results, name)
    if name == "wide-1p":  # the shape this run exists for: activations are most of the estimate
        terms = results[0][1]["terms"]
        assert terms["activations"] + terms["retained"] > 0.5 * results[0][1]["bytes"]


# DPO runs chosen and rejected together, each whole, and in full mode keeps a frozen fp32 copy of
# the model as its reference: 8 sequences of about 450 tokens on a 512-wide shape, where the
# activations are a third of the peak.
C512 = dict(n_layer=4, n_embd=512, head_size=64, vocab=65536, d_decay=32, d_aaa=32, d_mv=32, d_gate=64)


def _pairs(path: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    words = np.array(["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "eats", "the", "a", "big"])
    text = lambda k: " ".join(rng.choice(words, k))  # noqa: E731 (about one token per word)
    path.write_text("".join(json.dumps({"prompt": text(50), "chosen": text(400), "rejected": text(390)}) + "\n"
                            for _ in range(n)))
    return str(path)


@pytest.mark.parametrize("pairs_per_step", [2, 4], ids=["2-pairs", "4-pairs"])
def test_dpo_estimate_counts_both_sequences_and_the_reference_copy(files, pairs_per_step):
    """2 steps of DPO pairs (each about 2 x 450 tokens) on a 512-wide model. 2 pairs a step: the
    estimate is within tolerance and planning the run as SFT gives clearly less. 4 pairs a step
    (RWKVTUNE_SLOW_TESTS=1, about a minute): activations large enough that the SFT plan falls outside
    the tolerance of the measured peak itself (with 2 pairs it is only about 18% low)."""
    if pairs_per_step == 4 and os.environ.get("RWKVTUNE_SLOW_TESTS") != "1":
        pytest.skip("4 pairs a step take about a minute on 2 cores: set RWKVTUNE_SLOW_TESTS=1")
    if "c512" not in files:
        files["c512"] = write_checkpoint(files["dir"] / "c512.pth", dtype=torch.bfloat16, **C512)
    name = f"pairs{pairs_per_step}"
    files[name] = _pairs(files["dir"] / f"{name}.jsonl", 2 * pairs_per_step)
    results = measure(files, f"dpo-{name}", files["c512"], batch=pairs_per_step, ctx=1024, data=name,
                      extra=("method=dpo",))
    _assert_within(results, "dpo full")
    measured_peak, estimate = results[0]
    assert estimate["settings"]["rows"] == 2 and estimate["settings"]["ctx_len"] >= 400
    assert estimate["terms"]["reference"] > 0
    # planned as SFT (one sequence per item, no reference copy) the estimate is too low
    as_sft = Settings(**{**estimate["settings"], "rows": 1, "reference_copy": False})
    sft_peak = estimate_memory(load_model_config(files["c512"]), as_sft).peak
    assert sft_peak < 0.9 * estimate["bytes"]
    if pairs_per_step == 4:
        assert sft_peak < (1 - TOLERANCE) * measured_peak


@pytest.fixture(scope="module")
def slow():
    if os.environ.get("RWKVTUNE_SLOW_TESTS") != "1":
        pytest.skip("0.1B runs take about a minute each on 2 cores: set RWKVTUNE_SLOW_TESTS=1")


@pytest.mark.parametrize("nproc,strategy", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_estimate_within_20_percent_on_the_0_1b_shape(files, slow, nproc, strategy):
    """B=2, T=128: the weights and AdamW's state (12 B per parameter) dominate; activations and the loss
    slices are about a fifth."""
    if "m01" not in files:
        files["m01"] = write_checkpoint(files["dir"] / "m01.pth", dtype=torch.bfloat16, **M01)
    results = measure(files, f"m01-{nproc}-{strategy}", files["m01"], nproc, strategy, 2, 128)
    _assert_within(results, f"0.1B {nproc} x {strategy}")
    terms = results[0][1]["terms"]
    assert terms["activations"] + terms["loss"] > 0.1 * results[0][1]["bytes"]


@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_dry_run_estimate_matches_the_measured_peak(files, shape):
    """What `--dry-run` reports (issue 9) is within 20% of a real run's peak with the same settings."""
    ckpt, _, _, batch, ctx, data = TINY_RUNS[f"{shape}-1p"]
    args = ["train", "--model", files[ckpt], "--data", files[data], "--out", str(files["dir"] / f"dry-{shape}"),
            "--ctx-len", str(ctx), "--batch-size", str(batch), "--dry-run", "--json"]
    res = subprocess.run([sys.executable, "-m", "rwkvtune", *args], capture_output=True, text=True, timeout=300,
                         env=ENV)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    peak, _ = measured(files, f"{shape}-1p")[0]
    assert abs(report["memory_estimate_gib"] * GIB / peak - 1) <= TOLERANCE
    assert f"memory estimate {report['memory_estimate_gib']:.1f} GiB" in res.stderr


# ---- the estimator's pieces against the code they model ----------------------------------------------
def test_constants_are_the_codes():
    from rwkvtune.models.rwkv7.wkv import DEFAULT_CHUNK_SIZE
    from rwkvtune.train import memory
    from rwkvtune.train.loss import DEFAULT_CHUNK_TOKENS

    assert (memory.WKV_CHUNK, memory.LOSS_ROWS) == (DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_TOKENS)


@pytest.mark.parametrize("size", ["0.1b", "13.3b"])
@pytest.mark.parametrize("mode,precision,parts", [("full", "fp32", ()), ("lora", "bf16", ()), ("lora", "fp32", ("ln", "emb")),
                                                  ("state", "bf16", ())])
def test_inventory_counts_what_the_mode_builds(size, mode, precision, parts):
    """Parameters, trainable parameters and stored bytes of the prepared module (meta device)."""
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.peft import get_mode

    c = load_model_config(size)
    cfg = TrainConfig(model=size, data="x", mode=mode, precision=precision, train_parts=parts)
    with torch.device("meta"):
        module = TrainModule.for_mode(get_mode(mode), RWKV7(c), cfg)
    params = list(module.parameters())
    inv = inventory(c, Settings(mode=mode, precision=precision, train_parts=parts))
    assert inv.n_params == sum(p.numel() for p in params)
    assert inv.trainable == sum(p.numel() for p in params if p.requires_grad)
    assert inv.stored == sum(p.numel() * p.element_size() for p in params)
    kept = getattr(module.model, "lora_part_originals", {})
    assert inv.originals == sum(t.numel() * t.element_size() for t in kept.values())


def _saved_bytes(c, mode, precision, T, bf16_weights=False, packed=False) -> int:
    """Bytes autograd keeps for backward (saved-tensor hooks, each storage once, parameters excluded)."""
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.peft import get_mode

    torch.manual_seed(0)
    module = TrainModule.for_mode(get_mode(mode), RWKV7.from_config(c, seed=0).train(), TrainConfig(model="x", data="x", mode=mode,
                                                                                      precision=precision))
    if bf16_weights:
        module.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        doc_start = None
        if packed:  # documents of 7, 20, 33, ... tokens: starts inside chunks and on their edges
            doc_start = torch.zeros(1, T, dtype=torch.bool)
            doc_start[0, torch.tensor([0, 7, 27, 32, 60, 64, 71]) % T] = True
        module.hidden(torch.randint(0, c.vocab_size, (1, T)), doc_start=doc_start)
    return sum(seen.values())


@pytest.mark.parametrize("mode,precision,fsdp,packed", [("full", "fp32", False, False), ("lora", "fp32", False, False),
                                                        ("state", "fp32", False, False), ("full", "bf16", False, False),
                                                        ("full", "bf16", True, False), ("lora", "bf16", False, False),
                                                        ("state", "bf16", False, False), ("full", "fp32", False, True),
                                                        ("lora", "fp32", False, True)])
def test_saved_activations_per_layer_match_autograd(mode, precision, fsdp, packed):
    """One more layer adds saved_per_token_layer x T bytes (+ autocast's bf16 copies of its matrices),
    measured with saved-tensor hooks on a shape unlike any the coefficients were fitted on."""
    import dataclasses

    base = dataclasses.replace(load_model_config("0.1b"), n_embd=192, head_size_a=32, dim_ffn=576, vocab_size=512,
                               dim_att_lora=24, dim_aaa_lora=40, dim_mv_lora=16, dim_gate_lora=56)
    two, three = (dataclasses.replace(base, n_layer=n) for n in (2, 3))
    # T = 96: whole WKV chunks (exact); T = 80: padded to 96 inside the kernel (a few more padded
    # tensors than the formula counts: within 3%)
    for T, rel in ((96, 1e-9), (80, 0.03)):
        measured = (_saved_bytes(three, mode, precision, T, fsdp, packed)
                    - _saved_bytes(two, mode, precision, T, fsdp, packed))
        s = Settings(mode=mode, precision=precision, ctx_len=T, wkv="chunked", device="gpu" if fsdp else "cpu",
                     strategy="fsdp" if fsdp else "ddp", packing=packed)
        inv = inventory(three, s)
        expected = saved_per_token_layer(three, s, inv) * T
        fewer = inventory(two, s)
        if precision == "bf16" and mode == "full" and not fsdp:  # one layer's bf16 casts of its matrices
            expected += 2 * (inv.block_matrices - fewer.block_matrices)
        if precision == "bf16" and mode == "lora":  # one layer's bf16 casts of its adapters
            expected += 2 * (inv.adapters - fewer.adapters)
        assert measured == pytest.approx(expected, rel=rel), T


# ---- the check before a run -----------------------------------------------------------------------
SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


@pytest.fixture(scope="module")
def small(files):
    return {"ckpt": write_checkpoint(files["dir"] / "small.pth", **SMALL), "data": files["data"], "dir": files["dir"]}


def _cfg(small, out, **kw):
    base = dict(model=small["ckpt"], data=small["data"], out=str(out), ctx_len=128, batch_size=8, max_steps=1,
                save_every=0, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _with_memory(monkeypatch, gib: float):
    monkeypatch.setattr(memory_check, "available_memory", lambda device: int(gib * GIB))


def test_a_run_that_does_not_fit_is_refused_before_loading_weights(small, tmp_path, monkeypatch):
    from rwkvtune.train import trainer

    built = []
    monkeypatch.setattr(trainer, "build_module", lambda *a, **k: built.append(1))
    _with_memory(monkeypatch, 0.6)  # batch 8 x 128 rows of a 65536 vocab: ~1 GiB of loss slices alone
    with pytest.raises(memory_check.InsufficientMemoryError) as e:
        trainer.train(_cfg(small, tmp_path / "o"))
    msg = str(e.value)
    assert not built and not (tmp_path / "o").exists()
    assert "GiB is available on cpu" in msg and "--no-memory-check (memory_check: false)" in msg
    # The fix is computed: its batch size and accumulation keep the batch of 8 and fit the budget.
    import re

    b, accum = map(int, re.search(r"--batch-size (\d+) --grad-accum (\d+)", msg).groups())
    assert b * accum == 8 and b < 8
    c = load_model_config(small["ckpt"])

    def peak(batch):
        return estimate_memory(c, Settings(batch_size=batch, ctx_len=128, file_bytes=os.path.getsize(small["ckpt"]))).peak

    assert peak(b) <= 0.9 * 0.6 * GIB < min(peak(k) for k in range(b + 1, 9) if 8 % k == 0)  # the largest that fits


def test_the_override_runs_anyway_with_a_warning(small, tmp_path, monkeypatch, capsys):
    from rwkvtune.train.trainer import train

    _with_memory(monkeypatch, 0.6)
    summary = train(_cfg(small, tmp_path / "o", memory_check=False))
    assert summary["steps"] == 1
    assert "warning: memory: this run needs about" in capsys.readouterr().err


def test_cli_refusal_is_one_line_and_the_flag_overrides(small, tmp_path, monkeypatch, capsys):
    from rwkvtune.cli import main

    _with_memory(monkeypatch, 0.6)
    args = ["train", "--model", small["ckpt"], "--data", small["data"], "--ctx-len", "128", "--batch-size", "8",
            "--max-steps", "1"]
    assert main(args + ["--out", str(tmp_path / "a"), "tensorboard=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: memory: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(args + ["--out", str(tmp_path / "b"), "--no-memory-check", "tensorboard=false"]) == 0
    assert main(args + ["--out", str(tmp_path / "c"), "tensorboard=false", "memory_check=false"]) == 0


def test_a_machine_with_enough_memory_runs_and_no_window_is_ctx_len_long(small, tmp_path, capsys):
    """ctx_len 2**24 (the largest the bounds allow) over 64k tokens of data: windows hold the data's
    longest window, memory is planned for it, and nothing of ctx_len is ever allocated (issue 14)."""
    from rwkvtune.data.dataset import BinIdxWindows, PackedDataset
    from rwkvtune.data.formats import Sample
    from rwkvtune.train.trainer import train

    assert BinIdxWindows(small["data"], 10 ** 9)[0]["input_ids"].shape == (1024 * 64,)
    docs = [Sample(np.array([5, 6, 7, 0]), np.ones(4, bool)), Sample(np.array([8, 0]), np.ones(2, bool))]
    assert PackedDataset(docs, 10 ** 9)[0]["input_ids"].shape == (6,)  # 0 5 6 7 0 8 (targets 5 6 7 0 8 0)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "red blue green cat dog bird."}) + "\n")
    assert train(_cfg(small, tmp_path / "o", data=str(one), ctx_len=2 ** 24, batch_size=1))["steps"] == 1
    assert "ctx_len 16,777,216 is longer than the data's longest window" in capsys.readouterr().err


def test_a_ctx_len_the_memory_cannot_hold_is_refused_naming_one_that_fits(small, tmp_path, monkeypatch):
    from rwkvtune.train.trainer import train

    _with_memory(monkeypatch, 1.5)
    with pytest.raises(memory_check.InsufficientMemoryError, match=r"--ctx-len \d+ \("):
        train(_cfg(small, tmp_path / "o", ctx_len=2 ** 24, batch_size=1))  # one window of 65536 tokens


@pytest.mark.parametrize("gib,fits", [(1024.0, True), (12.0, False)])
def test_missing_model_file_advice_never_leads_into_an_unfitting_run(small, tmp_path, monkeypatch, capsys, gib, fits):
    """The 0.1B's recommended batch 8 x 1024 from scratch needs ~19 GiB: on a smaller machine the
    --init scratch advice carries a batch that fits (issue 14)."""
    from rwkvtune.cli import main

    _with_memory(monkeypatch, gib)
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(tmp_path / "empty"))
    assert main(["train", "--model", "0.1b", "--data", small["data"], "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model file not found" in err and "--init scratch" in err
    if fits:
        assert err.rstrip().endswith("or train from scratch with --init scratch")
        return
    import re

    b, accum = map(int, re.search(r"--init scratch --batch-size (\d+) --grad-accum (\d+)", err).groups())
    c = load_model_config("0.1b")
    assert b * accum == 8
    assert estimate_memory(c, Settings(batch_size=b, ctx_len=1024, init="scratch")).peak <= 0.9 * gib * GIB
    assert estimate_memory(c, Settings(batch_size=8, ctx_len=1024, init="scratch")).peak > 0.9 * gib * GIB


def test_dry_run_never_materialises_weights(small, tmp_path, monkeypatch):
    """--dry-run --init scratch of the 13.3B (53 GB in fp32) builds on the meta device (issue 14)."""
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.train.trainer import train

    def refuse(*a, **k):
        raise AssertionError("weights materialised in a dry run")

    for name in ("from_config", "from_checkpoint", "init_weights_"):
        monkeypatch.setattr(RWKV7, name, refuse)
    for model, init in (("13.3b", "scratch"), (small["ckpt"], "pretrained")):
        report = train(_cfg(small, tmp_path / "d", model=model, init=init), dry_run=True)
        c = load_model_config(model)
        assert report["trainable_params"] + report["unused_params"] == c.n_params
        assert report["memory_estimate"]["settings"]["init"] == init


# ---- rwkvtune plan ------------------------------------------------------------------------------------
def test_plan_table_marks_what_fits_and_names_the_cheapest(capsys):
    from rwkvtune.cli import main
    from rwkvtune.train import plan

    assert main(["plan", "7.2b", "--host-memory", "4096"]) == 0  # RAM for any launch: the cards decide
    out = capsys.readouterr().out
    c = load_model_config("7.2b")
    rows = plan.launches(c, 1024, 1)
    table = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in plan.MODES]
    assert len(table) == len(rows) == 27  # 3 modes x {1, 2, 8} GPUs x {ddp, fsdp, fsdp+offload}
    for cells, r in zip(table, rows):
        assert cells[:3] == [r.mode, str(r.gpus), r.name] and float(cells[3]) == round(r.estimate.peak_gib, 1)
        assert cells[5:] == ["yes" if r.fits(gib) else "-" for gib in plan.CARDS.values()]
    for card, gib in plan.CARDS.items():  # the named one is the first fit in (GPUs, strategy, mode) order
        first = min((r for r in rows if r.fits(gib)), key=lambda r: (r.gpus, plan.LAUNCHES.index((r.strategy, r.offload)),
                                                                     plan.MODES.index(r.mode)))
        assert f"  {card} GB: {first.describe()}" in out
    assert "RWKV7-7.2B (ctx_len 1024, batch 1) full fine-tune on two GPUs:" in out
    assert "13.3B" not in out  # only the size asked for (issue 22)


def test_plan_estimates_behave_like_the_strategies():
    """Sharding over more GPUs never needs more memory per GPU; offloading never more than not; ddp on
    more GPUs adds its gradient buckets; checkpointing and lora need less than a full fine-tune."""
    from rwkvtune.train import plan

    for size in plan.SIZES:
        c = load_model_config(size)
        rows = {(r.mode, r.gpus, r.name): r.estimate.peak for r in plan.launches(c, c.recommended_ctx_len,
                                                                                c.recommended_batch_size)}
        for mode in plan.MODES:
            assert rows[(mode, 1, "fsdp")] >= rows[(mode, 2, "fsdp")] >= rows[(mode, 8, "fsdp")]
            for n in plan.GPU_COUNTS:
                assert rows[(mode, n, "fsdp+offload")] <= rows[(mode, n, "fsdp")]
        assert rows[("full", 2, "ddp")] > rows[("full", 1, "ddp")]
        assert rows[("lora", 1, "ddp")] < rows[("full", 1, "ddp")]
        gpu = Settings(precision="bf16", ctx_len=c.recommended_ctx_len, device="gpu")
        step = [estimate_memory(c, gpu.replace(grad_checkpoint=ckpt)).phases["step"] for ckpt in (True, False)]
        assert step[0] < step[1]


def test_plan_is_fast_without_torch_and_checks_its_input():
    code = ("import sys; from rwkvtune.cli import main; s = main(['plan']); "
            "sys.exit(10 + s if 'torch' in sys.modules else s)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert all(f"RWKV7-{s.upper()}:" in res.stdout for s in ("0.1B", "0.4B", "1.5B", "2.9B", "7.2B", "13.3B"))
    for bad, words in ((["--ctx-len", "0"], "--ctx-len: found 0"), (["--gpu-memory", "-1"], "--gpu-memory"),
                       (["9b"], "unknown model '9b'")):
        res = subprocess.run([sys.executable, "-m", "rwkvtune", "plan", *bad], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr


def test_plan_json_and_custom_cards(capsys):
    from rwkvtune.cli import main

    assert main(["plan", "1.5b", "--gpu-memory", "16", "--ctx-len", "2048", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["1.5b"]
    assert len(rows) == 27 and all(r["per_gpu_gib"] > 0 for r in rows)
    assert main(["plan", "1.5b", "--gpu-memory", "16", "40"]) == 0
    out = capsys.readouterr().out
    assert "fits (GB):   16   40" in out and "  16 GB: " in out and "  40 GB: " in out


@pytest.mark.parametrize("train_args,card,expected", [
    (["--model", "7.2b"], "80", "--strategy fsdp"),
    (["--mode", "lora"], "48", "--strategy ddp"),
    (["--model", "7.2b"], "48", "--strategy fsdp --cpu-offload"),
])
def test_pick_prints_the_flags_of_the_cheapest_launch_that_fits(capsys, train_args, card, expected):
    from rwkvtune.cli import main
    from rwkvtune.train import plan

    assert main(["plan", "7.2b", "--pick", "--gpus", "2", "--gpu-memory", card, "--host-memory", "1024",
                 "--train-args", *train_args]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == expected and "fits" in cap.err
    mode = "lora" if "lora" in train_args else "full"
    rows = plan.launches(load_model_config("7.2b"), 1024, 1, modes=(mode,), gpu_counts=(2,))
    assert plan.cheapest(rows, plan.card_gib(float(card))).train_args() == expected.split()


# ---- examples/train_with_config.sh on a machine with GPUs -------------------------------------------
def test_train_with_config_script_runs_torchrun_with_the_planned_strategy_on_two_gpus(tmp_path):
    """A stand-in python reports two 80 GB GPUs and prints the torchrun command instead of running it;
    `rwkvtune plan --pick` runs for real."""
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-c" ]; then echo "2 79.65"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "torch.distributed.run" ]; then echo "TORCHRUN $*"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "rwkvtune" ] && [ "$3" = "plan" ]; then  # and 512 GiB of RAM
  exec {sys.executable} -m rwkvtune plan --host-memory 512 "${{@:4}}"
fi
exec {sys.executable} "$@"
""")
    shim.chmod(0o755)
    env = dict(os.environ, PYTHON=str(shim), OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(REPO / "examples" / "train_with_config.sh"), "7.2b", "--max-steps", "5"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("TORCHRUN -m torch.distributed.run --standalone --nproc-per-node 2 -m rwkvtune train")
    assert "--model 7.2b" in res.stdout and "--strategy fsdp --max-steps 5" in res.stdout
    assert "plan: RWKV7-7.2B full on 2 GPUs with fsdp" in res.stderr


def test_the_seeds_command_on_a_24_gib_machine_fails_fast_naming_the_fix(small, tmp_path, monkeypatch, capsys):
    """`bash examples/train_with_config.sh 0.1b` with the release file present: a full fine-tune at the
    recommended batch 8 x 1024 needs ~27 GiB on CPU, so with 21 GiB available (a 24 GiB machine) it
    stops before loading weights and names what fits; the same effective batch in smaller pieces runs."""
    from rwkvtune.cli import main
    from rwkvtune.train import trainer

    models = tmp_path / "models"
    models.mkdir()
    with open(models / load_model_config("0.1b").model_file, "wb") as f:
        f.truncate(382_262_075)  # a bf16 release file's size (sparse: never read, the check comes first)
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(models))
    monkeypatch.setattr(trainer, "build_module", lambda *a, **k: pytest.fail("weights loaded"))
    _with_memory(monkeypatch, 21.0)
    sample = str(REPO / "rwkvtune" / "assets" / "sample.jsonl")
    assert main(["train", "--model", "0.1b", "--data", sample, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: memory: this run needs about" in err and "21.0 GiB is available on cpu" in err
    assert "to fit: --batch-size 4 --grad-accum 2 (the same effective batch of 8" in err


def test_estimate_gib_is_what_the_dry_run_reports(small, tmp_path):
    """The helper bench scripts call (bench/bench_gpu.py prints it beside the measured peak)."""
    from rwkvtune.train.memory import estimate_gib
    from rwkvtune.train.trainer import train

    cfg = _cfg(small, tmp_path / "d")
    report = train(cfg, dry_run=True)
    c = load_model_config(small["ckpt"])
    gib = estimate_gib(c, cfg.resolve(c), tokens=report["memory_estimate"]["settings"]["ctx_len"])
    assert round(gib, 2) == report["memory_estimate_gib"]


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_lora_with_a_quantized_base_estimate_within_20_percent(files, kind):
    """LoRA over a quantized base (--base-quant) on the quickstart shape: the quantized head, its
    dequantized copy per product and the quantization temporaries at load are in the estimate."""
    results = measure(files, f"tiny-lora-{kind}", files["tiny"], batch=4, ctx=128,
                      extra=("--mode", "lora", "--base-quant", kind))
    _assert_within(results, f"tiny-lora-{kind}")
    assert results[0][1]["terms"]["dequant"] > 0
