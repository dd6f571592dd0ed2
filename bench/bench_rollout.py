"""CPU benchmark of batched rollouts (rwkvtune.generate.generate_batch) at batch 1, 8 and 32.

Usage: python bench/bench_rollout.py [--quick] [--threads N] [--runs R] [--tokens T] [--batches 1,8,32]
       [--profile]

Model: the 0.1B shape of bench_cpu.py (L12, C768, head 64, dims 64/64/32/128, V 65536), random
weights scaled like a trained model, written once to a temporary bf16 ``.pth`` and loaded as
``rwkvtune generate`` loads it (RWKV7.from_checkpoint in fp32, then prepare_for_decoding).

A batch of B rows is shaped like a GRPO rollout: B / G prompts of 32 random tokens, G = min(B, 8)
samples per prompt (samples_per_prompt=G), default sampling settings (temperature 1.0, top-p
0.85, no penalties), ``--tokens`` tokens per row (default 128; a row ends earlier only if it
samples end-of-text). Figures per batch size:
  rollout tok/s = generated tokens / (prefill + decode seconds)  (what a rollout costs)
  decode tok/s  = generated tokens / decode seconds
  ms/step       = decode seconds / decode steps (one batched forward + sampling per step)
Each batch size runs in its own fresh subprocess (so its peak RSS, /proc VmHWM, is its own),
warms up with a short rollout, then reports the median of ``--runs`` timed rollouts. Memory: the
RSS once the model is loaded, and the peak RSS during the rollouts alone (the peak is reset after
loading, which copies weights transiently).
  tok/CPU-s     = generated tokens / CPU seconds of the process (all threads): with --threads 1
                  a figure that other processes on the machine barely change (they take wall
                  time, not this process's CPU time), for a busy shared machine
Target: batch 32 gives at least 8x the rollout tokens/s of batch 1.
This is a script that prints figures, not a test; it is sensitive to other processes sharing the
cores, so the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_cpu import (  # noqa: E402
    SHAPE, _fmt, make_checkpoint, reset_peak_rss, rss_mb, rss_now_mb, run_script_worker)

PROMPT_TOKENS = 32
GROUP = 8  # samples per prompt, as a GRPO group


def worker(a) -> dict:
    import torch

    from rwkvtune.generate import BatchStats, generate_batch, prepare_for_decoding
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.tokenizer import get_tokenizer

    torch.set_num_threads(a.threads)
    base = rss_mb()
    model = prepare_for_decoding(RWKV7.from_checkpoint(a.ckpt, dtype=torch.float32))
    tok = get_tokenizer()
    B = a.batch
    G = min(B, GROUP)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 65530, (B // G, PROMPT_TOKENS), generator=g).tolist()

    def rollout(max_tokens, seed):
        stats = BatchStats()
        cpu = time.process_time()
        generate_batch(model, tok, prompts, samples_per_prompt=G, max_tokens=max_tokens, seed=seed, stats=stats)
        stats.cpu_seconds = time.process_time() - cpu
        return stats

    rollout(4, 0)  # warm-up: allocator, lazy tables
    loaded, load_peak = rss_now_mb(), rss_mb()
    peak_reset = reset_peak_rss()  # from here VmHWM is the peak of the rollouts alone
    runs = [rollout(a.tokens, seed) for seed in range(1, a.runs + 1)]
    rollout_peak = rss_mb() if peak_reset else float("nan")
    prof = None
    if a.profile:
        from torch.profiler import profile

        with profile() as p:
            rollout(min(a.tokens, 16), 99)
        prof = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=16)
    rate = [s.tokens_per_s for s in runs]
    cpu_rate = statistics.median(s.generated_tokens / s.cpu_seconds for s in runs)
    med = runs[rate.index(statistics.median_low(rate))]
    return {"batch": B, "group": G, "rollout_tok_s": statistics.median(rate), "runs_tok_s": rate, "cpu_tok_s": cpu_rate,
            "decode_tok_s": med.generated_tokens / med.decode_seconds,
            "ms_per_step": 1000 * med.decode_seconds / max(med.decode_forwards, 1),
            "prefill_s": med.prefill_seconds, "decode_s": med.decode_seconds, "tokens": med.generated_tokens,
            "rss_base_mb": base, "rss_loaded_mb": loaded, "rss_rollout_peak_mb": rollout_peak,
            "rss_load_peak_mb": load_peak,
            "threads": torch.get_num_threads(), "profile": prof}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="32 tokens per row, 1 run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--runs", type=int, default=None, help="timed rollouts per batch size (median; default 3)")
    p.add_argument("--tokens", type=int, default=None, help="tokens generated per row (default 128)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table per batch size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.tokens = args.tokens or (32 if args.quick else 128)
    if args.worker:
        import json

        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    print(f"rwkvtune rollout benchmark | threads {args.threads} of {os.cpu_count()} cores | load average before "
          f"{os.getloadavg()[0]:.2f} | {args.tokens} tokens per row, {PROMPT_TOKENS}-token prompts, up to {GROUP} "
          f"samples per prompt | median of {args.runs} | fp32, default sampling (temperature 1, top-p 0.85)")
    print(f"model: 0.1B shape L{SHAPE['n_layer']} C{SHAPE['n_embd']} V{SHAPE['vocab']}, random weights")
    res = {}
    with tempfile.TemporaryDirectory(prefix="rwkvtune-rollout-") as tmp:
        ckpt = os.path.join(tmp, "rwkv7-bench-0.1b.pth")
        make_checkpoint(ckpt)
        for B in batches:
            argv = ["--worker", "--batch", str(B), "--ckpt", ckpt, "--threads", str(args.threads), "--runs",
                    str(args.runs), "--tokens", str(args.tokens)] + (["--profile"] if args.profile else [])
            res[B] = run_script_worker(__file__, argv, args.threads, f"batch {B}")
            r = res[B]
            print(f"  batch {B:>3}: rollout {r['rollout_tok_s']:7.1f} tok/s (runs {_fmt(r['runs_tok_s'])}) | decode "
                  f"{r['decode_tok_s']:7.1f} tok/s, {r['ms_per_step']:6.1f} ms/step | prefill {r['prefill_s']:.2f} s "
                  f"| RSS: model loaded {r['rss_loaded_mb']:.0f} MB, rollout peak {r['rss_rollout_peak_mb']:.0f} MB, "
                  f"loading peak {r['rss_load_peak_mb']:.0f} MB", flush=True)
    print(f"\nSUMMARY (fp32, {args.threads} threads, {args.tokens} tokens per row)")
    print(f"{'batch':>6}{'rows/prompt':>12}{'rollout tok/s':>15}{'x batch 1':>10}{'best run':>10}{'decode tok/s':>14}"
          f"{'ms/step':>9}{'tok/CPU-s':>11}{'x':>7}{'rollout peak RSS MB':>21}")
    one = res.get(1)
    for B, r in res.items():
        ratio = f"{r['rollout_tok_s'] / one['rollout_tok_s']:.2f}x" if one else "-"
        cpu_ratio = f"{r['cpu_tok_s'] / one['cpu_tok_s']:.2f}x" if one else "-"
        print(f"{B:>6}{r['group']:>12}{r['rollout_tok_s']:>15.1f}{ratio:>10}{max(r['runs_tok_s']):>10.1f}"
              f"{r['decode_tok_s']:>14.1f}{r['ms_per_step']:>9.1f}{r['cpu_tok_s']:>11.1f}{cpu_ratio:>7}"
              f"{r['rss_rollout_peak_mb']:>21.0f}")
    if one and 32 in res:
        print(f"target: batch 32 >= 8x batch 1 rollout tok/s: {res[32]['rollout_tok_s'] / one['rollout_tok_s']:.2f}x")
    print(f"(load average after {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f} s)")
    if args.profile:
        for B, r in res.items():
            print(f"\n--- profile: batch {B}\n{r['profile']}")


if __name__ == "__main__":
    main()
