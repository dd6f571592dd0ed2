"""CPU benchmark of the quantized frozen base (--base-quant): LoRA steps and decoding, side by side.

Usage: python bench/bench_quant.py [--quick] [--tiny] [--threads N] [--runs R] [--T T] [--decode-tokens N]

Model: the 0.1B shape of bench_cpu.py (L12, C768, head 64, dims 64/64/32/128, V 65536), random
weights scaled like a trained model (tests/helpers.py), written once to a temporary bf16 ``.pth``.
``--tiny`` uses a 2-layer 128-wide shape instead (a smoke run of the script, not figures).

Printed, each variant in its own subprocess (its peak RSS, /proc VmHWM, is its own):

* LoRA step (fp32 compute, r=16 alpha=32, the default targets; bench_lora.py's step: the trainer's
  build_module, the sft method's forward_backward, clip 1.0, AdamW) over a base of none / int8 /
  nf4: tokens/s (T / median step) and peak RSS.
* Decoding one token at a time (``model(ids, state=..., return_state=True)`` after
  ``prepare_for_decoding``, as ``rwkvtune generate``): fp32, bf16 and an int8 base (fp32
  activations): tokens/s, the bytes of weights one token reads (every stored tensor but the
  embedding, of which it reads one row), and the memory-bandwidth bound: a read bandwidth measured
  here (the sum of a 512 MiB fp32 tensor, best of 3, all threads) over those bytes.
* The products alone: every big matrix a token multiplies, one row each, through each CPU kernel
  (fp32 and bf16 dense, torch's int8 weight-only kernel, fbgemm's dynamic int8 linear): weights
  per second. The int8 kernels are compute-bound well below the read bandwidth, which is what
  holds int8 decoding back.

This is a script that prints figures, not a test; the machine's other load changes them, so the
load average is printed before and after.
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
import bench_lora  # noqa: E402
from bench_cpu import ROOT, SHAPE  # noqa: E402

TINY_SHAPE = dict(n_layer=2, n_embd=128, head_size=32, vocab=65536, d_decay=32, d_aaa=32, d_mv=32, d_gate=32)
LORA = {f"lora-{q}": dict(mode="lora", precision="fp32", lora_r=16, lora_alpha=32.0, base_quant=q)
        for q in ("none", "int8", "nf4")}
DECODE = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("float32", "int8")}


def worker_decode(a) -> dict:
    """Decode --decode-tokens tokens after a 16-token prompt; median over --runs."""
    import torch

    from rwkvtune.generate import prepare_for_decoding
    from rwkvtune.generate.rnn import BatchDecoder
    from rwkvtune.models.rwkv7.model import RWKV7

    dtype, quant = DECODE[a.variant]
    model = prepare_for_decoding(RWKV7.from_checkpoint(a.ckpt, dtype=getattr(torch, dtype), quant=quant))
    tensors = [t for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if not n.startswith("emb.") and not n.endswith("fp_sample")]
    per_token = sum(t.numel() * t.element_size() for t in tensors) + model.emb.weight[0].nbytes
    g = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, 16), generator=g)
    toks = torch.randint(0, V, (a.decode_tokens,), generator=g).tolist()

    def fn():  # as generate does: a parallel prefill, then BatchDecoder's in-place one-token step
        with torch.inference_mode():
            _, state = model(prompt, return_state=True, last_only=True)
        rnn = BatchDecoder(model, state)
        t = time.perf_counter()
        for tok in toks:
            rnn.step(torch.tensor([tok]))
        return time.perf_counter() - t

    fn()
    times = [fn() for _ in range(a.runs)]
    return {"tok_s": a.decode_tokens / statistics.median(times), "bytes_per_token": per_token,
            "read_gb_s": _read_bandwidth(torch)}


def _read_bandwidth(torch) -> float:
    """GB/s of summing a 512 MiB fp32 tensor (a streaming read on all threads), best of 3."""
    x = torch.ones(2 ** 27)
    x.sum()
    best = min(bench_cpu._timed(lambda: x.sum(), 3, warmup=0))
    return x.nbytes / best / 1e9


def kernel_rates(shape: dict, runs: int) -> dict:
    """How fast each CPU product streams the big matrices one decoded token multiplies (every
    att r/k/v/o, ffn key/value and the head of ``shape``: too large for the caches, as in a real
    decode), one row each: {kernel: (weights per second, bytes per weight)}. Separates what the
    int8 kernels can do from what the model around them costs."""
    import warnings

    import torch

    g = torch.Generator().manual_seed(0)
    C, L, V = shape["n_embd"], shape["n_layer"], shape["vocab"]
    dims = [(C, C)] * 4 * L + [(4 * C, C), (C, 4 * C)] * L + [(V, C)]
    mats = [torch.randn(o, i, generator=g) * 0.02 for o, i in dims]
    n = sum(w.numel() for w in mats)
    scale = [w.abs().amax(1) / 127 for w in mats]
    codes = [torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8) for w, s in zip(mats, scale)]
    w_t = [w.t().contiguous() for w in mats]                  # x @ W_t: prepare_for_decoding's layout
    w_t16 = [w.to(torch.bfloat16) for w in w_t]
    s16 = [s.to(torch.bfloat16) for s in scale]
    kernels = {
        "fp32 dense (x @ W_t)": (4, lambda: [torch.randn(1, w.shape[0]) @ w for w in w_t]),
        "bf16 dense (x @ W_t)": (2, lambda: [torch.randn(1, w.shape[0], dtype=torch.bfloat16) @ w for w in w_t16]),
        "int8 torch._weight_int8pack_mm (bf16 in)": (1, lambda: [
            torch._weight_int8pack_mm(torch.randn(1, q.shape[1], dtype=torch.bfloat16), q, s)
            for q, s in zip(codes, s16)]),
    }
    try:  # fbgemm's dynamic int8 linear (torch.ao, deprecated): the other int8 CPU kernel in torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = [torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
                q, s.double(), torch.zeros(q.shape[0], dtype=torch.long), 0), None) for q, s in zip(codes, scale)]
        kernels["int8 fbgemm quantized::linear_dynamic"] = (1, lambda: [
            torch.ops.quantized.linear_dynamic(torch.randn(1, q.shape[1]), p, False) for q, p in zip(codes, packed)])
    except (AttributeError, RuntimeError) as e:
        print(f"  (fbgemm's dynamic int8 linear not measured: {str(e).splitlines()[0]})")
    rates = {}
    with torch.inference_mode():
        for name, (bpw, fn) in kernels.items():
            fn()
            rates[name] = (n / min(bench_cpu._timed(fn, runs)), bpw)
    return {"weights": n, "rates": rates}


def gpu_lora(args, ckpt: str) -> None:
    """On CUDA: a LoRA step (bf16 autocast, the trainer's pieces) over a none / int8 / nf4 base
    (nf4: bitsandbytes, skipped when it is not installed), tok/s and torch's peak allocated memory
    against the planner's estimate (which adds GPU_RUNTIME for the CUDA context: not allocated)."""
    import importlib.util

    import torch

    from rwkvtune.configs.model_loader import load_model_config
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.peft import get_mode
    from rwkvtune.train.memory import GPU_RUNTIME, GIB, estimate_gib
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT
    from rwkvtune.train.runtime import autocast_factory
    from rwkvtune.train.trainer import build_module

    mc = load_model_config(ckpt)
    print(f"\nGPU LoRA step ({torch.cuda.get_device_name()}), bf16 autocast, B=1 T={args.T}, WKV backend "
          f"{args.wkv_backend}:")
    for quant in ("none", "int8", "nf4"):
        if quant == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            print("  nf4: bitsandbytes is not installed here: skipped")
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(model=ckpt, data="(unused)", device="cuda", ctx_len=args.T, batch_size=1, mode="lora",
                          precision="bf16", base_quant=quant, wkv_backend=args.wkv_backend).resolve(mc)
        module = build_module(cfg, get_mode("lora"), mc, "cuda")
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, mc.vocab_size, (1, args.T + 1), device="cuda")
        ctx = StepContext(cfg=cfg, device="cuda", autocast=autocast_factory("cuda", "bf16"), scale=1.0 / args.T)
        method = SFT(cfg)

        def step():
            method.forward_backward(module, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, ctx)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()

        times = bench_cpu._timed(step, args.runs)
        peak = torch.cuda.max_memory_allocated() / GIB
        est = estimate_gib(mc, cfg) - GPU_RUNTIME / GIB
        print(f"  {quant:<5} {args.T / statistics.median(times):>9.0f} tok/s   peak {peak:6.2f} GiB   planner "
              f"{est:6.2f} GiB (without the CUDA context)   estimate/peak {est / peak:.2f}")
        module = opt = None  # freed before the next base


def spawn(args, worker: str, variant: str, ckpt: str) -> dict:
    argv = ["--worker", worker, "--variant", variant, "--ckpt", ckpt, "--threads", str(args.threads), "--runs",
            str(args.runs), "--T", str(args.T), "--decode-tokens", str(args.decode_tokens)]
    return bench_cpu.run_script_worker(__file__, argv, args.threads, f"{worker}/{variant}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter: T=128, 2 runs, 16 decoded tokens")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 128-wide model: checks the script runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--runs", type=int, default=None, help="timed repetitions per variant (default 3)")
    p.add_argument("--T", type=int, default=None, help="tokens per LoRA step, B=1 (default 512)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per timing (default 64)")
    p.add_argument("--gpu", action="store_true", help="only the CUDA LoRA step (none / int8 / nf4 base) and its "
                                                      "peak memory against the planner")
    p.add_argument("--size", default=None, help="with --gpu: a registry size (e.g. 1.5b) built with random "
                                                "weights instead of the 0.1B shape")
    p.add_argument("--wkv-backend", default="auto", choices=("auto", "chunked", "fla"),
                   help="with --gpu: the WKV kernel of the LoRA step (chunked: no Triton autotuning, which takes "
                        "minutes in every new process; the planner counts that backend's tensors)")
    p.add_argument("--worker", choices=["lora", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    args = bench_cpu.fill_defaults(p.parse_args())
    if args.worker == "lora":
        bench_lora.MODES.update(LORA)
        args.mode, args.worker, args.bf16_budget = args.variant, "lora_step", 0.0
        bench_cpu.WORKERS["lora_step"] = bench_lora.worker_step
        return bench_cpu.run_worker(args)
    if args.worker == "decode":
        bench_cpu.WORKERS["decode_quant"] = worker_decode
        args.worker = "decode_quant"
        return bench_cpu.run_worker(args)

    import torch

    shape = TINY_SHAPE if args.tiny else SHAPE
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    print("command: " + " ".join([os.path.basename(sys.executable), script] + sys.argv[1:]))
    print(f"rwkvtune quantized-base benchmark | torch {torch.__version__} | threads {args.threads} of "
          f"{os.cpu_count()} cores | load average before {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: L{shape['n_layer']} C{shape['n_embd']} head {shape['head_size']} V{shape['vocab']}"
          f"{' (--tiny: not the 0.1B shape)' if args.tiny else ' (0.1B shape)'}, random weights, bf16 file")
    with tempfile.TemporaryDirectory(prefix="rwkvtune-bench-") as tmp:
        ckpt = os.path.join(tmp, "rwkv7-bench.pth")
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from helpers import make_state_dict

        if args.size:
            from rwkvtune.configs.model_loader import load_model_config

            c = load_model_config(args.size)
            shape = dict(n_layer=c.n_layer, n_embd=c.n_embd, head_size=c.head_size_a, vocab=c.vocab_size,
                         d_decay=c.dim_att_lora, d_aaa=c.dim_aaa_lora, d_mv=c.dim_mv_lora, d_gate=c.dim_gate_lora)
        torch.save(make_state_dict(**shape, dtype=torch.bfloat16, seed=0), ckpt)
        if args.gpu:
            return gpu_lora(args, ckpt)
        lora = {v: spawn(args, "lora", v, ckpt) for v in LORA}
        decode = {v: spawn(args, "decode", v, ckpt) for v in DECODE}
    print(f"\nLoRA step, fp32 compute, B=1 T={args.T}, median of {args.runs} after 1 warm-up:")
    print(f"  {'base':<6}{'tok/s':>9}{'peak RSS MB':>13}{'frozen MB':>11}   step split fwd+bwd / opt (s)")
    for v, r in lora.items():
        frozen = sum(r["param_mb"].values())
        print(f"  {v[5:]:<6}{r['tok_s']:>9.1f}{r['rss_peak_mb']:>13.0f}{frozen:>11.0f}   "
              f"{r['fwd_bwd_s']:.2f} / {r['opt_s']:.3f}")
    print("  (frozen MB counts parameters only: a quantized layer's codes are buffers, in the RSS)")
    bw = max(r["read_gb_s"] for r in decode.values())
    print(f"\ndecode, one token at a time after a 16-token prompt, {args.decode_tokens} tokens, median of "
          f"{args.runs}; read bandwidth {bw:.1f} GB/s (512 MiB sum, best):")
    print(f"  {'weights':<8}{'tok/s':>9}{'MB/token':>10}{'bound tok/s':>13}{'of bound':>10}{'vs fp32':>9}"
          f"{'peak RSS MB':>13}")
    base = decode["fp32"]["tok_s"]
    for v, r in decode.items():
        bound = bw * 1e9 / r["bytes_per_token"]
        print(f"  {v:<8}{r['tok_s']:>9.1f}{r['bytes_per_token'] / 1e6:>10.1f}{bound:>13.1f}"
              f"{r['tok_s'] / bound:>10.2f}{r['tok_s'] / base:>8.2f}x{r['rss_peak_mb']:>13.0f}")
    torch.set_num_threads(args.threads)
    k = kernel_rates(shape, max(3, args.runs))
    print(f"\nthe products alone: the {k['weights'] / 1e6:.0f}M weights of those matrices, one row each, "
          f"streamed from memory (best of {max(3, args.runs)}):")
    fp32 = k["rates"]["fp32 dense (x @ W_t)"][0]
    for name, (rate, bpw) in k["rates"].items():
        print(f"  {name:<42}{rate / 1e9:>6.2f} G weights/s {rate * bpw / 1e9:>6.1f} GB/s {rate / fp32:>6.2f}x fp32"
              f"   {k['weights'] / rate * 1e3:>6.1f} ms/token")
    print(f"  (an int8 token cannot beat its product's ms/token; at {bw:.1f} GB/s, 1 byte a weight would take "
          f"{k['weights'] / (bw * 1e9) * 1e3:.1f} ms)")
    print(f"\nload average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
