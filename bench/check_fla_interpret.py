"""fla's ``chunk_rwkv7`` on the CPU, under Triton's interpreter, against our reference backend.

The ``fla`` backend is meant for CUDA; this script checks its *conventions* (log-decay ``w``,
``scale=1``, the key-major state layout our adapter transposes, gradients of every input and of
the initial state) on a machine without a GPU, by running fla's real Triton kernels in
``TRITON_INTERPRET=1`` mode (numpy underneath: slow, small shapes only). It says nothing about
GPU speed; ``bench/bench_gpu.py`` does that on a GPU.

Set up once, in a separate virtualenv (fla-core is the pinned ``rwkvtune[gpu]`` extra)::

    python3 -m venv ../flavenv && . ../flavenv/bin/activate
    pip install torch==2.13.0
    pip install triton einops packaging "fla-core==0.6.0" --no-deps   # the CPU torch stays
    pip install numpy pyyaml tqdm pyrwkv-tokenizer pytest              # what rwkvtune imports
    export PYTHONPATH=$PWD       # this checkout (or pip install -e . --no-deps)
    python bench/check_fla_interpret.py          # exit 1 on FAIL
    python bench/check_fla_interpret.py --quick  # fp32 kernel + fp32 packed documents only

Time on the 2 shared CPU cores (torch 2.13.0+cpu, triton 3.9.0): --quick about 30 s of CPU (55 s
wall under load); the full run about 3.5 minutes of CPU (6 minutes wall), of which the two tiny-model
checks are 4.5 minutes wall (the packed one, nine fla sequences per batch, about twice the other).

Checks: fla vs our reference backend for y, final state and every gradient (fp32, fp16); packed
documents (``doc_start`` -> fla's ``cu_seqlens``, :func:`packed_check`): fla vs the reference with
the same starts and vs each document run alone, with a zero and a trained reset state; the tiny
model fwd+bwd, unpacked, and packed with a trained ``wkv_init``, fla vs chunked.

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


def packed_inputs(B: int = 2, T: int = 40, H: int = 2, N: int = 16, seed: int = 0):
    """Random WKV inputs (model-like ranges, as bench_gpu.kernel_check) and packed-document starts.

    fla's chunk is 16 tokens here (chunk_rwkv7 without ``lower_bound``), so the starts cover: row 0
    continues the carried state (no start at 0), then starts inside a chunk (5), at chunk edges (16,
    32), a one-token document (32) and one right after (33); row 1 starts a document at its first
    token, again inside a chunk (20), a one-token document (20) and one at the row's last token (39).
    Row 1's first piece therefore reads the reset state, row 0's the carried one."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    r, k, v = rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5)
    w = -0.606531 * torch.sigmoid(rnd(B, T, H, N))
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd(B, T, H, N))
    state, reset = rnd(B, H, N, N, scale=0.1), rnd(B, H, N, N, scale=0.1)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [5, 16, 32, 33]] = True
    starts[1, [0, 20, 21, 39]] = True
    return [r, w, k, v, a, b], state, reset, starts


def _per_document(r, w, k, v, a, b, state, starts, reset):
    """The oracle of packing: each document run on its own by the reference backend, from the row's
    carried state (a row's first piece that starts no document) or the reset state (zeros if None)."""
    from rwkvtune.models.rwkv7.wkv import _wkv_reference

    B, T, H, N = r.shape
    ys, finals = [], []
    for i in range(B):
        cut = [0] + [t for t in starts[i].nonzero().squeeze(1).tolist() if t > 0] + [T]
        S = state[i:i + 1]
        pieces = []
        for s, e in zip(cut[:-1], cut[1:]):
            if s > 0 or starts[i, 0]:
                S = reset[i:i + 1] if reset is not None else torch.zeros_like(S)
            y, S = _wkv_reference(*(x[i:i + 1, s:e].float() for x in (r, w, k, v, a, b)), S.float())
            pieces.append(y)
        ys.append(torch.cat(pieces, 1))
        finals.append(S)
    return torch.cat(ys).to(r.dtype), torch.cat(finals)


def packed_check(dtype: torch.dtype, with_reset: bool, B: int = 2, T: int = 40, H: int = 2, N: int = 16) -> dict:
    """Packed documents: our fla adapter (one flattened row, fla's ``cu_seqlens``) against (a) the
    reference backend with the same ``doc_start`` and (b) every document run separately.  Max abs
    and relative error (relative to the largest entry of (a)) of y, the final state and the
    gradient of each input, the carried state and, with ``with_reset``, the reset state."""
    from rwkvtune.models.rwkv7 import wkv as W

    inputs, state, reset, starts = packed_inputs(B, T, H, N)
    inputs = [x.to(dtype) for x in inputs]
    reset = reset if with_reset else None
    g = torch.Generator().manual_seed(1)
    dy, ds = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)

    def run(fn):
        xs = [x.detach().clone().requires_grad_(True) for x in inputs]
        st = state.detach().clone().requires_grad_(True)
        rs = None if reset is None else reset.detach().clone().requires_grad_(True)
        y, sf = fn(*xs, st, starts, rs)
        ((y.float() * dy).sum() + (sf.float() * ds).sum()).backward()
        leaves = xs + [st] + ([] if rs is None else [rs])   # an unused input's gradient is zero
        return [y.float(), sf.float()] + [torch.zeros_like(x) if x.grad is None else x.grad.float() for x in leaves]

    fla = run(W._wkv_fla)
    ref = run(lambda *xs: W.wkv7(*xs[:7], backend="reference", doc_start=xs[7], reset_state=xs[8]))
    docs = run(_per_document)
    labels = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate", "dreset"]
    out = {}
    for label, p, q, d in zip(labels, fla, ref, docs):
        scale = max(1e-12, float(q.detach().abs().max()))
        e_ref, e_doc = float((p - q).detach().abs().max()), float((p - d).detach().abs().max())
        out[label] = (e_ref, e_doc, max(e_ref, e_doc) / scale)
    return out


def model_check(T: int = 40, packed: bool = False) -> dict:
    """The tiny example model, fwd + bwd, with every WKV call routed to fla vs the chunked backend:
    max abs error of the logits and of each parameter's gradient (relative to its largest entry).
    ``packed``: the rows hold packed documents (``doc_start`` of :func:`packed_inputs`) and a
    trained initial state ``wkv_init`` (state tuning), whose gradient is checked too."""
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
    doc_start = packed_inputs(T=T)[3] if packed else None
    H, N = config.n_embd // config.head_size_a, config.head_size_a
    init = (torch.randn(config.n_layer, H, N, N, generator=g) * 0.1).requires_grad_(True) if packed else None

    def run():
        model.zero_grad(set_to_none=True)
        if init is not None:
            init.grad = None
        logits = model(idx, wkv_init=init, doc_start=doc_start)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        if init is not None:
            grads["wkv_init"] = init.grad
        return logits.detach(), grads

    model.set_wkv_backend("chunked")
    ref_logits, ref_grads = run()
    chunked = W._wkv_chunked
    W._wkv_chunked = lambda r, w, k, v, a, b, S, L, w_bound=None, doc_start=None, S_reset=None: \
        W._wkv_fla(r, w, k, v, a, b, S, doc_start, S_reset)
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
    # Packed documents (fla's cu_seqlens): fp32 with a trained reset state in --quick; the zero reset
    # state and fp16 inputs in the full run.
    cases = ((torch.float32, True, 1e-4), (torch.float32, False, 1e-4), (torch.float16, True, 1e-2))
    for dtype, with_reset, tol in cases[:1 if args.quick else 3]:
        t0 = time.perf_counter()
        errs = packed_check(dtype, with_reset)
        worst = max(rel for _, _, rel in errs.values())
        ok &= worst < tol
        print(f"fla (interpreted) packed documents vs reference and vs each document alone, {str(dtype)[6:]} "
              f"inputs, {'trained' if with_reset else 'zero'} reset state ({time.perf_counter() - t0:.0f} s): "
              f"{'OK' if worst < tol else 'FAIL'} (worst relative error {worst:.2e}, tolerance {tol:g})")
        for label, (e_ref, e_doc, rel) in errs.items():
            print(f"    {label:7s} max abs vs reference {e_ref:.3e}  vs per document {e_doc:.3e}  rel {rel:.3e}")
    if args.quick:
        return 0 if ok else 1
    for packed in (False, True):
        t0 = time.perf_counter()
        errs = model_check(packed=packed)
        worst_name = max(errs, key=errs.get)
        ok &= errs[worst_name] < 1e-3
        print(f"tiny model fwd+bwd{', packed documents + wkv_init' if packed else ''}, fla (interpreted) vs "
              f"chunked, fp32 ({time.perf_counter() - t0:.0f} s): "
              f"{'OK' if errs[worst_name] < 1e-3 else 'FAIL'} (logits rel {errs['logits']:.2e}; worst gradient "
              f"{worst_name} rel {errs[worst_name]:.2e}, tolerance 1e-3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
