"""bf16 against fp32 training on CPU, side by side, on the 0.1B shape: matmul rates, the trainer's
step in tok/s, and each precision's matmul bound.

Usage: python bench/bench_bf16.py [--quick] [--threads N] [--runs R] [--T T] [--n-layer L] [--mode M] [--profile]

Model: the 0.1B shape (L12, C768, head 64, D_DECAY/D_AAA/D_MV/D_GATE 64/64/32/128, V 65536), random
weights scaled like a trained model (tests/helpers.py), written once to a temporary bf16 ``.pth``.

Every measurement runs in its own subprocess, warms up first, and reports the median of ``--runs``:
  1. matmul GFLOP/s in fp32 and bf16 for the model's shapes at T (best sustained = max over shapes);
  2. the trainer's step at B=1, T=512 in each precision, as ``rwkvtune train`` runs it: the model as
     the mode builds it (full: fp32 master weights; lora/state: a bf16 frozen base with
     ``precision bf16``), the run's autocast, ``TrainModule.loss_sum`` (chunked head + loss with
     L2Wrap), backward; then grad clipping and AdamW, timed apart;
  3. bound = that precision's best matmul rate / (6 x non-embedding params) tokens/s, and the
     fwd+bwd rate as a fraction of it (target >= 0.7 in bf16; the optimizer step is reported beside
     it, it is memory bound and the same in both precisions).
``--profile`` adds a torch.profiler table of one bf16 step (where the time goes). The script prints
figures; it is not a test. It is sensitive to other processes sharing the cores (the load average
is printed); ``--quick`` (T=128, 2 layers, 2 runs) only checks that it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_cpu import ROOT, SHAPE, _timed  # noqa: E402  (after the path insert; the same 0.1B shape and timer)


def worker_matmul(a) -> dict:
    import torch

    T, C = a.T, SHAPE["n_embd"]
    shapes = [(T, C, C), (T, C, 4 * C), (T, 4 * C, C), (T, C, SHAPE["vocab"])]
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = {}
        for m, k, n in shapes:
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            flop = 2.0 * m * k * n
            reps = max(2, int(0.3e9 / flop) + 1)

            def fn():
                for _ in range(reps):
                    torch.mm(x, w)
            rates[f"{m}x{k} @ {k}x{n}"] = flop * reps / statistics.median(_timed(fn, max(3, a.runs))) / 1e9
        res[str(dtype).replace("torch.", "")] = rates
    return {"gflops": res}


def worker_train(a) -> dict:
    import torch

    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.peft import get_mode
    from rwkvtune.train.objective import TrainModule
    from rwkvtune.train.optim import param_groups
    from rwkvtune.train.runtime import autocast_factory

    cfg = TrainConfig(model=a.ckpt, data="-", mode=a.mode, precision=a.precision, device="cpu")
    mode = get_mode(a.mode)
    bf16_base = not mode.trains_base and a.precision == "bf16"  # as the trainer builds it
    model = RWKV7.from_checkpoint(a.ckpt, dtype=torch.bfloat16 if bf16_base else torch.float32)
    module = TrainModule.for_mode(mode, model.train(), cfg)
    opt = torch.optim.AdamW(param_groups(module.named_parameters(), 1e-5, 0.0), lr=1e-5)
    autocast = autocast_factory("cpu", a.precision)
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.emb.weight.numel()
    idx = torch.randint(0, SHAPE["vocab"], (1, a.T + 1), generator=torch.Generator().manual_seed(0))
    split = {"fb": [], "opt": []}

    def step(ids=idx, record=True):
        t = time.perf_counter()
        with autocast():
            loss, _ = module.loss_sum(ids[:, :-1], ids[:, 1:], l2wrap=1e-4)
        (loss / ids.shape[1]).backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if record:
            split["fb"].append(t2 - t)
            split["opt"].append(time.perf_counter() - t2)

    step(idx[:, :65], record=False)  # warm-up on a short sequence, then one full step
    step(record=False)
    for _ in range(a.runs):
        step()
    prof = None
    if a.profile:
        from torch.profiler import profile

        with profile() as p:
            step(record=False)
        prof = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    fb, opt_s = statistics.median(split["fb"]), statistics.median(split["opt"])
    return {"fb_seconds": split["fb"], "opt_seconds": split["opt"], "fb_tok_s": a.T / fb,
            "step_tok_s": a.T / (fb + opt_s), "params": n_params, "non_emb_params": n_params - n_emb,
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad), "profile": prof}


WORKERS = {"matmul": worker_matmul, "train": worker_train}


def run_worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    print("RESULT " + json.dumps(WORKERS[a.worker](a)), flush=True)


def spawn(args, worker, **extra) -> dict:
    argv = ["--worker", worker, "--threads", str(args.threads), "--runs", str(args.runs), "--T", str(args.T),
            "--mode", args.mode] + [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()] + \
           (["--profile"] if args.profile and extra.get("precision") == "bf16" else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, capture_output=True, text=True,
                          env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {worker} {extra} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: T=128, 2 layers, 2 runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--runs", type=int, default=None, help="timed steps per measurement (median reported)")
    p.add_argument("--T", type=int, default=None, help="sequence length (default 512)")
    p.add_argument("--n-layer", type=int, default=None, help="layers of the model (default 12: the 0.1B shape)")
    p.add_argument("--mode", default="full", choices=["full", "lora", "state"], help="fine-tuning mode (default full)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one bf16 step")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.runs = args.runs or (2 if args.quick else 3)
    args.T = args.T or (128 if args.quick else 512)
    if args.worker:
        return run_worker(args)

    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import make_state_dict
    from rwkvtune.models.cpu_precision import bf16_cpu_flags, default_cpu_precision

    shape = dict(SHAPE, n_layer=args.n_layer or (2 if args.quick else SHAPE["n_layer"]))
    os.environ.pop("RWKVTUNE_CPU_PRECISION", None)  # the machine's own choice, as a run would make it
    choice = default_cpu_precision()
    print(f"rwkvtune bf16 vs fp32 training benchmark | torch {torch.__version__} | threads {args.threads} of "
          f"{os.cpu_count()} cores | load average before {os.getloadavg()[0]:.2f} | runs {args.runs} (median)")
    print(f"CPU bf16 features: {', '.join(bf16_cpu_flags()) or 'none'}; a run without --precision trains in "
          f"{choice.precision} ({choice.reason})")
    print(f"model: L{shape['n_layer']} C{shape['n_embd']} head {shape['head_size']} V{shape['vocab']}, random "
          f"weights; mode {args.mode}; B=1 T={args.T}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rwkvtune-bench-") as tmp:
        ckpt = os.path.join(tmp, "rwkv7-bench.pth")
        torch.save(make_state_dict(**shape, dtype=torch.bfloat16, seed=0), ckpt)
        mm = spawn(args, "matmul")["gflops"]
        best = {dt: max(r.values()) for dt, r in mm.items()}
        print(f"\n1. matmul GFLOP/s (torch.mm, median of runs), shapes of the model at T={args.T}:")
        for shape_name in mm["float32"]:
            f32, b16 = mm["float32"][shape_name], mm["bfloat16"][shape_name]
            print(f"   {shape_name:>22}: fp32 {f32:7.1f}  bf16 {b16:7.1f}  ({b16 / f32:.2f}x)")
        print(f"   best sustained: fp32 {best['float32']:.1f}, bf16 {best['bfloat16']:.1f} "
              f"({best['bfloat16'] / best['float32']:.2f}x)")
        res = {prec: spawn(args, "train", ckpt=ckpt, precision=prec) for prec in ("fp32", "bf16")}
        flop_tok = 6 * res["fp32"]["non_emb_params"]
        print(f"\n2. the trainer's step, B=1 T={args.T} ({res['fp32']['trainable']:,} trainable params; "
              f"non-embedding {res['fp32']['non_emb_params']:,}, 6N = {flop_tok / 1e9:.3f} GFLOP/token):")
        print(f"   {'':>6} {'fwd+bwd tok/s':>14} {'bound tok/s':>12} {'of bound':>9} {'+clip+AdamW tok/s':>18}")
        for prec, rate in (("fp32", best["float32"]), ("bf16", best["bfloat16"])):
            r = res[prec]
            bound = rate * 1e9 / flop_tok
            r["bound"] = bound
            print(f"   {prec:>6} {r['fb_tok_s']:14.1f} {bound:12.1f} {r['fb_tok_s'] / bound:9.2f} "
                  f"{r['step_tok_s']:18.1f}")
        sp = res["bf16"]["fb_tok_s"] / res["fp32"]["fb_tok_s"]
        print(f"   bf16 / fp32: fwd+bwd {sp:.2f}x, whole step {res['bf16']['step_tok_s'] / res['fp32']['step_tok_s']:.2f}x;"
              f" bf16 at {res['bf16']['fb_tok_s'] / res['bf16']['bound']:.2f} of its bound (target >= 0.7)")
        print(f"   bound = best matmul rate of the precision / 6N; runs fwd+bwd fp32 "
              f"{_fmt(res['fp32']['fb_seconds'])} s, bf16 {_fmt(res['bf16']['fb_seconds'])} s")
        if res["bf16"].get("profile"):
            print("\nprofile of one bf16 step (self CPU time):\n" + res["bf16"]["profile"])
    print(f"\nload average after {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f} s")


def _fmt(xs) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    main()
