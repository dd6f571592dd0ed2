"""fla's ``chunk_rwkv7`` on the CPU, under Triton's interpreter, against our reference backend.

The ``fla`` backend is meant for CUDA; this script checks its *conventions* (log-decay ``w``,
``scale=1``, the key-major state layout our adapter transposes, gradients of every input and of
the initial state) on a machine without a GPU, by running fla's real Triton kernels in
``TRITON_INTERPRET=1`` mode (numpy underneath: slow, small shapes only). It says nothing about
GPU speed; ``bench/bench_gpu.py`` does that on a GPU.

Set up once, in a separate virtualenv (fla-core is the pinned ``rwkvtune[gpu]`` extra)::

    pip install torch==2.13.0
    pip install triton einops packaging "fla-core==0.6.0" --no-deps   # the CPU torch stays
    pip install -e . --no-deps
    python bench/check_fla_interpret.py          # 2.5 minutes on 2 cores; exit 1 on FAIL
    python bench/check_fla_interpret.py --quick  # the fp32 kernel check only (25 s)

Three shims make fla 0.6.0 run under the interpreter, none of them change the maths:
1. fla aliases ``tl.gather`` at module level, which the interpreter cannot patch; hiding it while
   ``fla.utils`` is imported selects fla's own gather-free fallback (its path for older Triton).
2. Interpreted ``for i in range(...)`` loops yield Python ints, on which fla calls ``.to(tl.int64)``.
3. The interpreter has no benchmarker, so each autotuned kernel runs its first config.
"""

from __future__ import annotations

import builtins
import importlib
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"   # read when fla's kernels are decorated: before any import

import torch  # noqa: E402


class _LoopIndex(int):
    """An interpreted loop index that accepts fla's ``i.to(tl.int64)`` (a no-op on a Python int)."""

    def to(self, *args, **kwargs):
        return self


def _interpreted_range(*args):
    return (_LoopIndex(i) for i in builtins.range(*(int(a) for a in args)))


def import_fla_for_interpreter():
    """fla's chunk_rwkv7, importable and runnable on CPU tensors (see the module docstring)."""
    import triton.language as tl
    import triton.runtime.autotuner as autotuner

    gather = getattr(tl, "gather", None)
    if gather is not None:
        del tl.gather                                              # shim 1
    try:
        importlib.import_module("fla.utils")  # fixes fla's IS_GATHER_SUPPORTED = False
    finally:
        if gather is not None:
            tl.gather = gather
    from fla.ops.rwkv7 import chunk_rwkv7

    for name, module in list(sys.modules.items()):              # shim 2
        if name.startswith(("fla.ops.generalized_delta_rule", "fla.ops.rwkv7", "fla.ops.utils",
                            "fla.ops.common")) and module is not None:
            module.__dict__["range"] = _interpreted_range
    prune = autotuner.Autotuner.prune_configs                    # shim 3
    autotuner.Autotuner.prune_configs = lambda self, kwargs, *a: prune(self, kwargs, *a)[:1]
    return chunk_rwkv7


def model_check(T: int = 40) -> dict:
    """The tiny example model, fwd + bwd, with every WKV call routed to fla vs the chunked backend:
    max abs error of the logits and of each parameter's gradient (relative to its largest entry)."""
    from rwkvtune.configs.model_loader import ModelConfig
    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.models.rwkv7 import wkv as W

    here = os.path.dirname(os.path.abspath(__file__))
    config = ModelConfig.from_file(os.path.join(here, "..", "examples", "configs", "rwkv7-tiny.json"))
    model = RWKV7(config).init_weights_(seed=0)
    # The official init zeroes several projections; randomise everything so every path carries signal.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    idx = torch.randint(0, config.vocab_size, (2, T), generator=g)
    target = torch.randint(0, config.vocab_size, (2, T), generator=g)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    model.set_wkv_backend("chunked")
    ref_logits, ref_grads = run()
    chunked = W._wkv_chunked
    W._wkv_chunked = lambda r, w, k, v, a, b, S, chunk_size: W._wkv_fla(r, w, k, v, a, b, S)
    try:
        fla_logits, fla_grads = run()
    finally:
        W._wkv_chunked = chunked
    out = {"logits": float((fla_logits - ref_logits).abs().max() / ref_logits.abs().max())}
    for n, gref in ref_grads.items():
        if gref is None:  # parameters the graph does not use (layer 0's v-residual mix)
            continue
        out["d." + n] = float((fla_grads[n] - gref).abs().max() / gref.abs().max().clamp_min(1e-12))
    return out


def main() -> int:
    import argparse
    import importlib.util  # noqa: F401  (importlib.util.find_spec below)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the fp32 kernel check only")
    args = ap.parse_args()

    missing = [m for m in ("fla", "triton", "einops", "packaging") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"check_fla_interpret: missing {', '.join(missing)}; install with: pip install "
              "triton einops packaging 'fla-core==0.6.0' --no-deps", file=sys.stderr)
        return 2
    import_fla_for_interpreter()
    from rwkvtune.models.rwkv7 import wkv as W
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gpu import kernel_check

    ok = True
    # T = 40 is not a multiple of fla's chunk of 16; H > 1, B > 1, head size 64 as in the models.
    # bf16 is left out: the interpreter computes in numpy, which has no bfloat16 (its results are
    # garbage there); fp16 exercises the same half-precision casts in our adapter.
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2))[:1 if args.quick else 2]:
        t0 = time.perf_counter()
        errs = kernel_check("cpu", W._wkv_fla, "reference", dtype, B=2, T=40, H=2, N=64)
        worst = max(rel for _, rel in errs.values())
        ok &= worst < tol
        print(f"fla (interpreted) vs reference, {str(dtype)[6:]} inputs ({time.perf_counter() - t0:.0f} s): "
              f"{'OK' if worst < tol else 'FAIL'} (worst relative error {worst:.2e}, tolerance {tol:g})")
        for label, (err, rel) in errs.items():
            print(f"    {label:7s} max abs {err:.3e}  rel {rel:.3e}")
    if args.quick:
        return 0 if ok else 1
    t0 = time.perf_counter()
    errs = model_check()
    worst_name = max(errs, key=errs.get)
    ok &= errs[worst_name] < 1e-3
    print(f"tiny model fwd+bwd, fla (interpreted) vs chunked, fp32 ({time.perf_counter() - t0:.0f} s): "
          f"{'OK' if errs[worst_name] < 1e-3 else 'FAIL'} (logits rel {errs['logits']:.2e}; worst gradient "
          f"{worst_name} rel {errs[worst_name]:.2e}, tolerance 1e-3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
