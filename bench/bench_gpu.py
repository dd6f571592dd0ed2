"""GPU check in one short script: fla backend vs chunked PyTorch, then timed training steps.

Run on a CUDA machine with fla-core installed (``pip install -e ".[gpu]"``)::

    python bench/bench_gpu.py                          # everything below
    python bench/bench_gpu.py --sizes 0.1b --skip-big  # quicker
    python bench/bench_gpu.py --skip-train             # kernel check, then the speed section (4.)

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

4. Model speed (``--skip-speed`` leaves it out): what bench/bench_cpu.py measures on CPU, here on
   the device for its 0.1B shape (random weights): a training step (forward + backward, no
   optimizer, bf16 autocast over fp32 weights) at B=1, T=--T against the matmul bound (the best
   measured bf16 matmul rate / 6 N); no-grad prefill at T=--T (bf16 weights, state + last logits);
   decode through rwkvtune.generate.rnn.BatchDecoder after a 16-token prompt at B=1 and B=32
   (bf16 weights, --decode-tokens timed steps) against the measured read bandwidth / bytes per
   token. Each eager and with torch.compile (--compile-backend, inductor; dynamic=False):
   training and prefill compile each block in place with the WKV kernel left outside the graph,
   decode compiles BatchDecoder's step (BatchDecoder.compile). Each line: tok/s of the timed steady state (after warm-up:
   Triton autotunes on its first calls), the first call's seconds apart (compilation and
   autotuning), and peak GPU memory. The WKV backend is the trainer's ("auto": fla when
   importable, else chunked) and is named. A compiled figure that fails prints its reason on its
   line and the rest goes on; all compiled figures together get --speed-budget seconds.

MFU counts 6 N FLOPs per token for full fine-tuning and 4 N for LoRA (no weight-gradient matmuls
for the frozen base), N = non-embedding parameters (the head included).

``--device cpu`` runs the same code with backend "chunked" against "reference", and training
steps and the speed section on the tiny config (peak RSS instead of GPU memory), to check the
script itself on a machine without a GPU. The compiled figures are off there unless
``--speed-compile on`` (inductor's C++ build takes minutes on 2 cores; ``--compile-backend
aot_eager`` traces the same paths in seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time

PROCESS_START = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu  # noqa: E402  (after the path insert: its timers, matmul/bandwidth probes, bytes per token)

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
    sync = bench_cpu._sync(device)
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


def _first_and_steady(fn, sync, warmup: int, n: int) -> tuple[float, float]:
    """(seconds of the first call: compilation and autotuning included, seconds per call after
    `warmup` more calls, the mean of `n`); `sync` waits for the device's queued work."""
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return first, (time.perf_counter() - t) / n


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

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_first = time.perf_counter()
    first, dt = _first_and_steady(step, bench_cpu._sync(device), warmup - 1, steps)  # the first call warms up too
    first_s, cold_s = t_first - t_build + first, t_first - PROCESS_START + first
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


# ------------------------------------------------------------------------------------------------
# 4. Model speed: what bench_cpu.py measures on CPU, on the device, eager and under torch.compile.
DECODE_BATCHES = (1, 32)


def _speed_wkv_backend(device: str) -> tuple[str, str]:
    """The WKV backend `rwkvtune train` ("auto") runs for training and prefill here, and why."""
    if not device.startswith("cuda"):
        return "chunked", "not CUDA"
    from rwkvtune.models.rwkv7.wkv import _fla_installed, _fla_kernel

    if not _fla_installed():
        return "chunked", "fla-core is not installed"
    fla, info = _fla_kernel()
    if fla is None:
        return "chunked", info
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return "fla", f"fla-core {version('fla-core')}"
    return "fla", "fla importable"


@contextlib.contextmanager
def _wkv_outside_graph():
    """While compiled code runs, the WKV call stays out of the graph (torch.compiler.disable: one
    graph break per layer): fla's kernel is Triton already, and Dynamo would unroll the chunked
    backend's loop over T/32 chunks into the graph. Everything else of a block is compiled."""
    import rwkvtune.models.rwkv7.model as model_module

    plain = model_module.wkv7
    model_module.wkv7 = torch.compiler.disable(plain)
    try:
        yield
    finally:
        model_module.wkv7 = plain


def _set_compile_limits() -> None:
    """Regional compilation reuses one graph for blocks 1..L-1 (torch >= 2.5 inlines the modules);
    older torch compiles each block on its own and would fall back to eager after the default
    8 recompiles, so the limit is raised."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(64, getattr(cfg, name)))


def _one_line(e: BaseException) -> str:
    """The exception's first line, and the operator Inductor names when lowering fails (its first
    line is then often empty: "LoweringException: AssertionError: ")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    target = next((ln for ln in lines[1:] if ln.startswith("target:")), None)
    return f"{type(e).__name__}: {text[:300]}" + (f" ({target[:120]})" if target else "")


class _FigureTimeout(BaseException):
    """Not an Exception: torch's compiler catches those in places (a graph break, a fallback) and
    would swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _FigureTimeout in the main thread after `seconds` (SIGALRM; where it is missing, no
    limit): a compilation that runs away ends its figure, not the session."""
    import signal

    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _FigureTimeout(f"stopped after {seconds:.0f} s, the rest of the compiled figures' "
                             f"budget (--speed-budget)")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _speed_measure(kind: str, B: int, compiled: bool, ctx: dict) -> dict:
    """Build a fresh random model for one figure, warm it up, time it. kind: train / prefill /
    decode. Returns first_s (the first call: compilation and Triton autotuning included),
    step_s (mean of the timed calls after warm-up), n (timed calls) and peak."""
    device, config, args = ctx["device"], ctx["config"], ctx["args"]
    cuda = device.startswith("cuda")
    sync = bench_cpu._sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        bench_cpu.reset_peak_rss()
    torch.manual_seed(0)
    T = ctx["T"]
    # Training as `rwkvtune train` runs full fine-tuning: fp32 weights under the precision's
    # autocast; prefill and decode as `rwkvtune generate --precision bf16`: bf16 weights.
    infer_dtype = torch.bfloat16 if cuda else torch.float32
    model = _random_model(config, device, torch.float32 if kind == "train" else infer_dtype)
    model.set_wkv_backend(ctx["backend"])
    scope = contextlib.nullcontext()
    if kind == "train":
        model.train()
        V = config.vocab_size
        ids = torch.randint(0, V, (1, T + 1), device=device)
        autocast = autocast_factory(device, "bf16" if cuda else "fp32")

        def fn():  # bench_cpu's worker_train: forward, cross-entropy, backward, no optimizer
            with autocast():
                logits = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)
        n = args.steps
    else:
        from rwkvtune.generate import prepare_for_decoding

        prepare_for_decoding(model.eval())
        if kind == "prefill":
            ids = torch.randint(0, config.vocab_size, (B, T), device=device)

            def fn():  # bench_cpu's worker_prefill: the state and the last position's logits
                with torch.inference_mode():
                    model(ids, return_state=True, last_only=True)
            n = args.steps
        else:
            from rwkvtune.generate.rnn import BatchDecoder

            prompt = torch.randint(0, config.vocab_size, (B, bench_cpu.PROMPT_DECODE), device=device)
            with torch.inference_mode():  # as stream_generate: prefill (eager), then in-place one-token steps
                _, state = model(prompt, return_state=True, last_only=True)
            dec = BatchDecoder(model, state)
            # compiled as BatchDecoder.compile does it (no_grad, the state made ordinary tensors)
            step = dec.compile(args.compile_backend).step if compiled else dec.step
            tok = torch.randint(0, config.vocab_size, (B,), device=device)  # fed every step: no host copy timed

            def fn():
                step(tok)
            n = ctx["decode_tokens"]
    if compiled and kind != "decode":
        # regional compilation: each block in place (same module tree and parameter names); the
        # embedding, the head and the loss stay eager
        _set_compile_limits()
        for block in model.blocks:
            block.compile(backend=args.compile_backend, dynamic=False)
        scope = _wkv_outside_graph()
    with scope:
        warmup = max(args.warmup, 4) if kind == "decode" and cuda else args.warmup
        first, step_s = _first_and_steady(fn, sync, warmup, n)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else bench_cpu.rss_mb()
    out = {"first_s": first, "step_s": step_s, "n": n, "peak": peak}
    if kind == "decode":
        out["bytes_per_token"] = bench_cpu.decode_bytes_per_token(model, B)
    return out


def model_speed(args, device: str, compile_on: bool) -> None:
    """bench_cpu.py's figures for the 0.1B shape (the tiny config on CPU) on `device`: a training
    step (forward + backward, no optimizer) against the matmul bound, no-grad prefill, and decode
    through BatchDecoder at B=1 and 32 against the memory-bandwidth limit; each eager and compiled
    (inductor by default), with the first call (compilation, autotuning) apart from the timed
    steady state, and the peak memory. A figure that fails prints its reason and the rest goes on."""
    t_section = time.perf_counter()
    cuda = device.startswith("cuda")
    size = "0.1b" if cuda else "examples/configs/rwkv7-tiny.json"
    config = load_model_config(size)
    T = args.T if cuda else 64
    backend, why = _speed_wkv_backend(device)
    ctx = {"device": device, "config": config, "args": args, "T": T, "backend": backend,
           "decode_tokens": args.decode_tokens if cuda else min(args.decode_tokens, 4)}
    dt_name = "bf16" if cuda else "fp32"
    how = (f"on: torch.compile backend {args.compile_backend}, dynamic=False, train/prefill per block with WKV "
           f"outside the graph, decode the whole BatchDecoder.step") if compile_on else "off"
    print(f"speed: {size} L{config.n_layer} C{config.n_embd} V{config.vocab_size}, random weights on {device}; "
          f"train {'under bf16 autocast (fp32 weights)' if cuda else 'in fp32'}, prefill/decode with {dt_name} "
          f"weights; WKV backend {backend} ({why}; decode: BatchDecoder's own in-place step); compile {how}",
          flush=True)
    # the bounds: this device's best matmul rate over the model's shapes and a square one, and
    # its streaming read bandwidth (bench_cpu's probes)
    C, V = config.n_embd, config.vocab_size
    shapes = [(T, C, config.dim_ffn), (T, C, V)] + ([(4096, 4096, 4096)] if cuda else [])
    try:
        mm = bench_cpu.matmul_rates(shapes, torch.bfloat16 if cuda else torch.float32, device,
                                    flop_per_timing=5e12 if cuda else 0.3e9)
        bw = bench_cpu.read_bandwidth(2 ** 28 if cuda else 2 ** 24, device, reps=10 if cuda else 1)
    except Exception as e:  # the figures still print, against NaN bounds
        print(f"speed: matmul / bandwidth probe FAILED ({_one_line(e)})", flush=True)
        mm, bw = {"(none)": float("nan")}, {"read_gb_s": float("nan"), "copy_gb_s": float("nan")}
    rate = max(mm.values()) * 1e9
    print(f"speed: {dt_name} matmul best {rate / 1e12:.2f} TFLOP/s over {', '.join(mm)}; read bandwidth "
          f"{bw['read_gb_s']:.0f} GB/s (copy {bw['copy_gb_s']:.0f})", flush=True)
    non_emb = sum(p.numel() for p in _random_model(config, "meta", torch.float32).parameters()) - V * C
    unit = "GiB" if cuda else "MB RSS"
    figures = [("train", 1, f"train fwd+bwd B=1 T={T}"), ("prefill", 1, f"prefill B=1 T={T}")]
    prompt = f"{ctx['decode_tokens']} steps after a {bench_cpu.PROMPT_DECODE}-token prompt"
    figures += [("decode", B, f"decode B={B} ({prompt})") for B in DECODE_BATCHES]
    compiled_s = 0.0  # seconds spent in compiled figures, against --speed-budget
    for kind, B, label in figures:
        for compiled in (False, True):
            variant = f"compiled ({args.compile_backend})" if compiled else "eager"
            head = f"speed {label}, {variant}"
            if compiled and not compile_on:
                print(f"{head}: not run (compile off; --speed-compile on runs it)", flush=True)
                continue
            if compiled and compiled_s >= args.speed_budget:
                print(f"{head}: skipped (the compiled figures used {compiled_s:.0f} s of their "
                      f"{args.speed_budget:.0f} s budget)", flush=True)
                continue
            t_fig = time.perf_counter()
            try:
                with _time_limit(args.speed_budget - compiled_s) if compiled else contextlib.nullcontext():
                    r = _speed_measure(kind, B, compiled, ctx)
            except (Exception, _FigureTimeout) as e:  # a failed compile (or OOM) ends this figure only
                print(f"{head}: FAILED ({_one_line(e)})", flush=True)
                continue
            finally:
                if compiled:
                    compiled_s += time.perf_counter() - t_fig
                    torch._dynamo.reset()
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            if kind == "decode":
                tok_s = B / r["step_s"]
                limit = bw["read_gb_s"] * 1e9 / r["bytes_per_token"]
                vs = (f"{r['step_s'] * 1000:.2f} ms/step = {tok_s / limit:.3f} x bandwidth limit {limit:.0f} tok/s "
                      f"at {r['bytes_per_token'] / 1e6:.1f} MB/token")
            else:
                tok_s = B * T / r["step_s"]
                # training: 6 FLOPs per non-embedding parameter (the head included); prefill: 2 per
                # parameter of the blocks (the head runs for the last position only)
                flop_tok = 6 * non_emb if kind == "train" else 2 * (non_emb - V * C)
                vs = (f"{r['step_s'] * 1000:.1f} ms/call, {flop_tok * tok_s / 1e12:.3g} TFLOP/s = "
                      f"{tok_s * flop_tok / rate:.2f} x matmul bound {rate / flop_tok:.0f} tok/s")
            print(f"{head}: {tok_s:.0f} tok/s ({vs}; mean of {r['n']}); first call {r['first_s']:.1f} s"
                  f"{' (compile + autotune)' if compiled else ''}; peak {r['peak']:.{2 if cuda else 0}f} {unit}",
                  flush=True)
    print(f"speed: section {time.perf_counter() - t_section:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="0.1b,1.5b")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the card's bf16 dense peak, TFLOP/s")
    ap.add_argument("--skip-kernels", action="store_true",
                    help="leave out the kernel check (fast vs slow WKV backend) and the WKV timings")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-big", action="store_true", help="leave out the 7.2B LoRA step")
    ap.add_argument("--skip-speed", action="store_true", help="leave out the model speed section (4.)")
    ap.add_argument("--speed-compile", choices=("auto", "on", "off"), default="auto",
                    help="the compiled figures of the speed section (auto: on for CUDA, off on CPU, where "
                         "inductor's C++ build takes minutes)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the speed section (aot_eager: tracing only, a quick CPU check)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="timed one-token decode steps (4 at most on CPU)")
    ap.add_argument("--speed-budget", type=float, default=240.0,
                    help="seconds for all compiled figures of the speed section together: one still running "
                         "then is stopped, later ones are skipped (the eager figures always run)")
    args = ap.parse_args()
    on_gpu = args.device.startswith("cuda")
    fast, slow = ("fla", "chunked") if on_gpu else ("chunked", "reference")
    print(f"device {args.device} ({torch.cuda.get_device_name() if on_gpu else 'cpu'}), torch {torch.__version__}")
    for dtype, tol in () if args.skip_kernels else ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        t0 = time.perf_counter()
        errs = kernel_check(args.device, fast, slow, dtype, T=300 if on_gpu else 40, N=64 if on_gpu else 16)
        worst = max(rel for _, rel in errs.values())
        verdict = "OK" if worst < tol else "FAIL"
        print(f"{fast} vs {slow}, {str(dtype)[6:]} inputs ({time.perf_counter() - t0:.1f} s incl. compile): "
              f"{verdict} (worst relative error {worst:.2e}, tolerance {tol:g})")
        for label, (err, rel) in errs.items():
            print(f"    {label:7s} max abs {err:.3e}  rel {rel:.3e}")
    if on_gpu and not args.skip_kernels:
        for name, ms in kernel_timing(args.device, torch.bfloat16).items():
            print(f"WKV fwd+bwd, B=1 T=4096 H=12 N=64 bf16, {name}: {ms:.2f} ms")
    if not args.skip_train:
        train_steps(args, on_gpu)
    if not args.skip_speed:
        try:  # the session's later steps (the trainer's own runs) go on whatever happens here
            model_speed(args, args.device, {"on": True, "off": False}.get(args.speed_compile, on_gpu))
        except Exception as e:
            print(f"speed: section FAILED ({_one_line(e)})", flush=True)
            raise


def train_steps(args, on_gpu: bool) -> None:
    """3. Timed optimizer steps per size x {full, lora}, an FSDP step and (GPU) the 7.2B LoRA step."""
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
