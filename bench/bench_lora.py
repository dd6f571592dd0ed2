"""CPU benchmark of one optimizer step: full fine-tuning vs LoRA vs LoRA over a bf16 base vs state tuning.

Usage: python bench/bench_lora.py [--quick] [--threads N] [--runs R] [--T T]

Model: the 0.1B shape of bench_cpu.py (L12, C768, head 64, dims 64/64/32/128, V 65536), random
weights scaled like a trained model, written once to a temporary bf16 ``.pth`` and loaded the way
``rwkvtune train`` loads it (``load_model_config`` on the file, ``TrainConfig.resolve``,
``build_module``). B=1, T=512 (--T), CPU.

Each mode runs in its own subprocess (so its peak RSS, /proc VmHWM, is its own) and builds its step
from the trainer's own pieces: ``build_module`` (mode full / lora r=16 alpha=32 default targets /
lora with precision bf16 / state), ``param_groups``, ``torch.optim.AdamW(betas=(0.9, 0.99),
eps=1e-18)``, the ``sft`` method's ``forward_backward`` (autocast: none in fp32, CPU bf16 autocast in bf16),
then, as the training loop does, gradient clipping at 1.0, ``optimizer.step()`` and
``zero_grad(set_to_none=True)``. One step = forward + backward + clip + AdamW step on T tokens.
A warm-up step at full T comes first (it also allocates the AdamW moments, so the peak RSS
includes them); tokens/s is T / median of ``--runs`` timed steps.

bf16 on a CPU without native bf16 matmul (no AVX512-BF16 / AMX) is 50-200x slower than fp32, so
one T=512 step can take many minutes. The bf16 mode therefore warms up with a T=16 probe step; if
that extrapolates past ``--bf16-budget`` seconds per step, it times one step at the largest shorter
T that fits (marked * in the summary) and prints the fp32 vs bf16 matmul rate.

Helpers (checkpoint writer, peak RSS, timing, worker entry point) come from bench_cpu.py.
This is a script that prints figures, not a test; it is sensitive to other processes sharing
the cores, so the load average is printed before and after.
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
import bench_cpu  # noqa: E402  (after the path insert)
from bench_cpu import ROOT, SHAPE, _fmt, make_checkpoint, rss_mb, rss_now_mb  # noqa: E402

# name -> TrainConfig fields
MODES = {
    "full": dict(mode="full", precision="fp32"),
    "lora": dict(mode="lora", precision="fp32", lora_r=16, lora_alpha=32.0),
    "lora-bf16": dict(mode="lora", precision="bf16", lora_r=16, lora_alpha=32.0),
    "state": dict(mode="state", precision="fp32"),
}


PROBE_T = 16  # tokens of the bf16 probe step


# ------------------------------------------------------------------------------------- worker
def _mm_gflops() -> dict:
    """GFLOP/s of one [256, 768] @ [768, 768] product in fp32 and in bf16 (why bf16 is fast or not)."""
    import torch

    out = {}
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(256, 768, dtype=dt), torch.randn(768, 768, dtype=dt)
        t = min(bench_cpu._timed(lambda: x @ w, 3))
        out[str(dt).replace("torch.", "")] = 2 * 256 * 768 * 768 / t / 1e9
    return out


def worker_step(a) -> dict:
    """One mode's optimizer steps, built as rwkvtune.train.trainer.train builds them."""

    import torch

    from rwkvtune.configs.model_loader import load_model_config
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.peft import get_mode
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT
    from rwkvtune.train.optim import param_groups
    from rwkvtune.train.runtime import autocast_factory
    from rwkvtune.train.objective import count_params
    from rwkvtune.train.trainer import build_module

    mc = load_model_config(a.ckpt)
    cfg = TrainConfig(model=a.ckpt, data="(unused)", device="cpu", ctx_len=a.T, batch_size=1,
                      **MODES[a.mode]).resolve(mc)
    module = build_module(cfg, get_mode(cfg.mode), mc, "cpu")
    rss_loaded, rss_prepared = rss_mb(), rss_now_mb()
    trainable, frozen, _ = count_params(module)
    groups = param_groups(module.named_parameters(), cfg.lr, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-18)
    use_bf16 = cfg.precision == "bf16"
    method = SFT(cfg)
    autocast = autocast_factory("cpu", cfg.precision)

    ids = torch.randint(0, mc.vocab_size, (1, a.T + 1), generator=torch.Generator().manual_seed(0))
    trainable_params = [p for p in module.parameters() if p.requires_grad]
    split = []  # (forward+backward s, clip+optimizer s) per step

    def step(T=a.T):
        batch = {"input_ids": ids[:, :T], "labels": ids[:, 1:T + 1]}
        # the loss is the mean over the step's tokens, as in the trainer
        ctx = StepContext(cfg=cfg, device="cpu", autocast=autocast, scale=1.0 / T)
        t0 = time.perf_counter()
        method.forward_backward(module, batch, ctx)
        t1 = time.perf_counter()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable_params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        split.append((t1 - t0, time.perf_counter() - t1))

    T, runs, probe = a.T, a.runs, None
    if use_bf16:
        # CPUs without native bf16 matmul (no AVX512-BF16/AMX) run bf16 GEMMs 50-200x slower than
        # fp32. Probe a short step first (it is also the warm-up); if a full-T step would exceed
        # the budget, time one step at a shorter T instead and say so.
        probe = min(a.T, PROBE_T)
        t = time.perf_counter()
        step(probe)
        est = (time.perf_counter() - t) * a.T / probe
        if est > a.bf16_budget:
            T = max(probe, int(a.T * a.bf16_budget / est) // 8 * 8)
            runs = 1
        probe = {"T": probe, "est_full_step_s": est, "mm_gflops": _mm_gflops()}
    warm = 0 if (use_bf16 and T < a.T) else 1
    times = bench_cpu._timed(lambda: step(T), runs, warmup=warm)
    fb = [s[0] for s in split[-runs:]]
    opt = [s[1] for s in split[-runs:]]
    by_dtype: dict[str, int] = {}
    for p in module.parameters():
        by_dtype[str(p.dtype).replace("torch.", "")] = by_dtype.get(str(p.dtype).replace("torch.", ""), 0) + \
            p.numel() * p.element_size()
    opt_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
    return {"seconds": times, "tok_s": T / statistics.median(times), "best_tok_s": T / min(times), "T": T,
            "probe": probe, "rss_now_mb": rss_now_mb(),
            "fwd_bwd_s": statistics.median(fb), "opt_s": statistics.median(opt),
            "trainable": trainable, "frozen": frozen, "param_mb": {k: v / 2 ** 20 for k, v in by_dtype.items()},
            "opt_state_mb": opt_bytes / 2 ** 20, "rss_loaded_mb": rss_loaded,
            "rss_prepared_mb": rss_prepared, "lr": cfg.lr,
            "precision": cfg.precision}


# ------------------------------------------------------------------------------------ driver
def spawn(args, mode: str, ckpt: str) -> dict:
    """Run one mode in a fresh interpreter (bench_cpu's runner, this script's workers)."""
    argv = ["--worker", mode, "--ckpt", ckpt, "--threads", str(args.threads), "--runs", str(args.runs),
            "--T", str(args.T), "--bf16-budget", str(args.bf16_budget)]
    return bench_cpu.run_script_worker(__file__, argv, args.threads, mode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter: T=128, 2 runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--runs", type=int, default=None, help="timed steps per mode after one warm-up (default 3)")
    p.add_argument("--T", type=int, default=None, help="tokens per step, B=1 (default 512)")
    p.add_argument("--bf16-budget", type=float, default=45.0,
                   help="seconds a bf16 step may take; slower CPUs time one step at a shorter T (default 45)")
    p.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.runs = args.runs or (2 if args.quick else 3)
    args.T = args.T or (128 if args.quick else 512)
    if args.worker:
        args.mode = args.worker
        args.worker = "lora_step"
        bench_cpu.WORKERS["lora_step"] = worker_step
        return bench_cpu.run_worker(args)  # sets threads, measures RSS, prints RESULT

    t_start = time.perf_counter()
    import torch

    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    print("command: " + " ".join([os.path.basename(sys.executable), script] + sys.argv[1:]))
    print(f"rwkvtune optimizer-step benchmark | torch {torch.__version__} | threads {args.threads} of "
          f"{os.cpu_count()} cores | load average before {' '.join(f'{x:.2f}' for x in os.getloadavg())} | "
          f"B=1 T={args.T} | runs {args.runs} after 1 warm-up (median)")
    print(f"model: 0.1B shape L{SHAPE['n_layer']} C{SHAPE['n_embd']} head {SHAPE['head_size']} dims "
          f"{SHAPE['d_decay']}/{SHAPE['d_aaa']}/{SHAPE['d_mv']}/{SHAPE['d_gate']} V{SHAPE['vocab']}, random "
          f"weights (bf16 file); step = fwd + bwd + clip 1.0 + AdamW(0.9, 0.99, eps 1e-18)")
    res = {}
    with tempfile.TemporaryDirectory(prefix="rwkvtune-bench-") as tmp:
        ckpt = os.path.join(tmp, "rwkv7-bench-0.1b.pth")
        make_checkpoint(ckpt)
        for mode in MODES:
            r = res[mode] = spawn(args, mode, ckpt)
            params = ", ".join(f"{k} {v:.0f}" for k, v in r["param_mb"].items())
            print(f"\n{mode} (precision {r['precision']}, lr {r['lr']:g}): {r['trainable']:,} trainable / "
                  f"{r['frozen']:,} frozen params")
            if r["probe"]:
                pr = r["probe"]
                print(f"   bf16 probe: a T={pr['T']} step (the warm-up) extrapolates to {pr['est_full_step_s']:.0f} s "
                      f"per T={args.T} step" + (f" > budget {args.bf16_budget:.0f} s: timing ONE step at T={r['T']}"
                                                if r["T"] < args.T else ""))
                print("   matmul [256,768]@[768,768]: " + ", ".join(f"{k} {v:.1f} GFLOP/s"
                                                                     for k, v in pr["mm_gflops"].items()))
            print(f"   steps at T={r['T']} {_fmt(r['seconds'])} s -> {r['tok_s']:.1f} tok/s (best "
                  f"{r['best_tok_s']:.1f}); median split: fwd+bwd {r['fwd_bwd_s']:.2f} s, "
                  f"clip+AdamW+zero_grad {r['opt_s']:.3f} s")
            print(f"   memory MB: params {params}; AdamW state {r['opt_state_mb']:.0f}; RSS after imports "
                  f"{r['rss_base_mb']:.0f}, peak after load+prepare {r['rss_loaded_mb']:.0f} (current "
                  f"{r['rss_prepared_mb']:.0f}), peak {r['rss_peak_mb']:.0f}, current at end {r['rss_now_mb']:.0f}"
                  f" (worker wall {r['wall']:.0f} s)")

    full = res["full"]
    print(f"\nSUMMARY (CPU, {args.threads} threads, B=1 T={args.T}; ratio = mode / full)")
    print(f"{'mode':<11}{'trainable params':>18}{'tokens/s':>10}{'x full':>8}{'peak RSS MB':>13}{'x full':>8}")
    capped = []
    for mode, r in res.items():
        mark = "*" if r["T"] < args.T else " "
        if mark == "*":
            capped.append(f"{mode} at T={r['T']}")
        print(f"{mode:<11}{r['trainable']:>18,}{r['tok_s']:>9.1f}{mark}{r['tok_s'] / full['tok_s']:>7.2f}x"
              f"{r['rss_peak_mb']:>12.0f}{mark}{r['rss_peak_mb'] / full['rss_peak_mb']:>7.2f}x")
    if capped:
        print(f"* measured at a shorter T ({', '.join(capped)}; one step): its bf16 steps exceed the "
              f"--bf16-budget; its peak RSS holds fewer activations than at T={args.T}")
    lb, lf = res["lora-bf16"], res["lora"]
    if lb["tok_s"] < lf["tok_s"]:
        mm = lb["probe"]["mm_gflops"]
        print(f"note: bf16 LoRA is {lf['tok_s'] / lb['tok_s']:.1f}x slower than fp32 LoRA on this CPU; its bf16 "
              f"matmul runs at {mm['bfloat16']:.1f} GFLOP/s vs fp32 {mm['float32']:.1f}")
    print(f"(load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - t_start:.0f} s)")

if __name__ == "__main__":
    main()
