"""The memory planner's estimate against the measured peak of real training runs (CPU).

Usage: python bench/bench_memory.py [--quick] [--only NAME ...] [--malloc-live]

Each run is `rwkvtune train` (2 optimizer steps, then final.pth and the resumable checkpoint, as
every run ends) under tests/memory_probe.py: per process, the peak RSS over the RSS just before the
trainer builds the model (the high-water mark is reset there), next to the estimate the trainer's
memory check computed for that process. Two processes run under torchrun (gloo). Data: binidx with
every window full (the estimate plans for full windows). Checkpoints: random weights in bf16, the
dims of the quickstart's tiny model, a wide small-vocab shape, a 512-wide 8-layer shape, the 0.1B.

``--malloc-live`` sets MALLOC_MMAP_THRESHOLD_=65536 for the runs: every tensor of 64 KiB or more is
then its own mapping, returned when freed, so RSS follows the live tensor bytes; the estimate's CPU
heap terms (retained, heap growth, FSDP heap sets) are what default glibc adds on top. Memory is not
sensitive to other processes on the machine; time is, and this script does not report it.
The full grid takes about 15 minutes on 2 cores and needs about 10 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
PROBE = ROOT / "tests" / "memory_probe.py"
SHAPES = {
    "tiny": dict(n_layer=4, n_embd=128, head_size=32, vocab=65536, d_decay=32, d_aaa=32, d_mv=32, d_gate=32),
    "wide": dict(n_layer=4, n_embd=256, head_size=64, vocab=1024, d_decay=32, d_aaa=32, d_mv=32, d_gate=64),
    "c512": dict(n_layer=8, n_embd=512, head_size=64, vocab=65536, d_decay=64, d_aaa=64, d_mv=32, d_gate=128),
    "0.1b-wide-2": dict(n_layer=2, n_embd=768, head_size=64, vocab=1024, d_decay=64, d_aaa=64, d_mv=32, d_gate=128),
    "0.1b": dict(n_layer=12, n_embd=768, head_size=64, vocab=65536, d_decay=64, d_aaa=64, d_mv=32, d_gate=128),
}
# name: (shape, processes, strategy, mode, batch, ctx_len, extra train args)
GRID = {
    "tiny full": ("tiny", 1, "ddp", "full", 4, 128, ()),
    "tiny lora": ("tiny", 1, "ddp", "lora", 4, 128, ()),
    "tiny state": ("tiny", 1, "ddp", "state", 4, 128, ()),
    "tiny full T1024": ("tiny", 1, "ddp", "full", 4, 1024, ()),
    "tiny 2x ddp": ("tiny", 2, "ddp", "full", 4, 128, ()),
    "tiny 2x fsdp": ("tiny", 2, "fsdp", "full", 4, 128, ()),
    "wide full": ("wide", 1, "ddp", "full", 4, 512, ()),
    "wide lora": ("wide", 1, "ddp", "lora", 4, 512, ()),
    "wide state": ("wide", 1, "ddp", "state", 4, 512, ()),
    "wide ckpt": ("wide", 1, "ddp", "full", 4, 512, ("--grad-checkpoint",)),
    "c512 full T1024": ("c512", 1, "ddp", "full", 2, 1024, ()),
    "c512 2x fsdp": ("c512", 2, "fsdp", "full", 2, 128, ()),
    "0.1b L2 8x1024": ("0.1b-wide-2", 1, "ddp", "full", 8, 1024, ()),  # the seed's tensor sizes, 2 layers
    "0.1b full": ("0.1b", 1, "ddp", "full", 2, 128, ()),
    "0.1b full T512": ("0.1b", 1, "ddp", "full", 2, 512, ()),
    "0.1b full T1024": ("0.1b", 1, "ddp", "full", 2, 1024, ()),
    "0.1b lora": ("0.1b", 1, "ddp", "lora", 2, 512, ()),
    "0.1b state": ("0.1b", 1, "ddp", "state", 2, 512, ()),
    "0.1b ckpt": ("0.1b", 1, "ddp", "full", 2, 512, ("--grad-checkpoint",)),
    "0.1b 2x ddp": ("0.1b", 2, "ddp", "full", 2, 128, ()),
    "0.1b 2x fsdp": ("0.1b", 2, "fsdp", "full", 2, 128, ()),
}
QUICK = ("tiny full", "tiny 2x fsdp", "wide full", "0.1b full")


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run(name: str, tmp: Path, files: dict, live: bool) -> list[dict]:
    shape, nproc, strategy, mode, batch, ctx, extra = GRID[name]
    prefix, out = tmp / f"probe-{name.replace(' ', '_')}", tmp / f"out-{name.replace(' ', '_')}"
    data = files["small" if SHAPES[shape]["vocab"] <= 1024 else "data"]
    args = ["--model", files[shape], "--data", data, "--out", str(out), "--ctx-len", str(ctx), "--batch-size",
            str(batch), "--max-steps", "2", "--save-every", "0", "--mode", mode, f"strategy={strategy}",
            "tensorboard=false", *extra]
    cmd = [sys.executable, str(PROBE), str(prefix), "--", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", _port(),
               str(PROBE), str(prefix), "--", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a 0.1B run writes 2.7 GB of outputs
    if res.returncode:
        raise SystemExit(f"{name}: failed:\n{res.stderr[-3000:]}")
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    import torch

    from helpers import write_checkpoint, write_full_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--only", nargs="+", choices=list(GRID), metavar="NAME")
    ap.add_argument("--malloc-live", action="store_true", help="RSS follows live tensor bytes (see the docstring)")
    a = ap.parse_args()
    names = a.only or (QUICK if a.quick else list(GRID))
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as d:
        tmp = Path(d)
        files = {s: write_checkpoint(tmp / f"{s}.pth", dtype=torch.bfloat16, **SHAPES[s])
                 for s in {GRID[n][0] for n in names}}
        files.update(data=write_full_corpus(tmp / "data", 1024 * 64, 65536),
                     small=write_full_corpus(tmp / "small", 1024 * 64, 1024))
        print(f"malloc: {'MALLOC_MMAP_THRESHOLD_=65536 (live bytes)' if a.malloc_live else 'glibc default'}; "
              f"GiB per process, peak RSS over the pre-model baseline")
        print(f"{'run':<18}{'rank':>5}{'measured':>10}{'estimate':>10}{'est/meas':>9}  peak phase, largest terms")
        for name in names:
            t = time.perf_counter()
            for r in run(name, tmp, files, a.malloc_live):
                e, measured = r["estimate"], r["peak_over_baseline"] / 2 ** 30
                top = sorted(e["terms"].items(), key=lambda kv: -kv[1])[:3]
                terms = ", ".join(f"{k} {v / 2 ** 30:.2f}" for k, v in top)
                print(f"{name:<18}{r['rank']:>5}{measured:>10.2f}{e['gib']:>10.2f}{e['bytes'] / r['peak_over_baseline']:>9.2f}"
                      f"  {e['phase']}: {terms}  [{time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
