"""GPU check in one short script: fla backend vs chunked PyTorch, then timed training steps.

Run on a CUDA machine with fla-core installed (``pip install -e ".[gpu]"``)::

    python bench/bench_gpu.py                          # everything below
    python bench/bench_gpu.py --sizes 0.1b --skip-big  # quicker

1. ``wkv7(backend="fla")`` vs ``backend="chunked"`` on the GPU (fp32 and bf16 inputs, initial
   state, outputs, final state and gradients of r, w, k, v, a, b and the state): max abs and
   relative errors are printed; bf16 is judged with a bf16 tolerance.
2. WKV forward+backward timings on the GPU: chunked, fla, and fla with ``lower_bound``.
3. Optimizer steps built from the trainer's own pieces (the mode's ``prepare``, the sft method's
   forward/backward with the chunked loss, ``param_groups`` + AdamW, gradient clipping), bf16
   autocast, B=1, T=--T, after warm-up steps, for each size in --sizes x {full, lora}, then one
   FSDP step (strategy fsdp on one GPU) and a 7.2B LoRA step (--skip-big leaves it out). Each
   line: tokens/s, model FLOPs utilisation against the card's bf16 dense peak (--peak-tflops,
   default 989: the H100/H200 SXM datasheet figure), peak GPU memory next to the planner's
   estimate, and the seconds from process start to the end of the configuration's first step
   (cold start: model build and Triton compilation/autotuning included).

MFU counts 6 N FLOPs per token for full fine-tuning and 4 N for LoRA (no weight-gradient matmuls
for the frozen base), N = non-embedding parameters (the head included).

``--device cpu`` runs the same code with backend "chunked" against "reference" and training
steps of the tiny config, to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import time

PROCESS_START = time.perf_counter()

import torch  # noqa: E402

from rwkvtune.configs.model_loader import load_model_config  # noqa: E402
from rwkvtune.models.rwkv7 import RWKV7  # noqa: E402
from rwkvtune.models.rwkv7.config import TrainConfig  # noqa: E402
from rwkvtune.models.rwkv7.wkv import wkv7  # noqa: E402
from rwkvtune.peft import get_mode  # noqa: E402
from rwkvtune.train.objective import TrainModule, count_params  # noqa: E402
from rwkvtune.train.methods.base import StepContext  # noqa: E402
from rwkvtune.train.methods.sft import SFT  # noqa: E402
from rwkvtune.train.optim import param_groups  # noqa: E402
from rwkvtune.train.runtime import autocast_factory  # noqa: E402


def kernel_check(device: str, fast, slow, dtype: torch.dtype, B=2, T=300, H=4, N=64) -> dict:
    """Max abs and relative error of `fast` against `slow` (each a wkv7 backend name or a function
    with wkv7's positional signature) for outputs, final state and every gradient."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    r, k, v = rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5)
    w = -0.606531 * torch.sigmoid(rnd(B, T, H, N))
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, N))
    s0 = rnd(B, H, N, N, scale=0.1)
    inputs = [x.to(dtype) for x in (r, w, k, v, a, b)]
    dy, ds = rnd(B, T, H, N), rnd(B, H, N, N)
    results = {}
    for name, impl in (("fast", fast), ("slow", slow)):
        fn = impl if callable(impl) else (lambda *a, backend=impl: wkv7(*a, backend=backend))
        xs = [x.detach().clone().requires_grad_(True) for x in inputs]
        st = s0.detach().clone().requires_grad_(True)
        y, sf = fn(*xs, st)
        ((y.float() * dy).sum() + (sf * ds).sum()).backward()
        results[name] = [y.float(), sf] + [x.grad.float() for x in xs] + [st.grad]
    labels = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate"]
    out = {}
    for label, p, q in zip(labels, results["fast"], results["slow"]):
        err = float((p - q).detach().abs().max())
        out[label] = (err, err / max(1e-12, float(q.detach().abs().max())))
    return out


def kernel_timing(device: str, dtype: torch.dtype, B=1, T=4096, H=12, N=64, reps=10) -> dict:
    """Milliseconds per WKV forward+backward (one layer of the 0.1B shape) for each GPU variant:
    our chunked PyTorch backend, fla as rwkvtune calls it, and fla told that w >= -0.61 (true for
    RWKV-7, whose log-decay is -0.6065 * sigmoid(.)), which lets it use 64-token chunks on tensor
    cores. The last one is not wired into rwkvtune yet: this measures whether it is worth it."""
    from rwkvtune.models.rwkv7.wkv import _fla_kernel

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device)

    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    xs = [rnd(B, T, H, N) * 0.5, -0.606531 * torch.sigmoid(rnd(B, T, H, N)), rnd(B, T, H, N) * 0.5,
          rnd(B, T, H, N) * 0.5, -kk, kk * torch.sigmoid(rnd(B, T, H, N))]
    xs = [x.to(dtype).requires_grad_(True) for x in xs]
    s0 = torch.zeros(B, H, N, N, device=device)
    fla, params = _fla_kernel()
    variants = {"chunked": lambda: wkv7(*xs, s0, backend="chunked")[0],
                "fla": lambda: wkv7(*xs, s0, backend="fla")[0]}
    if fla is not None and "lower_bound" in params:
        r, w, k, v, a, b = xs
        variants["fla, lower_bound=-0.61"] = lambda: fla(r=r, w=w, k=k, v=v, a=a, b=b, scale=1.0,
                                                         initial_state=s0, output_final_state=True,
                                                         lower_bound=-0.61)[0]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {}
    for name, fn in variants.items():
        for i in range(3 + reps):  # 3 warm-up calls: Triton compiles and autotunes on the first
            if i == 3:
                sync()
                t0 = time.perf_counter()
            fn().float().sum().backward()
        sync()
        out[name] = (time.perf_counter() - t0) / reps * 1000
    return out


def _random_model(config, device: str, dtype: torch.dtype) -> RWKV7:
    """Random weights of the official init's scales, built on the device (no CPU copy, no file)."""
    with torch.device(device):
        model = RWKV7(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, 0.02 if p.dim() == 2 else 0.1)
            for block in model.blocks:
                block.att.w0.fill_(-1.0)  # decays in the trained range
    return model.to(dtype)


def train_step_timing(size: str, mode: str, device: str, T: int, warmup: int, steps: int,
                      strategy: str = "ddp") -> dict:
    """One configuration: build, warm up, time; returns the figures of one printed line."""
    from rwkvtune.train.strategy import get_strategy, join_single_process_group
    from rwkvtune.train.runtime import Dist

    t_build = time.perf_counter()
    config = load_model_config(size)
    cuda = device.startswith("cuda")
    cfg = TrainConfig(model=size, data="(none)", mode=mode, ctx_len=T, batch_size=1, device=device,
                      precision="bf16" if cuda else "fp32", strategy=strategy, lr=1e-5, lr_final=1e-6)
    torch.manual_seed(0)
    base_dtype = torch.bfloat16 if (mode != "full" and cuda) else torch.float32
    module = TrainModule.for_mode(get_mode(mode), _random_model(config, device, base_dtype).train(), cfg)
    runner = module
    if strategy == "fsdp":
        join_single_process_group(device)
        runner = get_strategy(cfg, Dist(), device).wrap(module)
    opt = torch.optim.AdamW(param_groups(module.named_parameters(), 1e-5, 0.0), lr=1e-5, betas=(0.9, 0.99), eps=1e-18)
    method = SFT(cfg)
    ctx = StepContext(cfg=cfg, device=device, autocast=autocast_factory(device, cfg.precision), scale=1.0 / T,
                      runner=runner)
    ids = torch.randint(0, config.vocab_size, (1, T + 1), device=device)
    batch = {"input_ids": ids[:, :T], "labels": ids[:, 1:]}
    trainable = [p for p in module.parameters() if p.requires_grad]

    def step():
        method.forward_backward(module, batch, ctx)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    first_s, cold_s = time.perf_counter() - t_build, time.perf_counter() - PROCESS_START
    for _ in range(warmup - 1):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    trainable_n, frozen_n, unused = count_params(module)
    non_emb = trainable_n + frozen_n + unused - config.vocab_size * config.n_embd  # the head is a matmul: kept
    flops_per_token = (6 if mode == "full" else 4) * non_emb
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    if strategy == "fsdp":
        torch.distributed.destroy_process_group()
    del module, runner, opt
    if cuda:
        torch.cuda.empty_cache()
    return {"size": size, "mode": mode, "strategy": strategy, "params": config.n_params, "T": T,
            "first_s": first_s, "cold_s": cold_s, "step_s": dt, "tokens_per_s": T / dt,
            "tflops": flops_per_token * T / dt / 1e12, "peak_gib": peak, "estimate_gib": _estimate(size, cfg),
            "precision": "bf16 autocast" if cfg.precision == "bf16" else "fp32"}


def _estimate(size: str, cfg) -> float:
    """The memory planner's per-GPU estimate for this configuration, GiB."""
    from rwkvtune.train.memory import estimate_gib

    return estimate_gib(load_model_config(size), cfg)


def _report(r: dict, peak_tflops: float) -> str:
    mfu = r["tflops"] / peak_tflops * 100
    return (f"train step {r['size']} {r['mode']} ({r['strategy']}, {r['params'] / 1e9:.2f}B params), B=1 T={r['T']}, "
            f"{r['precision']}: {r['step_s'] * 1000:.0f} ms/step, {r['tokens_per_s']:.0f} tok/s, {r['tflops']:.1f} "
            f"TFLOP/s = {mfu:.1f}% MFU of {peak_tflops:g}, peak {r['peak_gib']:.1f} GiB (planner {r['estimate_gib']:.1f}), "
            f"first step {r['first_s']:.0f} s after build start, {r['cold_s']:.0f} s after process start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="0.1b,1.5b")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the card's bf16 dense peak, TFLOP/s")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-big", action="store_true", help="leave out the 7.2B LoRA step")
    args = ap.parse_args()
    on_gpu = args.device.startswith("cuda")
    fast, slow = ("fla", "chunked") if on_gpu else ("chunked", "reference")
    print(f"device {args.device} ({torch.cuda.get_device_name() if on_gpu else 'cpu'}), torch {torch.__version__}")
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        t0 = time.perf_counter()
        errs = kernel_check(args.device, fast, slow, dtype, T=300 if on_gpu else 40, N=64 if on_gpu else 16)
        worst = max(rel for _, rel in errs.values())
        verdict = "OK" if worst < tol else "FAIL"
        print(f"{fast} vs {slow}, {str(dtype)[6:]} inputs ({time.perf_counter() - t0:.1f} s incl. compile): "
              f"{verdict} (worst relative error {worst:.2e}, tolerance {tol:g})")
        for label, (err, rel) in errs.items():
            print(f"    {label:7s} max abs {err:.3e}  rel {rel:.3e}")
    if on_gpu:
        for name, ms in kernel_timing(args.device, torch.bfloat16).items():
            print(f"WKV fwd+bwd, B=1 T=4096 H=12 N=64 bf16, {name}: {ms:.2f} ms")
    if args.skip_train:
        return
    sizes = args.sizes.split(",") if on_gpu else ["examples/configs/rwkv7-tiny.json"]
    T = args.T if on_gpu else 64
    runs = [(size, mode, "ddp") for size in sizes for mode in ("full", "lora")] + [(sizes[0], "full", "fsdp")]
    if on_gpu and not args.skip_big:
        runs.append(("7.2b", "lora", "ddp"))
    for size, mode, strategy in runs:
        with contextlib.suppress(torch.cuda.OutOfMemoryError) if on_gpu else contextlib.nullcontext():
            print(_report(train_step_timing(size, mode, args.device, T, args.warmup, args.steps, strategy),
                          args.peak_tflops), flush=True)
            continue
        print(f"train step {size} {mode} ({strategy}): out of GPU memory", flush=True)


if __name__ == "__main__":
    main()
