"""Peak memory and time of the head + cross-entropy (+ L2Wrap), unchunked vs chunked.

Usage: python bench/bench_loss.py [--T 4096] [--B 1] [--chunks 1024] [--runs 2] [--bf16]

Shape: the 0.1B model's head, C=768, V=65536, fp32 weights and hidden states (``--bf16`` runs
under bf16 autocast: very slow on CPUs without native bf16). One measurement is one forward +
backward of ``loss_sum(head(hidden), labels, 1e-4) / n`` (unchunked) or
``chunked_loss_sum(hidden, head, labels, 1e-4, chunk_tokens=K) / n`` (chunked), gradients of the
hidden states and of the head weight included. Every variant runs in a fresh subprocess, so its
peak RSS (VmHWM) is its own; the baseline is the RSS after building the inputs (torch, the head
weight and its gradient buffer allocated up front), so "loss peak" is what head + loss add.
Time: the median of ``--runs`` runs after one warm-up, wall clock and CPU time of the process (all
threads; less sensitive than wall time to other processes on shared cores).

This is a script that prints figures, not a test. It is sensitive to other processes sharing the
cores; the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
C, V = 768, 65536  # the 0.1B shape


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(B: int, T: int, chunk: int, runs: int, bf16: bool) -> dict:
    import contextlib

    import torch

    sys.path.insert(0, ROOT)
    from rwkvtune.train.loss import chunked_loss_sum, loss_sum

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(C, V, bias=False)
    head.weight.grad = torch.zeros_like(head.weight)  # the grad buffer exists in training anyway
    hidden = torch.randn(B, T, C, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    n = int(labels.numel())
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        with autocast():
            if chunk:
                loss = chunked_loss_sum(hidden, head, labels, 1e-4, chunk_tokens=chunk)
            else:
                loss = loss_sum(head(hidden), labels, 1e-4)
        (loss / n).backward()
        hidden.grad = None

    base = _status_mb("VmRSS")
    step()  # warm-up
    times, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"base_mb": base, "peak_mb": _status_mb("VmHWM"), "seconds": statistics.median(times),
            "cpu_seconds": statistics.median(cpu)}


def run_variant(B: int, T: int, chunk: int, runs: int, bf16: bool) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--B", str(B), "--T", str(T), "--chunk",
            str(chunk), "--runs", str(runs)] + (["--bf16"] if bf16 else [])
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"variant chunk={chunk} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--chunks", default="1024", help="comma-separated chunk_tokens values to compare")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.B, a.T, a.chunk, a.runs, a.bf16)))
        return
    import torch

    print(f"head + CE + L2Wrap, fwd+bwd: B={a.B} T={a.T} C={C} V={V} {'bf16 autocast' if a.bf16 else 'fp32'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'variant':>16} {'peak RSS MB':>12} {'baseline MB':>12} {'loss peak MB':>13} {'seconds':>8} "
          f"{'CPU s':>7}")
    for chunk in [0] + [int(c) for c in a.chunks.split(",") if c]:
        r = run_variant(a.B, a.T, chunk, a.runs, a.bf16)
        name = "unchunked" if chunk == 0 else f"chunk {chunk}"
        print(f"{name:>16} {r['peak_mb']:12.0f} {r['base_mb']:12.0f} {r['peak_mb'] - r['base_mb']:13.0f} "
              f"{r['seconds']:8.2f} {r['cpu_seconds']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
