"""Time the WKV-7 operator on CPU (fp32) at the 0.1B model's shape: B=1, T=512, H=12, N=64.

Usage: python bench/bench_wkv.py [--threads N] [--T 512] [--chunks 16,32,64]
Prints ms per call and tokens/s for: chunked no-grad forward, forward (grad enabled),
forward+backward, per chunk size; and the reference backend at T=1 (one decode step).
"""
import argparse
import os
import time

import torch

from rwkvtune.models.rwkv7.wkv import DEFAULT_CHUNK_SIZE, wkv7


def inputs(B, T, H, N, grad):
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, generator=g)  # noqa: E731
    r, k, v = rnd() * 0.5, rnd() * 0.5, rnd() * 0.5
    w = -0.606531 * torch.sigmoid(rnd())
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd())
    s = torch.randn(B, H, N, N, generator=g) * 0.1
    xs = [x.requires_grad_(grad) for x in (r, w, k, v, a, b, s)]
    return xs


def timeit(fn, budget, max_reps=200):
    """Best time per call over repeats (robust to other processes sharing the cores)."""
    times, t0 = [], time.perf_counter()
    while not times or (time.perf_counter() - t0 < budget and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--chunks", default="16,32,64")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, H, N = 1, args.T, 12, 64
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={B} T={T} H={H} N={N} fp32, "
          f"default chunk {DEFAULT_CHUNK_SIZE}, load average {os.getloadavg()[0]:.1f} at start")
    xs = inputs(B, T, H, N, True)
    gy = torch.randn(B, T, H, N)
    one = inputs(B, 1, H, N, False)
    xs64 = inputs(B, 64, H, N, True)
    cases = []  # (label, per-call unit, tokens per call, fn, budget per round)
    for L in [int(c) for c in args.chunks.split(",")]:
        def nograd(L=L):
            with torch.no_grad():
                wkv7(*xs, backend="chunked", chunk_size=L)

        def fwd(L=L):
            wkv7(*xs, backend="chunked", chunk_size=L)

        def fwdbwd(L=L):
            y, s = wkv7(*xs, backend="chunked", chunk_size=L)
            torch.autograd.backward([y, s], [gy, torch.ones_like(s)])

        for name, fn in (("no-grad fwd", nograd), ("fwd", fwd), ("fwd+bwd", fwdbwd)):
            cases.append((f"chunked   T={T} L={L:<3d} {name:12s}", "ms", B * T, fn, 0.7))

    def step():
        with torch.no_grad():
            wkv7(*one, backend="reference")

    def step_auto():
        with torch.no_grad():
            wkv7(*one)

    def ref64():
        y, s = wkv7(*xs64, backend="reference")
        torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])

    cases += [("reference T=1 decode step (no-grad)   ", "us", B, step, 0.3),
              ("auto      T=1 decode step (no-grad)   ", "us", B, step_auto, 0.3),
              ("reference T=64 fwd+bwd (contrast)     ", "ms", B * 64, ref64, 0.5)]
    for _, _, _, fn, _ in cases:
        fn()  # warm-up
    best = [float("inf")] * len(cases)
    for _ in range(args.rounds):
        for i, (_, _, _, fn, budget) in enumerate(cases):
            best[i] = min(best[i], timeit(fn, budget))
    for (label, unit, tokens, _, _), t in zip(cases, best):
        per = t * (1e3 if unit == "ms" else 1e6)
        print(f"{label} {per:9.2f} {unit}/call  {tokens / t:12,.0f} tokens/s")
    print(f"load average {os.getloadavg()[0]:.1f} at end (other processes on the cores inflate times)")


if __name__ == "__main__":
    main()
