"""Defaults that work the first time (issue 22): a schedule that cannot learn says what to change,
``--dry-run`` leads with its verdict, and ``plan`` weighs host RAM."""

import json
import re
import subprocess
import sys

import pytest

from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.setup_checks import MIN_LEARNING_STEPS, schedule_warnings


def _schedule(per_epoch=None, **kw):
    """A resolved config and its step count: ``per_epoch`` steps per pass over the data (the run
    has epochs x per_epoch steps), or --max-steps."""
    cfg = TrainConfig(**{"lr": 1e-5, "lr_final": 1e-6, "batch_size": 1, **kw})
    return cfg, cfg.max_steps or cfg.epochs * per_epoch


def _follow(cfg, total, per_epoch, advice: str):
    """The config and steps after applying the first fix of ``advice`` (the flags it names)."""
    first = advice.split(", or ")[0]
    changes = dict(re.findall(r"--([a-z-]+) (?:to )?(\d+)", first))
    new = TrainConfig(**{**cfg.to_dict(), **{k.replace("-", "_"): int(v) for k, v in changes.items()}})
    return new, new.max_steps or new.epochs * per_epoch


def test_the_default_run_on_a_small_file_says_it_cannot_learn_and_what_to_change():
    # The run: own .pth, defaults, a small file: ctx 1024, batch 1 -> 2 windows, 2 steps, warmup 10.
    cfg, total = _schedule(per_epoch=2, warmup_steps=10)
    [line] = schedule_warnings(cfg, total)
    assert line.startswith("warning: warmup_steps 10 >= the run's 2 steps: the learning rate only reaches 1.09e-06 "
                           "of its peak 1e-05, so the loss may barely move; lower --warmup-steps to 1 and pass "
                           "--epochs 5 (10 steps, 1 of warmup), or keep --warmup-steps 10 with --epochs 50 (100 steps)")
    assert line.endswith("more data also gives more steps per epoch")
    new, steps = _follow(cfg, total, 2, line)
    assert (new.epochs, new.warmup_steps, steps) == (5, 1, 10) and schedule_warnings(new, steps) == []


@pytest.mark.parametrize("per_epoch, kw", [
    (2, dict(warmup_steps=10)),
    (1, dict(warmup_steps=0)),
    (3, dict(warmup_steps=2, epochs=2)),
    (7, dict(warmup_steps=0, grad_accum=2)),
    (40, dict(warmup_steps=50)),
    (None, dict(warmup_steps=10, max_steps=3)),
    (None, dict(warmup_steps=0, max_steps=9)),
    (None, dict(warmup_steps=500, max_steps=100)),
])
def test_every_schedule_that_cannot_learn_is_named_and_its_advice_gives_one_that_can(per_epoch, kw):
    cfg, total = _schedule(per_epoch, **kw)
    assert total < MIN_LEARNING_STEPS or cfg.warmup_steps >= total
    [line] = schedule_warnings(cfg, total)
    assert f"{total} " in line and "so the loss may barely move" in line
    new, steps = _follow(cfg, total, per_epoch, line)
    assert steps >= MIN_LEARNING_STEPS and new.warmup_steps < steps
    assert schedule_warnings(new, steps) == [], line
    if per_epoch is None:
        assert "--epochs" not in line and "more data" not in line  # --max-steps decides the length
    if cfg.batch_size * cfg.grad_accum > 1 and per_epoch:
        assert "a smaller --batch-size or --grad-accum" in line


def test_a_schedule_that_learns_is_not_warned_about():
    for per_epoch, kw in [(10, dict(warmup_steps=1)), (5, dict(warmup_steps=0, epochs=2)),
                          (None, dict(warmup_steps=10, max_steps=11))]:
        assert schedule_warnings(*_schedule(per_epoch, **kw)) == []


# ---- rwkvtune plan weighs host RAM -------------------------------------------------------------------
def test_plan_for_a_24_gb_card_weighs_host_ram(capsys):
    """The issue's plan: 'cheapest that fits' a 24 GB card was a full fine-tune with fsdp+offload
    needing 123.7 GiB of host RAM; on a 64 GiB machine that does not fit, a LoRA one does."""
    from rwkvtune.cli import main
    from rwkvtune.train import plan
    from rwkvtune.configs.model_loader import load_model_config

    assert main(["plan", "7.2b", "--gpu-memory", "24", "--host-memory", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host RAM: 64.0 GiB (from --host-memory); a launch fits when its processes (one per GPU, "
                          "on this machine) need at most 90% of it")
    rows = plan.launches(load_model_config("7.2b"), 1024, 1)
    offload = next(r for r in rows if (r.mode, r.gpus, r.name) == ("full", 1, "fsdp+offload"))
    assert offload.fits(plan.card_gib(24)) and not offload.fits(plan.card_gib(24), 64)  # 123.7 GiB of RAM
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("full      1  fsdp+offload")] == ["ram"]
    best = plan.cheapest(rows, plan.card_gib(24), host_gib=64)
    assert (best.mode, best.gpus, best.name) == ("lora", 1, "fsdp+offload") and best.host_bytes <= 0.9 * 64 * 2 ** 30
    assert f"  24 GB: {best.describe()}" in out and "123.7 GiB of host RAM)   [" not in out
    assert "13.3B" not in out


def test_plan_defaults_to_this_machines_ram_and_says_so(capsys, monkeypatch):
    from rwkvtune.cli import main
    from rwkvtune.train import memory_check

    total = memory_check.host_total()
    with open("/proc/meminfo") as f:
        mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < total <= mem_total
    monkeypatch.setattr(memory_check, "host_total", lambda: 20 * 2 ** 30)
    assert main(["plan", "7.2b", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host RAM: 20.0 GiB (this machine's total; --host-memory GIB plans for another)")
    # nothing fits 18 GiB of RAM on a 24 GB card: said, with the launch the card alone would take
    assert "  24 GB: nothing fits 20 GiB of host RAM (the card alone fits full on 1 GPU with fsdp+offload" in out
    assert main(["plan", "7.2b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["7.2b"]
    assert all(r["host_memory_gib"] == 20.0 for r in rows)
    assert all(r["fits_host_memory"] == (r["host_gib_per_process"] * r["gpus"] <= 18.0 + 0.01) for r in rows)


@pytest.mark.parametrize("mode, host, flags, verdict", [
    ("lora", "64", "--strategy fsdp --cpu-offload", ": fits;"),
    ("full", "256", "--strategy fsdp --cpu-offload", ": fits;"),
    ("full", "64", "--strategy ddp", ": does not fit"),  # the least memory in RAM; the trainer then names a fix
])
def test_pick_weighs_host_ram(capsys, mode, host, flags, verdict):
    from rwkvtune.cli import main

    assert main(["plan", "7.2b", "--pick", "--gpus", "1", "--gpu-memory", "24", "--host-memory", host,
                 "--train-args", "--mode", mode]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == flags and verdict in cap.err and f"host RAM: {float(host):.1f} GiB" in cap.err


def test_plan_host_memory_out_of_range_is_one_line():
    for bad in ("0", "-5", "nan"):
        res = subprocess.run([sys.executable, "-m", "rwkvtune", "plan", "7.2b", "--host-memory", bad],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "--host-memory" in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


# ---- rwkvtune train --dry-run: the verdict first, the JSON with --json ----------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import write_checkpoint

    d = tmp_path_factory.mktemp("tiny")
    ckpt = write_checkpoint(d / "base.pth", n_layer=1, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8,
                            d_mv=8, d_gate=8)
    data = d / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"red blue green cat dog bird {i}."}) + "\n" for i in range(8)))
    return ["train", "--model", ckpt, "--data", str(data), "--out", str(d / "run"), "--ctx-len", "8",
            "--batch-size", "2", "--dry-run"]


def test_dry_run_prints_a_short_summary_with_the_verdict_first(tiny, capsys, monkeypatch):
    from rwkvtune.cli import main
    from rwkvtune.train import memory_check

    # The two runs below compare their summaries line for line: the free memory they quote must not move
    # between them (on CI the other test worker allocates meanwhile).
    monkeypatch.setattr(memory_check, "available_memory", lambda device: 16 * 2 ** 30)

    assert main(tiny) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0].startswith("dry run: ready with 1 warning(s): base, mode full: ") and "memory estimate" in lines[0]
    assert len(lines) <= 12 and "{" not in cap.out  # not the ~200 lines of JSON
    assert any(line.startswith("  schedule  ") and "steps" in line for line in lines)
    assert any(line.startswith("warning: warmup_steps 10 >= the run's ") for line in lines)  # what the run warns
    assert lines[-1] == "full report (every setting, the model's dims, the memory terms): add --json"
    assert "dry run:" not in cap.err

    assert main([*tiny, "--json"]) == 0
    cap = capsys.readouterr()
    report = json.loads(cap.out)  # for tools: the whole report, the summary on stderr
    assert report["config"]["ctx_len"] == 8 and report["warnings"] and report["item_name"] == "windows"
    assert cap.err.splitlines()[0] == lines[0]


def test_dry_run_verdict_names_what_would_stop_the_run(tiny, capsys, monkeypatch):
    from rwkvtune.cli import main
    from rwkvtune.train import memory_check

    monkeypatch.setattr(memory_check, "available_memory", lambda device: 2 ** 20)  # 1 MiB
    assert main([*tiny, "--max-steps", "20", "--warmup-steps", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dry run: NOT READY: base, mode full:")
    assert lines[1].startswith("  problem: too much for this device: ")
    assert not any(line.startswith("warning:") for line in lines)  # 20 steps, no warmup: a schedule that learns
