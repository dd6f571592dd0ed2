"""Items/s of multiple-choice scoring on the 0.1B shape: rwkvtune.evaluate (each context run once,
its continuations scored from its state, rows batched without padding) against the plain route
(one full forward of context + continuation per choice, as a per-item evaluator does).

Usage: python bench/bench_lm_eval.py [--items N] [--choices K] [--ctx T] [--cont T] [--threads N]
       [--batch-size B] [--device cpu|cuda]

Items are shaped like HellaSwag's: a context of ``--ctx`` tokens (default 80; lengths vary by
+-25%), ``--choices`` continuations (default 4) of ``--cont`` tokens (default 20, +-50%), random
ids. Model: bench_cpu.py's 0.1B shape (L12, C768, V 65536), random weights, loaded in fp32.
Both routes score the same requests; the script checks they agree (max |difference| of the
log-likelihoods, and the greedy flags), then prints items/s of each and the speed-up.
Target: >= 2x. A script that prints figures, not a test; the load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from bench_cpu import make_checkpoint  # noqa: E402


def requests(items: int, choices: int, ctx: int, cont: int, vocab: int, seed: int = 0):
    rnd = random.Random(seed)
    out = []
    for _ in range(items):
        c = [rnd.randrange(1, vocab) for _ in range(max(1, round(ctx * rnd.uniform(0.75, 1.25))))]
        for _ in range(choices):
            out.append((c, [rnd.randrange(1, vocab) for _ in range(max(1, round(cont * rnd.uniform(0.5, 1.5))))]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=80)
    ap.add_argument("--cont", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    import torch

    from rwkvtune.evaluate import scoring
    from rwkvtune.models.rwkv7.model import RWKV7

    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"load average {os.getloadavg()[0]:.1f}, threads {torch.get_num_threads()}, device {a.device}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pth")
        make_checkpoint(path)
        model = RWKV7.from_checkpoint(path, device=a.device)
    reqs = requests(a.items, a.choices, a.ctx, a.cont, model.config.vocab_size)
    scoring.loglikelihood(model, reqs[:a.choices], batch_size=a.batch_size)  # warm-up
    scoring.plain_loglikelihood(model, reqs[:a.choices])
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    shared = scoring.loglikelihood(model, reqs, batch_size=a.batch_size)
    sync()
    t1 = time.perf_counter()
    plain = scoring.plain_loglikelihood(model, reqs)
    sync()
    t2 = time.perf_counter()
    diff = max(abs(x[0] - y[0]) for x, y in zip(shared, plain))
    flags = sum(x[1] != y[1] for x, y in zip(shared, plain))
    ours, base = a.items / (t1 - t0), a.items / (t2 - t1)
    print(f"{a.items} items x {a.choices} choices, context ~{a.ctx} tokens, continuation ~{a.cont} tokens")
    print(f"max |loglikelihood difference| {diff:.2e}, greedy flags differing {flags}")
    print(f"prefix-shared, batch {a.batch_size}: {ours:.2f} items/s ({t1 - t0:.2f} s)")
    print(f"plain per-item full forward:  {base:.2f} items/s ({t2 - t1:.2f} s)")
    print(f"speed-up {ours / base:.2f}x (target >= 2x); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
