"""RWKV7.compile_elementwise() on and off, in one process: training step and prefill, same weights.

Usage: python bench/bench_compile.py [--device cuda|cpu] [--T 1024] [--runs 5] [--precision bf16|fp32]
       [--small]   (a 2-layer C256 V4096 model: smoke test of the script only)

The 0.1B shape with random weights (tests/helpers.py). For each setting the first call (on CPU
and CUDA the compilation: torch.compile with dynamic shapes) is reported as the warm-up, then the
median of --runs timed calls, eager and compiled interleaved so that both see the same load. The
WKV kernel is not compiled (fla on CUDA when installed, the chunked kernel on CPU). Also checks
that compiled and eager logits agree. Prints one line per measurement and a ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, as training does")
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    from helpers import write_checkpoint

    from rwkvtune.models.rwkv7.model import RWKV7

    shape = dict(n_layer=12, n_embd=768, head_size=64, vocab=65536, d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
    if a.small:
        shape.update(n_layer=2, n_embd=256, vocab=4096)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(os.path.join(tmp, "m.pth"), dtype=torch.bfloat16, **shape)
        models = {"eager": RWKV7.from_checkpoint(ckpt, device=dev), "compiled": RWKV7.from_checkpoint(ckpt, device=dev)}
    models["compiled"].compile_elementwise()
    V = shape["vocab"]
    ids = torch.randint(0, V, (1, a.T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if a.precision == "bf16" else None

    def train(m):
        m.train()
        with amp() if amp else torch.autocast(dev.type, enabled=False):
            loss = F.cross_entropy(m(ids[:, :-1]).float().reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        m.zero_grad(set_to_none=True)

    def prefill(m):
        m.eval()
        with torch.inference_mode(), amp() if amp else torch.autocast(dev.type, enabled=False):
            m(ids[:, :-1], return_state=True, last_only=True)

    def timed(fn, m):
        sync()
        t = time.perf_counter()
        fn(m)
        sync()
        return time.perf_counter() - t

    print(f"torch {torch.__version__} | device {dev} "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'({torch.get_num_threads()} threads)'} | "
          f"T={a.T} | {a.precision} | shape {shape}")
    with torch.no_grad():
        want = models["eager"](ids[:, :64])
        t = time.perf_counter()
        got = models["compiled"](ids[:, :64])
        first = time.perf_counter() - t
    print(f"max |logit difference| compiled vs eager (T=64): {(got - want).abs().max().item():.2e}; first compiled "
          f"call (compiles, no grad): {first:.1f} s")
    for name, fn in (("train fwd+bwd", train), ("prefill", prefill)):
        warm = {k: timed(fn, m) for k, m in models.items()}
        res = {k: [] for k in models}
        for _ in range(a.runs):
            for k, m in models.items():
                res[k].append(timed(fn, m))
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"{name:14s} eager {a.T / med['eager']:9.1f} tok/s | compiled {a.T / med['compiled']:9.1f} tok/s | "
              f"compiled/eager {med['eager'] / med['compiled']:.2f}x | first call (warm-up) eager "
              f"{warm['eager']:.1f} s, compiled {warm['compiled']:.1f} s")


if __name__ == "__main__":
    main()
