"""Packed vs padded SFT on a mixed-length chat set: tokens/s and the useful-token fraction.

Usage: python bench/bench_packing.py [--threads N] [--steps S] [--ctx-len T] [--batch-size B] [--quick]

Data, made here: ``--docs`` chat documents whose lengths follow a long-tailed (log-normal)
distribution, median ~150 tokens, clipped to [8, 2 x ctx_len], each ending with the end-of-text 0;
the loss mask covers the second half of each document (the "assistant reply"). The same documents
go through ``PackedDataset`` with ``packing=True`` (short documents share ctx_len windows, the state
reset at each start) and ``packing=False`` (one document per window, padded), in the same shuffled
window order (seed 0), batch ``--batch-size``, through the trainer's own ``collate`` (which drops the
columns after a batch's last target).

Figures:
* useful-token fraction: document tokens / tokens run through the model, over a whole epoch of
  batches (counted, no model needed);
* tokens/s: tokens run through the model per second of fwd+bwd (the ``sft`` method's
  ``forward_backward`` in full mode, fp32, CPU), timed on ``--steps`` batches of each layout after
  one warm-up batch; useful tokens/s = tokens/s x the fraction measured on those same batches.
The optimizer step is left out (it costs the same per step, and packing needs fewer steps, so
leaving it out understates the gain). Model: the 0.1B shape (L12, C768, V65536), random weights.
This is a script that prints figures, not a test; other processes on the cores change them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab=65536, d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
TINY_SHAPE = dict(n_layer=2, n_embd=64, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


def make_docs(n: int, ctx_len: int, seed: int = 0):
    from rwkvtune.data.formats import Sample

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(150), 0.9, n)), 8, 2 * ctx_len).astype(int)
    docs = []
    for length in lengths:
        t = rng.integers(1, 65536, length).astype(np.int32)
        t[-1] = 0
        m = np.zeros(length, dtype=bool)
        m[length // 2:-1] = True  # the reply; the final 0 carries no loss (chat convention)
        docs.append(Sample(t, m))
    return docs, lengths


def batches(ds, batch_size: int, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(ds))
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def epoch_counts(ds, batch_size: int):
    """(document tokens, tokens run) over one epoch of collated batches."""
    from rwkvtune.train.data import collate

    useful = run = 0
    for b in batches(ds, batch_size):
        items = [ds[int(i)] for i in b]
        x = collate(items, "cpu")["input_ids"]
        run += x.numel()
        useful += sum(min(int(ds.counts[int(i)]), x.shape[1]) for i in b)
    return useful, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--docs", type=int, default=2000, help="documents in the set (default 2000)")
    p.add_argument("--ctx-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed batches per layout (default 2)")
    p.add_argument("--quick", action="store_true", help="a tiny model instead of the 0.1B shape (smoke run)")
    a = p.parse_args()

    import torch

    from helpers import make_state_dict
    from rwkvtune.data.dataset import PackedDataset
    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.peft import get_mode
    from rwkvtune.train.objective import TrainModule
    from rwkvtune.train.data import collate
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT

    torch.set_num_threads(a.threads)
    docs, lengths = make_docs(a.docs, a.ctx_len)
    print(f"{a.docs} documents: length median {int(np.median(lengths))}, mean {lengths.mean():.0f}, "
          f"p90 {int(np.percentile(lengths, 90))}, max {lengths.max()}; ctx_len {a.ctx_len}, batch {a.batch_size}")
    sets = {"padded": PackedDataset(docs, a.ctx_len, packing=False), "packed": PackedDataset(docs, a.ctx_len)}
    frac = {}
    for name, ds in sets.items():
        useful, run = epoch_counts(ds, a.batch_size)
        frac[name] = useful / run
        print(f"{name}: {len(ds)} windows, epoch of {run} tokens run, {useful} document tokens: "
              f"useful fraction {frac[name]:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.pth")
        torch.save(make_state_dict(**(TINY_SHAPE if a.quick else SHAPE), seed=0), path)
        model = RWKV7.from_checkpoint(path)
    cfg = TrainConfig(model=path, ctx_len=a.ctx_len, batch_size=a.batch_size).resolve(model.config)
    module = TrainModule.for_mode(get_mode("full"), model.train(), cfg)
    sft = SFT(cfg)
    ctx = StepContext(cfg=cfg, device="cpu", autocast=contextlib.nullcontext, scale=1e-3)
    rates = {}
    for name, ds in sets.items():
        order = batches(ds, a.batch_size)
        todo = [collate([ds[int(i)] for i in b], "cpu") for b in order[:a.steps + 1]]
        sft.forward_backward(module, todo[0], ctx)  # warm-up
        module.zero_grad(set_to_none=True)
        run = useful = 0
        t0 = time.perf_counter()
        for bi, batch in zip(order[1:], todo[1:]):
            sft.forward_backward(module, batch, ctx)
            module.zero_grad(set_to_none=True)
            run += batch["input_ids"].numel()
            useful += sum(min(int(ds.counts[int(i)]), batch["input_ids"].shape[1]) for i in bi)
        dt = time.perf_counter() - t0
        rates[name] = (run / dt, useful / dt)
        print(f"{name}: {a.steps} batches, {run} tokens in {dt:.1f} s: {run / dt:.1f} tokens/s, "
              f"{useful / dt:.1f} useful tokens/s (fraction {useful / run:.3f} on these batches)")
    print(f"\n| layout | useful fraction (epoch) | tokens/s | useful tokens/s |\n|---|---|---|---|")
    for name in sets:
        print(f"| {name} | {frac[name]:.3f} | {rates[name][0]:.1f} | {rates[name][1]:.1f} |")
    print(f"packed / padded useful tokens/s: {rates['packed'][1] / rates['padded'][1]:.2f}x (timed batches); "
          f"{frac['packed'] * rates['packed'][0] / (frac['padded'] * rates['padded'][0]):.2f}x with the epoch fractions "
          f"(target >= 1.5x)")


if __name__ == "__main__":
    main()
