"""WKV-7 operator: the chunked backend against the per-token reference (values and gradients)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from rwkvtune.models.rwkv7.wkv import available_backends, wkv7

F64 = torch.float64


def make_inputs(B, T, H, N, *, dtype=F64, w_low=None, seed=0, state=False):
    """Realistic scaling: model-like log-decay (or uniform down to w_low), unit kk per head."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, dtype=F64)  # noqa: E731
    r, k, v = rnd() * 0.5, rnd() * 0.5, rnd() * 0.5
    if w_low is None:
        w = -0.606531 * torch.sigmoid(rnd())
    else:
        w = w_low * torch.rand(B, T, H, N, generator=g, dtype=F64)
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd())
    xs = [x.to(dtype) for x in (r, w, k, v, a, b)]
    s0 = (torch.randn(B, H, N, N, generator=g, dtype=F64) * 0.3).to(dtype) if state else None
    return xs, s0


def run(backend, xs, s0, **kw):
    xs = [x.detach().requires_grad_() for x in xs]
    s0 = None if s0 is None else s0.detach().requires_grad_()
    y, s = wkv7(*xs, s0, backend=backend, **kw)
    return xs, s0, y, s


CASES = [  # B, T, H, N, w_low, with_state
    (1, 1, 1, 4, None, False),
    (2, 5, 3, 4, None, True),
    (1, 16, 1, 8, -5.0, True),
    (2, 37, 3, 8, None, False),
    (1, 100, 3, 8, -5.0, True),
    (2, 100, 1, 4, None, True),
    (1, 37, 1, 64, -5.0, True),
    (2, 16, 3, 64, None, False),
]


@pytest.mark.parametrize("B,T,H,N,w_low,with_state", CASES)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_chunked_matches_reference_fp64(B, T, H, N, w_low, with_state, chunk_size):
    xs, s0 = make_inputs(B, T, H, N, w_low=w_low, state=with_state, seed=B * 1000 + T)
    xr, sr, y_ref, s_ref = run("reference", xs, s0)
    xc, sc, y_chk, s_chk = run("chunked", xs, s0, chunk_size=chunk_size)
    assert y_chk.dtype == F64 and s_chk.dtype == F64 and y_chk.shape == (B, T, H, N)
    assert (y_chk - y_ref).abs().max() < 1e-10
    assert (s_chk - s_ref).abs().max() < 1e-10
    # Gradients of a random linear function of y and of the final state.
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y_ref.shape, generator=g, dtype=F64)
    gs = torch.randn(s_ref.shape, generator=g, dtype=F64)
    wrt_r = xr + ([sr] if with_state else [])
    wrt_c = xc + ([sc] if with_state else [])
    d_ref = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), wrt_r)
    d_chk = torch.autograd.grad((y_chk * gy).sum() + (s_chk * gs).sum(), wrt_c)
    for name, p, q in zip("rwkvab" + "S", d_ref, d_chk):
        assert (p - q).abs().max() < 1e-8, f"d{name}: {(p - q).abs().max()}"


def test_extreme_decay_is_exact_in_fp64_and_finite_in_fp32():
    # w down to -300: the chunk is halved / w floored internally; fp64 result still matches.
    xs, s0 = make_inputs(1, 40, 2, 8, w_low=-300.0, state=True)
    _, _, y_ref, s_ref = run("reference", xs, s0)
    _, _, y_chk, s_chk = run("chunked", xs, s0)
    assert (y_chk - y_ref).abs().max() < 1e-10 and (s_chk - s_ref).abs().max() < 1e-10
    x32 = [x.float() for x in xs]
    x32c, s32, y32, st32 = run("chunked", x32, s0.float())
    (y32.sum() + st32.sum()).backward()
    assert torch.isfinite(y32).all() and all(torch.isfinite(x.grad).all() for x in x32c)
    assert (y32.double() - y_ref).abs().max() < 1e-4


def test_gradient_of_y_only_and_of_state_only():
    xs, s0 = make_inputs(2, 21, 2, 8, state=True, seed=13)
    for use_y in (True, False):
        grads = []
        for backend in ("reference", "chunked"):
            xg, sg, y, s = run(backend, xs, s0, **({"chunk_size": 8} if backend == "chunked" else {}))
            (y.sum() if use_y else s.sum()).backward()
            grads.append([torch.zeros_like(x) if x.grad is None else x.grad for x in xg + [sg]])
        for p, q in zip(*grads):  # (the final state does not depend on r: zero or None)
            assert (p - q).abs().max() < 1e-10


def test_gradcheck_tiny():
    xs, s0 = make_inputs(1, 6, 1, 3, state=True, seed=3)
    for backend, kw in (("chunked", {"chunk_size": 4}), ("reference", {})):
        inputs = [x.detach().requires_grad_() for x in xs] + [s0.detach().requires_grad_()]

        def f(*args):
            return wkv7(*args[:6], args[6], backend=backend, **kw)

        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_split_sequence_carries_state(backend):
    xs, s0 = make_inputs(2, 45, 3, 8, state=True, seed=5)
    y_all, s_all = wkv7(*xs, s0, backend=backend)
    y1, s1 = wkv7(*(x[:, :19] for x in xs), s0, backend=backend)
    y2, s2 = wkv7(*(x[:, 19:] for x in xs), s1, backend=backend)
    assert (torch.cat([y1, y2], 1) - y_all).abs().max() < 1e-12
    assert (s2 - s_all).abs().max() < 1e-12


def test_auto_matches_and_decoding_steps():
    xs, s0 = make_inputs(1, 12, 2, 8, state=True, seed=9)
    y, s = wkv7(*xs, s0)  # auto -> chunked on CPU
    ys, st = [], s0
    for t in range(12):  # auto -> reference for T == 1
        yt, st = wkv7(*(x[:, t:t + 1] for x in xs), st)
        ys.append(yt)
    assert (torch.cat(ys, 1) - y).abs().max() < 1e-12 and (st - s).abs().max() < 1e-12


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_bf16_inputs(backend):
    xs, s0 = make_inputs(2, 33, 3, 16, state=True, seed=11)
    xb = [x.to(torch.bfloat16) for x in xs]
    y, s = wkv7(*xb, s0.float(), backend=backend)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    # Oracle: the same bf16-rounded inputs, exact math.
    y64, s64 = wkv7(*(x.double() for x in xb), s0.float().double(), backend="reference")
    assert (y.double() - y64).abs().max() < 0.05 * y64.abs().max()
    assert (s.double() - s64).abs().max() < 1e-4 * s64.abs().max()
    # fp32 in -> fp32 out; fp64 in with fp32 state -> fp64 out.
    y32, s32 = wkv7(*(x.float() for x in xs), None, backend=backend)
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    y64b, s64b = wkv7(*xs, s0.float(), backend=backend)
    assert y64b.dtype == F64 and s64b.dtype == F64
    # Gradients reach bf16 inputs and an fp32 state in their own dtypes.
    xg = [x.detach().requires_grad_() for x in xb]
    sg = s0.float().requires_grad_()
    y, s = wkv7(*xg, sg, backend=backend)
    (y.float().sum() + s.sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in xg)
    assert sg.grad.dtype == torch.float32


def test_empty_sequence_returns_state():
    xs, s0 = make_inputs(1, 0, 2, 4, state=True)
    for backend in ("reference", "chunked"):
        y, s = wkv7(*xs, s0, backend=backend)
        assert y.shape == (1, 0, 2, 4) and torch.equal(s, s0)


def test_error_messages():
    xs, s0 = make_inputs(1, 4, 2, 4, state=True)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda_fast'.*available.*reference.*chunked"):
        wkv7(*xs, backend="cuda_fast")
    if "fla" not in available_backends():
        with pytest.raises(ValueError, match=r"backend 'fla' needs CUDA.*available here.*auto"):
            wkv7(*xs, backend="fla")
    bad = list(xs)
    bad[2] = xs[2][:, :3]
    with pytest.raises(ValueError, match=r"k has shape \(1, 3, 2, 4\) but r has \(1, 4, 2, 4\)"):
        wkv7(*bad)
    bad[2] = xs[2][0]
    with pytest.raises(ValueError, match=r"k must be a 4-D tensor"):
        wkv7(*bad)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, N, N\] = \[1, 2, 4, 4\], "
                                         r"found \[1, 2, 4, 3\]"):
        wkv7(*xs, s0[..., :3])
    with pytest.raises(ValueError, match=r"float64 state needs float64 inputs"):
        wkv7(*(x.float() for x in xs), s0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        wkv7(*xs, backend="chunked", chunk_size=0)
    assert available_backends()[:2] == ["reference", "chunked"]


def test_import_does_not_pull_fla_or_triton():
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import rwkvtune.models.rwkv7.wkv as m\n"
        "new = set(sys.modules) - before\n"
        "bad = sorted(n for n in new if n.split('.')[0] in ('fla', 'triton'))\n"
        "assert 'fla' not in sys.modules and not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("fla", "triton", "einops")),
                    reason="fla-core and triton not installed (see bench/check_fla_interpret.py)")
def test_fla_adapter_matches_reference_under_triton_interpreter():
    # fla's real Triton kernels, interpreted on CPU: checks our adapter's conventions (log-decay,
    # state layout, scale, gradients, packed documents as cu_seqlens) without a GPU. A subprocess,
    # because TRITON_INTERPRET must be set before triton is first imported.
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "check_fla_interpret.py")
    proc = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    verdicts = [l for l in proc.stdout.splitlines() if l.startswith("fla (interpreted)")]
    # the unpacked kernel and packed documents (doc_start -> fla's cu_seqlens), fp32, both OK
    assert len(verdicts) == 2 and "packed documents" in verdicts[1], proc.stdout
    assert all("float32 inputs" in l and ": OK (" in l for l in verdicts), proc.stdout


def test_prepared_gpu_script_runs_its_self_check_on_cpu():
    # bench/bench_gpu.py is run on a lent GPU machine in one short call, with no chance to fix it
    # there: its shared code path (kernel check, reporting) must keep working. On CPU it checks
    # chunked against reference, fp32 and bf16.
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_gpu.py")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--warmup", "1", "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = [l for l in proc.stdout.splitlines() if "chunked vs reference" in l]
    assert len(verdicts) == 2 and all(": OK (" in l for l in verdicts), proc.stdout
    # and the training part (the tiny config on CPU): full, LoRA and an FSDP step, each a line
    steps = [l for l in proc.stdout.splitlines() if l.startswith("train step ")]
    assert [l.split(" (")[0] for l in steps] == [f"train step examples/configs/rwkv7-tiny.json {m}"
                                                  for m in ("full", "lora", "full")], proc.stdout
    assert "(fsdp," in steps[-1] and all("tok/s" in l for l in steps)
    # and the speed section (issue 27's figures): its bounds, then train, prefill, decode B=1 and
    # B=32, each an eager figure (tok/s against its bound, first call, peak) and a compiled line
    # (off on CPU by default: inductor's C++ build takes minutes here)
    out = proc.stdout.splitlines()
    assert any(l.startswith("speed: ") and "WKV backend chunked" in l and "compile off" in l for l in out), proc.stdout
    assert any(l.startswith("speed: fp32 matmul best ") and "read bandwidth" in l for l in out), proc.stdout
    speed = [l for l in out if l.startswith("speed ")]
    labels = ["train fwd+bwd B=1 T=64", "prefill B=1 T=64", "decode B=1 (4 steps", "decode B=32 (4 steps"]
    assert len(speed) == 8 and all(speed[i].startswith(f"speed {labels[i // 2]}") for i in range(8)), proc.stdout
    for eager, compiled in zip(speed[::2], speed[1::2]):
        assert ", eager: " in eager and " tok/s (" in eager and "first call" in eager and "MB RSS" in eager, eager
        assert ", compiled (inductor): not run (compile off" in compiled, compiled
    assert all(" x matmul bound " in l for l in speed[:4:2]) and all(" x bandwidth limit " in l for l in speed[4::2])


@pytest.mark.skipif(os.environ.get("RWKVTUNE_SLOW_TESTS") != "1",
                    reason="traces torch.compile (about 20 s of the suite's budget): set RWKVTUNE_SLOW_TESTS=1, "
                           "and run it before a GPU session (bench/gpu_session.sh)")
def test_gpu_script_compile_paths_match_eager_on_cpu():
    # bench_gpu.py's compiled figures first run on the GPU machine, in one call. Their paths are
    # traced here with the aot_eager backend (Dynamo + AOTAutograd, no Inductor C++ build, which
    # takes minutes on 2 cores): blocks compiled in place with the WKV call outside the graph give
    # eager's loss and gradients, and a compiled BatchDecoder.step gives eager's logits and keeps
    # updating its state in place, step after step.
    import copy
    import dataclasses

    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from rwkvtune.configs.model_loader import load_model_config
    from rwkvtune.generate import prepare_for_decoding
    from rwkvtune.generate.rnn import BatchDecoder

    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", os.path.join(root, "bench", "bench_gpu.py"))
    bg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bg)
    V = 256
    cfg = dataclasses.replace(load_model_config(os.path.join(root, "examples", "configs", "rwkv7-tiny.json")),
                              n_layer=3, vocab_size=V)  # layer 0 and two alike: the reused block graph
    torch.manual_seed(0)
    eager = bg._random_model(cfg, "cpu", torch.float32)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    bg._set_compile_limits()
    for block in compiled.blocks:
        block.compile(backend="aot_eager", dynamic=False)
    ids = torch.randint(0, V, (2, 41))

    def loss_and_grads(model):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss_e, grads_e = loss_and_grads(eager)
    with bg._wkv_outside_graph():
        loss_c, grads_c = loss_and_grads(compiled)
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # the blocks ran compiled
    assert torch.allclose(loss_c, loss_e, rtol=1e-5), (loss_c, loss_e)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for name, g in grads_e.items():
        assert torch.allclose(grads_c[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()) + 1e-9), name

    torch._dynamo.reset()
    counters.clear()
    model = prepare_for_decoding(eager.eval())  # as the speed section (and `rwkvtune generate`) runs it
    with torch.inference_mode():
        _, state = model(ids[:, :8], return_state=True, last_only=True)
    # the state as prefill leaves it (inference tensors), compiled as bench_gpu compiles it
    plain, traced = BatchDecoder(model, state.clone()), BatchDecoder(model, state).compile("aot_eager")
    for t in range(8, 12):
        want, got = plain.step(ids[:, t]), traced.step(ids[:, t])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), t
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    for field in ("att_x_prev", "wkv", "ffn_x_prev"):  # the compiled step's in-place updates landed
        assert torch.allclose(getattr(traced.state, field), getattr(plain.state, field), rtol=1e-4, atol=1e-5), field
    assert not torch.allclose(traced.state.wkv, state.wkv)
    torch._dynamo.reset()


def _gpu_session(tmp_path, **env):
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_session.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,
                          cwd=os.path.join(os.path.dirname(__file__), ".."),
                          env=dict(os.environ, DRY="1", OUT=str(tmp_path), **env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_gpu_session_runs_its_sections_in_order_within_the_budget(tmp_path):
    # The one-call GPU session (bench/gpu_session.sh) dry: each section's command, in priority order,
    # only when its minimum time is left, and only flags the bench scripts accept.
    out = _gpu_session(tmp_path, BUDGET="500", SKIP_BIG="1")
    heads = [l.split(" (at ")[0] for l in out if l.startswith("=== ")]
    assert heads == ["=== kernels", "=== quant", "=== train", "=== speed", "=== fsdp from scratch",
                     "=== fsdp cpu_offload", "=== done at 0 s of the 500 s budget"], out
    commands = [l for l in out if l.startswith("python3 ")]
    assert len(commands) == 6 and "--skip-big" in commands[2] and "--wkv-backend chunked" in commands[1], commands
    root = os.path.join(os.path.dirname(__file__), "..")
    for script in ("bench/bench_gpu.py", "bench/bench_quant.py"):
        helptext = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=root,
                                  timeout=60).stdout
        for cmd in (c for c in commands if script in c):
            flags = [w for w in cmd.split() if w.startswith("--")]
            assert flags and all(f in helptext for f in flags), (script, flags)
    assert open(tmp_path / "bench_gpu.log").read().splitlines() == out
    # a short budget: the sections that need more than is left say so and the rest still run
    out = _gpu_session(tmp_path, BUDGET="70")
    skipped = [l.split(":")[0] for l in out if ": skipped (" in l]
    assert skipped == ["=== quant", "=== train", "=== speed"], out
    assert sum(l.startswith("python3 ") for l in out) == 3, out  # kernels and the two fsdp runs
