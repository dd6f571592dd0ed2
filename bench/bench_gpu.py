"""GPU check in one short script: fla backend vs chunked PyTorch, then timed training steps.

Run on a CUDA machine with fla-core installed (``pip install -e ".[gpu]"``)::

    python bench/bench_gpu.py                 # both checks, 0.1B and 1.5B shapes
    python bench/bench_gpu.py --sizes 0.1b    # quicker

1. ``wkv7(backend="fla")`` vs ``backend="chunked"`` on the GPU (fp32 and bf16 inputs, initial
   state, outputs, final state and gradients of r, w, k, v, a, b and the state): max abs and
   relative errors are printed; bf16 is judged with a bf16 tolerance.
2. WKV forward+backward timings on the GPU: chunked, fla, and fla with ``lower_bound``.
3. One optimizer step (forward + backward + AdamW, bf16 autocast, fp32 master weights) for
   each size at B=1, T=--T, after warm-up steps (Triton autotunes on the first calls):
   tokens/s and peak GPU memory.

``--device cpu`` runs the same code with backend "chunked" against "reference", to check the
script itself on a machine without a GPU (small shapes only).
"""

from __future__ import annotations

import argparse
import time

import torch

from rwkvtune.configs.model_loader import load_model_config
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.models.rwkv7.wkv import wkv7
from rwkvtune.train.loss import loss_sum
from rwkvtune.train.optim import param_groups


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


def train_step_timing(size: str, device: str, T: int, warmup: int, steps: int) -> dict:
    config = load_model_config(size)
    torch.manual_seed(0)
    with torch.device(device):
        model = RWKV7(config).init_weights_(seed=0)
    model.train()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), 1e-5, 0.0), lr=1e-5, betas=(0.9, 0.99),
                            eps=1e-18)
    idx = torch.randint(0, config.vocab_size, (1, T), device=device)
    labels = torch.randint(0, config.vocab_size, (1, T), device=device)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def step():
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            loss = loss_sum(model(idx), labels, 1e-4) / T  # L2Wrap gets the 1/T through the loss's gradient
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if dev_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev_type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev_type == "cuda" else float("nan")
    return {"size": size, "params": config.n_params, "T": T, "warmup_s": warm_s, "step_s": dt,
            "tokens_per_s": T / dt, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="0.1b,1.5b")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-train", action="store_true")
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
    for size in args.sizes.split(","):
        r = train_step_timing(size, args.device, args.T, args.warmup, args.steps)
        print(f"train step {r['size']} ({r['params'] / 1e9:.2f}B params), B=1 T={r['T']}, bf16 autocast: "
              f"{r['step_s'] * 1000:.0f} ms/step, {r['tokens_per_s']:.0f} tok/s, peak {r['peak_gib']:.1f} GiB "
              f"(warm-up {r['warmup_s']:.0f} s)")


if __name__ == "__main__":
    main()
