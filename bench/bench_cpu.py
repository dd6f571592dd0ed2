"""CPU benchmark of rwkvtune's RWKV-7 against the machine's matmul speed and the `rwkv` package.

Usage: python bench/bench_cpu.py [--quick] [--threads N] [--runs R] [--profile] [--precision fp32|bf16|int8]
       [--compile]

Model: the 0.1B shape (L12, C768, head 64, D_DECAY/D_AAA/D_MV/D_GATE 64/64/32/128, V 65536),
random weights scaled like a trained model (tests/helpers.py), written once to a temporary
bf16 ``.pth`` so rwkvtune and the `rwkv` package (0.8.x, "cpu fp32") run the same file. Both
compute in fp32.

Every measurement runs in its own subprocess (so its peak RSS is its own), warms up first and
reports the median of ``--runs`` timed runs (at most 2 for the `rwkv` package's slow prefill):
  1. fp32 matmul GFLOP/s for several shapes (best sustained = max over shapes of the median);
  2. training forward + backward (cross-entropy, no optimizer) at B=1, T=512, vs the bound
     matmul_GFLOP/s / (6 * non-embedding params) tokens/s;
  3. no-grad prefill of T=512 tokens, each returning the state and the last position's logits;
  4. decode: one token at a time with the state, after a 16-token prompt, against the memory
     bandwidth limit: the same run measures the read bandwidth (a streaming sum over a buffer much
     larger than the caches) and counts the bytes a token reads (every weight matrix it multiplies,
     one embedding row, the WKV state read and written); limit = bandwidth / bytes per token.
rwkvtune runs prefill and decode as `rwkvtune generate` does: RWKV7.from_checkpoint, then
rwkvtune.generate.prepare_for_decoding (same values; decode-friendly layout and threaded one-row
products), torch.inference_mode, prefill with last_only=True, then the in-place
rwkvtune.generate.rnn.BatchDecoder step; the `rwkv` package runs forward(ids, state). Training
uses the model exactly as loaded (no preparation).
--precision bf16: prefill and decode with bf16 weights (WKV state fp32; the `rwkv` package as
"cpu bf16"), training under bf16 autocast as `rwkvtune train precision=bf16` runs it; the matmul
bound is then the bf16 matmul rate and decode reads 2-byte weights. --precision int8 / nf4: prefill
and decode with the big matrices quantized at load as `rwkvtune generate --base-quant int8|nf4`
does (fp32 activations; the decode limit counts the codes' and scales' bytes); the `rwkv` package
has no quantized RWKV-7 strategy, so its rows are its fp32 figures, and training is not measured
(full training refuses a quantized base; LoRA over one: bench/bench_quant.py).
--compile: training and prefill through torch.compile(model, dynamic=True) (inductor), its
warm-up (first call) reported separately.
This is a script that prints figures, not a test. It is sensitive to other processes sharing the
cores; the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab=65536, d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
PROMPT_DECODE = 16
QUANTIZED = ("int8", "nf4")  # --precision values that quantize the big matrices (rwkvtune --base-quant)


def rss_mb() -> float:
    """Peak RSS of this process so far, MB. /proc VmHWM belongs to this process's own address space;
    ru_maxrss is the fallback (on Linux it can carry the parent's peak over fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_now_mb() -> float:
    """Current RSS (VmRSS) of this process, MB (rss_mb gives the peak, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs), so the peak that
    follows excludes earlier transients; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fill_defaults(args):
    """--runs, --T and --decode-tokens not given: the full figures, or the short ones with --quick."""
    args.runs = args.runs or (2 if args.quick else 3)
    args.T = args.T or (128 if args.quick else 512)
    args.decode_tokens = args.decode_tokens or (16 if args.quick else 64)
    return args


# ------------------------------------------------------------------------------------- workers
def _timed(fn, runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _sync(device: str):
    """A function that waits for the device's queued work (timings on CUDA), or does nothing."""
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def matmul_rates(shapes, dtype, device: str = "cpu", runs: int = 3, flop_per_timing: float = 0.3e9) -> dict:
    """GFLOP/s of torch.mm for each (m, k, n) shape on `device` (median of runs); each timing
    repeats the product until it has done about `flop_per_timing` FLOPs. bench_gpu.py uses it too."""
    import torch

    sync = _sync(device)
    res = {}
    for m, k, n in shapes:
        x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        out = torch.empty(m, n, dtype=dtype, device=device)
        flop = 2.0 * m * k * n
        torch.mm(x, w, out=out)
        reps = max(2, int(flop_per_timing / flop) + 1)

        def fn():
            for _ in range(reps):
                torch.mm(x, w, out=out)
            sync()
        times = _timed(fn, max(3, runs))
        res[f"{m}x{k} @ {k}x{n}"] = flop * reps / statistics.median(times) / 1e9
    return res


def read_bandwidth(n: int, device: str = "cpu", runs: int = 3, reps: int = 1) -> dict:
    """Sustained read bandwidth, GB/s: a streaming sum over n fp32 values (far more than the
    caches hold), `reps` sums per timing, median of runs; the copy rate (read + write) alongside."""
    import torch

    sync = _sync(device)
    buf = torch.ones(n, device=device)
    dst = torch.empty(n // 2, device=device)
    buf.sum()

    def read():
        for _ in range(reps):
            buf.sum()
        sync()

    def copy():
        for _ in range(reps):
            dst.copy_(buf[: n // 2])
        sync()
    r, c = _timed(read, max(3, runs)), _timed(copy, max(3, runs))
    return {"read_gb_s": 4 * n * reps / statistics.median(r) / 1e9,
            "copy_gb_s": 2 * 4 * (n // 2) * reps / statistics.median(c) / 1e9}


def worker_matmul(a) -> dict:
    import torch

    shapes = [(512, 768, 768), (512, 768, 3072), (512, 3072, 768), (512, 768, 65536), (1024, 1024, 1024),
              (2048, 2048, 2048)]
    if a.quick:
        shapes = [(512, 768, 768), (512, 768, 3072), (1024, 1024, 1024)]
    dt = torch.bfloat16 if a.precision == "bf16" else torch.float32
    # ~0.3-1 s per timing at 100 GFLOP/s
    res = matmul_rates(shapes, dt, runs=a.runs, flop_per_timing=0.3e9 * (1 if a.quick else 3))
    return {"gflops": res, "best": max(res.values())}


def worker_bandwidth(a) -> dict:
    """Sustained read bandwidth, GB/s, over 512 MB (--quick) or 1 GB: see read_bandwidth."""
    return read_bandwidth((128 if a.quick else 256) * 2 ** 20, runs=a.runs)


def _load_rwkvtune(ckpt, inference=False, precision="fp32", compile_=False):
    """As `rwkvtune train` (inference=False) or `rwkvtune generate` (True) loads the model."""
    import torch
    from rwkvtune.models.rwkv7.model import RWKV7

    dtype = torch.bfloat16 if inference and precision == "bf16" else torch.float32
    quant = precision if precision in QUANTIZED else "none"  # the big matrices quantized at load
    model = RWKV7.from_checkpoint(ckpt, dtype=dtype, quant=quant)
    if inference:
        from rwkvtune.generate import prepare_for_decoding

        prepare_for_decoding(model)
    if compile_:
        model = torch.compile(model, dynamic=True)  # the whole model (inductor); measured here, not shipped
    return model


def _load_rwkv(ckpt, precision="fp32"):  # no quantized RWKV-7 strategy: int8/nf4 compare with fp32
    os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV

    return RWKV(ckpt[:-4], "cpu bf16" if precision == "bf16" else "cpu fp32")


def decode_bytes_per_token(model, batch: int = 1) -> float:
    """Bytes one decoded token reads: every parameter but the embedding and, for a quantized base,
    the codes and scales of its big matrices (each is multiplied or applied once per step, shared
    by the step's `batch` rows), and per row one embedding row and the WKV state read and written
    (fp32)."""
    c = model.config
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                if not n.endswith("fp_sample")]  # a fingerprint, never read
    weights = sum(t.numel() * t.element_size() for n, t in tensors if n != "emb.weight")
    emb = model.emb.weight
    row = emb.shape[1] * emb.element_size() + 2 * c.n_layer * c.n_head * c.head_size_a ** 2 * 4
    return weights / batch + row


def worker_train(a) -> dict:
    import torch
    import torch.nn.functional as F

    from rwkvtune.train.runtime import autocast_factory

    model = _load_rwkvtune(a.ckpt, compile_=a.compile).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.emb.weight.numel()
    V = model.config.vocab_size
    idx = torch.randint(0, V, (1, a.T + 1), generator=torch.Generator().manual_seed(0))
    autocast = autocast_factory("cpu", "bf16" if a.precision == "bf16" else "fp32")

    def step(ids=idx):
        with autocast():
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    t = time.perf_counter()
    step(idx[:, :65])  # warm-up on a short sequence (with --compile: the compilation), then one full step
    warm = time.perf_counter() - t
    times = _timed(step, a.runs)
    prof = _profile(step) if a.profile else None
    return {"seconds": times, "tok_s": a.T / statistics.median(times), "best_tok_s": a.T / min(times),
            "params": n_params, "warmup_s": warm,
            "non_emb_params": n_params - n_emb, "profile": prof}


def worker_prefill(a) -> dict:
    import torch

    ids = torch.randint(0, SHAPE["vocab"], (a.T,), generator=torch.Generator().manual_seed(1)).tolist()
    runs = a.runs
    if a.impl == "rwkv":
        model = _load_rwkv(a.ckpt, a.precision)

        def fn(ids=ids):
            model.forward(ids, None)  # last logits + state
        runs = min(runs, 2)  # its per-token loop makes one T=512 prefill take ~30-60 s on 2 cores
    else:
        model = _load_rwkvtune(a.ckpt, inference=True, precision=a.precision, compile_=a.compile)

        def fn(ids=ids):
            with torch.inference_mode():
                model(torch.tensor([ids]), return_state=True, last_only=True)
    t = time.perf_counter()
    for _ in range(2):  # warm-up (TorchScript profiling runs, allocator, compilation) on a short prompt
        fn(ids[:32])
    warm = time.perf_counter() - t
    times = _timed(fn, runs, warmup=1 if a.compile else 0)  # a compiled model: the full length once more
    prof = _profile(fn) if a.profile else None
    return {"seconds": times, "tok_s": a.T / statistics.median(times), "best_tok_s": a.T / min(times),
            "profile": prof, "warmup_s": warm}


def worker_decode(a) -> dict:
    import torch

    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, SHAPE["vocab"], (PROMPT_DECODE,), generator=g).tolist()
    toks = torch.randint(0, SHAPE["vocab"], (a.decode_tokens,), generator=g).tolist()
    extra = {}
    if a.impl == "rwkv":
        model = _load_rwkv(a.ckpt, a.precision)

        def fn():
            _, state = model.forward(prompt, None)
            t = time.perf_counter()
            for tok in toks:
                _, state = model.forward([tok], state)
            return time.perf_counter() - t
    else:
        from rwkvtune.generate.rnn import BatchDecoder

        model = _load_rwkvtune(a.ckpt, inference=True, precision=a.precision)
        extra["bytes_per_token"] = decode_bytes_per_token(model)

        def fn():  # as stream_generate: prefill, then the in-place one-token step
            with torch.inference_mode():
                _, state = model(torch.tensor([prompt]), return_state=True, last_only=True)
            rnn = BatchDecoder(model, state)
            t = time.perf_counter()
            for tok in toks:
                rnn.step(torch.tensor([tok]))
            return time.perf_counter() - t
    fn()  # warm-up
    times = [fn() for _ in range(a.runs)]
    prof = None
    if a.profile:
        prof = _profile(fn)
    return {"seconds": times, "tok_s": a.decode_tokens / statistics.median(times),
            "best_tok_s": a.decode_tokens / min(times), "profile": prof, **extra}


def _profile(fn) -> str:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


WORKERS = {"bandwidth": worker_bandwidth, "matmul": worker_matmul, "train": worker_train, "prefill": worker_prefill, "decode": worker_decode}


def run_worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    base = rss_mb()
    out = WORKERS[a.worker](a)
    out.update(rss_base_mb=base, rss_peak_mb=rss_mb(), threads=torch.get_num_threads())
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------- main
def run_script_worker(script: str, argv: list[str], threads: int, label: str) -> dict:
    """Run ``script --worker ...`` in a fresh interpreter and return its ``RESULT {json}`` line."""
    env = dict(os.environ, RWKV_V7_ON="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(script)] + argv, capture_output=True, text=True,
                          env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {label} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall"] = time.perf_counter() - t
    return res


def spawn(args, worker, impl="rwkvtune", ckpt="") -> dict:
    argv = ["--worker", worker, "--impl", impl, "--ckpt", ckpt, "--threads", str(args.threads), "--runs",
            str(args.runs), "--T", str(args.T), "--decode-tokens", str(args.decode_tokens)] + \
           ["--precision", args.precision] + (["--quick"] if args.quick else []) + (["--small"] if args.small else []) + \
           (["--profile"] if args.profile else []) + (["--compile"] if args.compile else [])
    return run_script_worker(__file__, argv, args.threads, f"{worker}/{impl}")


def make_checkpoint(path: str) -> None:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import make_state_dict

    torch.save(make_state_dict(**SHAPE, dtype=torch.bfloat16, seed=0), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller and shorter: T=128, 16 decode tokens, 2 runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement (median reported)")
    p.add_argument("--T", type=int, default=None, help="sequence length for training and prefill (default 512)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded one at a time (default 64)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table per measurement")
    p.add_argument("--precision", choices=("fp32", "bf16") + QUANTIZED, default="fp32",
                   help="weights for prefill/decode (bf16: bf16 weights, training under bf16 autocast; "
                        "int8/nf4: the big matrices quantized, no training figure)")
    p.add_argument("--compile", action="store_true",
                   help="training and prefill through torch.compile of the whole model; warm-up reported")
    p.add_argument("--small", action="store_true", help="a 2-layer C256 V4096 model: smoke test of the script only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="rwkvtune", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    args = fill_defaults(p.parse_args())
    if args.small:
        SHAPE.update(n_layer=2, n_embd=256, vocab=4096)
    if args.worker:
        return run_worker(args)

    t_start = time.perf_counter()
    import torch

    print(f"rwkvtune CPU benchmark | torch {torch.__version__} | threads {args.threads} of {os.cpu_count()} cores | "
          f"load average before {os.getloadavg()[0]:.2f} | runs {args.runs} (median) | precision {args.precision}"
          f"{' | torch.compile' if args.compile else ''}")
    print(f"model: 0.1B shape L{SHAPE['n_layer']} C{SHAPE['n_embd']} head {SHAPE['head_size']} dims "
          f"{SHAPE['d_decay']}/{SHAPE['d_aaa']}/{SHAPE['d_mv']}/{SHAPE['d_gate']} V{SHAPE['vocab']}, random weights "
          f"(bf16 file, loaded as {'bf16 for prefill/decode' if args.precision == 'bf16' else 'fp32'})")
    with tempfile.TemporaryDirectory(prefix="rwkvtune-bench-") as tmp:
        ckpt = os.path.join(tmp, "rwkv7-bench-0.1b.pth")
        make_checkpoint(ckpt)
        rows = []

        bw = spawn(args, "bandwidth")
        mm = spawn(args, "matmul")
        mmdt = "bf16" if args.precision == "bf16" else "fp32"
        print(f"\n1. {mmdt} matmul (torch.mm, median of runs):")
        for k, v in mm["gflops"].items():
            print(f"   {k:>22}: {v:7.1f} GFLOP/s")
        rate = mm["best"] * 1e9
        print(f"   best sustained: {mm['best']:.1f} GFLOP/s")

        tr, bound = None, None
        if args.precision in QUANTIZED:
            print(f"\n2. training: not measured with --precision {args.precision} (full training refuses a "
                  f"quantized base; LoRA over one: python bench/bench_quant.py)")
        else:
            tr = spawn(args, "train", ckpt=ckpt)
            flop_tok = 6 * tr["non_emb_params"]
            bound = rate / flop_tok
            print(f"\n2. training forward+backward, B=1 T={args.T}, cross-entropy, no optimizer:")
            print(f"   params {tr['params']:,}; non-embedding params = total - emb.weight = {tr['non_emb_params']:,} "
                  f"(head counted: it is a matmul)")
            print(f"   bound = matmul rate / (6 x non-embedding params) = {mm['best']:.1f}e9 / {flop_tok / 1e9:.3f}e9 "
                  f"= {bound:.1f} tok/s")
            if args.compile:
                print(f"   torch.compile warm-up (first step, T=64): {tr['warmup_s']:.1f} s")
            print(f"   rwkvtune: {tr['tok_s']:.1f} tok/s = {tr['tok_s'] / bound:.2f} x bound (target >= 0.8); "
                  f"runs {_fmt(tr['seconds'])} s; best run {tr['best_tok_s']:.1f} tok/s = "
                  f"{tr['best_tok_s'] / bound:.2f} x bound")
            rows.append(("train fwd+bwd T=%d" % args.T, tr, None))

        pre = {impl: spawn(args, "prefill", impl, ckpt) for impl in ("rwkvtune", "rwkv")}
        print(f"\n3. no-grad prefill, T={args.T} (state + last logits):")
        for impl, r in pre.items():
            print(f"   {impl:>8}: {r['tok_s']:8.1f} tok/s  runs {_fmt(r['seconds'])} s (best {r['best_tok_s']:.1f})")
        pr = pre["rwkvtune"]["tok_s"] / pre["rwkv"]["tok_s"]
        print(f"   ratio rwkvtune / rwkv = {pr:.2f}x (target >= 2.5x)"
              + (f"; compile warm-up {pre['rwkvtune']['warmup_s']:.1f} s" if args.compile else ""))
        rows.append((f"prefill T={args.T}", pre["rwkvtune"], pre["rwkv"]))

        dec = {impl: spawn(args, "decode", impl, ckpt) for impl in ("rwkvtune", "rwkv")}
        print(f"\n4. decode, {args.decode_tokens} tokens one at a time after a {PROMPT_DECODE}-token prompt:")
        for impl, r in dec.items():
            print(f"   {impl:>8}: {r['tok_s']:8.1f} tok/s  ({1000 / r['tok_s']:.1f} ms/token; runs {_fmt(r['seconds'])} s, "
                  f"best {r['best_tok_s']:.1f} tok/s)")
        dr = dec["rwkvtune"]["tok_s"] / dec["rwkv"]["tok_s"]
        bpt = dec["rwkvtune"]["bytes_per_token"]
        limit = bw["read_gb_s"] * 1e9 / bpt
        dl = dec["rwkvtune"]["tok_s"] / limit
        print(f"   ratio rwkvtune / rwkv = {dr:.2f}x")
        print(f"   memory bandwidth (same run): read {bw['read_gb_s']:.1f} GB/s (streaming sum), copy "
              f"{bw['copy_gb_s']:.1f} GB/s; bytes per token {bpt / 1e6:.1f} MB (weights but the embedding, one "
              f"embedding row, WKV state in and out)")
        print(f"   bandwidth limit = {bw['read_gb_s']:.1f} GB/s / {bpt / 1e6:.1f} MB = {limit:.1f} tok/s; "
              f"rwkvtune = {dl:.2f} x limit (target >= 0.8)")
        rows.append((f"decode {args.decode_tokens} tok", dec["rwkvtune"], dec["rwkv"]))

        print("\n5. peak memory: peak RSS (VmHWM) of each measurement's own subprocess, after imports -> end, MB")
        for name, a, b in rows:
            line = f"   {name:<18} rwkvtune {a['rss_base_mb']:6.0f} -> {a['rss_peak_mb']:6.0f}"
            if b:
                line += f" | rwkv {b['rss_base_mb']:6.0f} -> {b['rss_peak_mb']:6.0f}"
            print(line)

        if args.profile:
            for name, r in (("train", tr), ("prefill rwkvtune", pre["rwkvtune"]), ("prefill rwkv", pre["rwkv"]),
                            ("decode rwkvtune", dec["rwkvtune"]), ("decode rwkv", dec["rwkv"])):
                if r is None:
                    continue
                print(f"\n--- profile: {name}\n{r['profile']}")

        pkg = "; the rwkv package in fp32" if args.precision in QUANTIZED else ""
        print("\nSUMMARY (tokens/s; %s; %d threads%s)" % (args.precision, args.threads, pkg))
        print(f"{'measurement':<22}{'rwkvtune':>10}{'rwkv pkg':>10}{'ratio':>8}{'target':>10}"
              f"{'peak RSS MB (ours/pkg)':>26}")
        print(f"{'matmul GFLOP/s':<22}{mm['best']:>10.1f}{'':>10}{'':>8}{'':>10}{mm['rss_peak_mb']:>26.0f}")
        print(f"{'memory read GB/s':<22}{bw['read_gb_s']:>10.1f}{'':>10}{'':>8}{'':>10}{bw['rss_peak_mb']:>26.0f}")
        if tr is not None:
            print(f"{'train fwd+bwd':<22}{tr['tok_s']:>10.1f}{'':>10}{tr['tok_s'] / bound:>7.2f}b{'>= 0.8b':>10}"
                  f"{tr['rss_peak_mb']:>26.0f}")
        print(f"{'prefill':<22}{pre['rwkvtune']['tok_s']:>10.1f}{pre['rwkv']['tok_s']:>10.1f}{pr:>7.2f}x"
              f"{'>= 2.5x':>10}{pre['rwkvtune']['rss_peak_mb']:>19.0f} / {pre['rwkv']['rss_peak_mb']:.0f}")
        print(f"{'decode':<22}{dec['rwkvtune']['tok_s']:>10.1f}{dec['rwkv']['tok_s']:>10.1f}{dr:>7.2f}x"
              f"{'':>10}{dec['rwkvtune']['rss_peak_mb']:>19.0f} / {dec['rwkv']['rss_peak_mb']:.0f}")
        print(f"{'decode vs bandwidth':<22}{dec['rwkvtune']['tok_s']:>10.1f}{limit:>10.1f}{dl:>7.2f}m{'>= 0.8m':>10}")
        print(f"({f'b = fraction of the bound {bound:.1f} tok/s; ' if bound else ''}m = fraction of the memory-bandwidth limit "
              f"{limit:.1f} tok/s at {bpt / 1e6:.1f} MB/token; load average after {os.getloadavg()[0]:.2f}; "
              f"total {time.perf_counter() - t_start:.0f} s)")


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


if __name__ == "__main__":
    main()
