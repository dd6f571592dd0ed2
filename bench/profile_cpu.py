"""Where the CPU time of one training step and one decode step goes, on the 0.1B shape (fp32).

Usage: python bench/profile_cpu.py [--T 512] [--threads N] [--decode-steps 16] [--skip-train]
       [--n-layer 12 --n-embd 768 --vocab 65536]   (smaller shapes for a smoke run)

Model: random weights in the official layout (tests/helpers.py, the 0.1B dims by default). It
prints markdown tables (docs/cpu-profile.md holds one run and its reading):

* training: one forward + backward (cross-entropy) at B=1, T=--T, model as `rwkvtune train` runs it;
* prefill: one no-grad forward of T tokens returning the state (as generation does);
* decode: one token with the state, as `rwkvtune generate` runs it (prepare_for_decoding, in-place
  state; the step of :class:`rwkvtune.generate.rnn.BatchDecoder`), and the out-of-place
  ``model(idx, state=..., return_state=True)`` for comparison.

Each step is timed without the profiler first (median of a few runs), then run once under
torch.profiler. Every ATen op's self time is sorted into: matmul (mm/bmm/addmm/baddbmm/oneDNN
linear), elementwise and reductions, copies/layout (cat, stack, copy_, clone, pad, index), allocation
(empty/zeros/fill), views (metadata only); and separately whether it ran inside the WKV operator
(forward: the ``wkv7`` call, backward: ``_ChunkedBackward``). Time that no op accounts for is
Python and autograd bookkeeping (plus the profiler's own cost, which is why the profiled wall is
longer than the plain one: shares are of the profiled wall). "dispatch floor" = number of ATen ops
x the measured cost of one trivial op, the part no kernel tuning removes.
On a shared machine absolute times are noisy; the shares and ratios within one run are the figures.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
          "aten::dot", "mkldnn::_linear_pointwise", "aten::_mkldnn_linear", "aten::mkldnn_linear"}
ALLOC = {"aten::empty", "aten::empty_strided", "aten::zeros", "aten::zeros_like", "aten::empty_like", "aten::resize_",
         "aten::new_empty", "aten::new_zeros", "aten::new_empty_strided", "aten::fill_", "aten::zero_",
         "aten::ones_like", "aten::full", "aten::eye", "aten::arange", "aten::ones"}
COPY = {"aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to",
        "aten::index", "aten::constant_pad_nd", "aten::pad", "aten::flip", "aten::masked_fill_", "aten::masked_fill",
        "aten::embedding", "aten::index_select", "aten::where", "aten::gather", "aten::scatter_add",
        "aten::repeat_interleave", "aten::repeat", "aten::embedding_dense_backward", "aten::index_put_",
        "aten::_reshape_alias", "aten::embedding_backward"}
VIEW = {"aten::view", "aten::reshape", "aten::transpose", "aten::permute", "aten::expand", "aten::as_strided",
        "aten::slice", "aten::select", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias",
        "aten::diagonal", "aten::movedim", "aten::_unsafe_view", "aten::numpy_T", "aten::expand_as", "aten::unbind",
        "aten::split", "aten::chunk", "aten::narrow", "aten::matrix_H", "aten::mT", "aten::lift_fresh",
        "aten::split_with_sizes", "aten::view_as", "aten::result_type", "aten::is_nonzero", "aten::item",
        "aten::_local_scalar_dense", "aten::detach_", "detach_", "detach", "aten::resolve_conj", "aten::resolve_neg",
        "aten::_has_compatible_shallow_copy_type", "aten::matmul", "aten::linear", "aten::einsum"}
KINDS = ("matmul", "elementwise", "copies", "alloc", "views", "autograd/other")


def kind_of(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if name in ALLOC:
        return "alloc"
    if name in COPY:
        return "copies"
    if name in VIEW:
        return "views"
    if name.startswith("aten::"):
        return "elementwise"
    return "autograd/other"


def in_wkv(ev) -> bool:
    while ev is not None:
        if ev.name == "wkv7" or "_ChunkedBackward" in ev.name:
            return True
        ev = ev.cpu_parent
    return False


def breakdown(prof, wall_us: float) -> tuple[dict, int]:
    """{(region, kind): self microseconds} over every op, plus the Python remainder; and the op count."""
    out: dict = collections.defaultdict(float)
    n_aten = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        region = "WKV" if in_wkv(ev) else "model"
        out[(region, kind_of(ev.name))] += ev.self_cpu_time_total
        n_aten += ev.name.startswith("aten::") and (ev.cpu_parent is None or not ev.cpu_parent.name.startswith("aten::"))
    covered = sum(out.values())
    out[("-", "python (not in any op)")] = max(wall_us - covered, 0.0)
    return out, n_aten


def dispatch_cost_us() -> float:
    """Cost of one trivial ATen op from Python (a 1-element add), median of a few timings."""
    a, b = torch.ones(1), torch.ones(1)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(2000):
            torch.add(a, b)
        times.append((time.perf_counter() - t) / 2000 * 1e6)
    return statistics.median(times)


def table(title: str, wall_plain_s: float, prof, wall_prof_s: float, floor_us: float, extra: str = "") -> str:
    parts, n_ops = breakdown(prof, wall_prof_s * 1e6)
    total = wall_prof_s * 1e6
    lines = [f"### {title}", "",
             f"wall {wall_plain_s * 1e3:.1f} ms without the profiler, {wall_prof_s * 1e3:.1f} ms with it; "
             f"{n_ops} top-level ATen ops; dispatch floor {n_ops} x {floor_us:.1f} us = {n_ops * floor_us / 1e3:.1f} ms "
             f"= {n_ops * floor_us / 1e3 / (wall_plain_s * 1e3):.0%} of the plain wall. {extra}", "",
             "| region | kind | ms | share |", "|---|---|---:|---:|"]
    for (region, kind), us in sorted(parts.items(), key=lambda kv: -kv[1]):
        if us / total >= 0.002:
            lines.append(f"| {region} | {kind} | {us / 1e3:.1f} | {us / total:.1%} |")
    by_kind: dict = collections.defaultdict(float)
    for (region, kind), us in parts.items():
        by_kind[kind if region != "WKV" else "WKV (all kinds)"] += us
    lines += ["", "Totals: " + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])),
              "", "Top ops by self time:", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), "```", ""]
    return "\n".join(lines)


def timed(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profiled(fn) -> tuple:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    return prof, wall


def label_wkv() -> None:
    """Wrap the model's wkv7 call in a profiler label (forward); the backward shows as _ChunkedBackward."""
    import rwkvtune.models.rwkv7.model as m

    inner = m.wkv7

    def wkv7(*args, **kw):
        with torch.profiler.record_function("wkv7"):
            return inner(*args, **kw)
    m.wkv7 = wkv7


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=16, help="decode tokens timed (the profile covers one)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true", help="training only (no prefill or decode)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="training step: fp32, or bf16 autocast with the trainer's loss (as `rwkvtune train "
                        "--precision bf16` runs it); prefill and decode stay fp32")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--vocab", type=int, default=65536)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from helpers import write_checkpoint

    from rwkvtune.generate import prepare_for_decoding
    from rwkvtune.generate.rnn import BatchDecoder
    from rwkvtune.models.rwkv7.model import RWKV7

    shape = dict(n_layer=a.n_layer, n_embd=a.n_embd, head_size=64, vocab=a.vocab, d_decay=64, d_aaa=64, d_mv=32,
                 d_gate=128)
    label_wkv()
    floor = dispatch_cost_us()
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, "
           f"load average {os.getloadavg()[0]:.2f} at start; shape {shape}; {a.precision}; one trivial op = "
           f"{floor:.1f} us", ""]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(os.path.join(tmp, "m.pth"), dtype=torch.bfloat16, **shape)
        model = RWKV7.from_checkpoint(ckpt)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1, a.T + 1), generator=g)

    if not a.skip_train:
        from rwkvtune.train.loss import loss_sum
        from rwkvtune.train.runtime import autocast_factory

        model.train()
        autocast = autocast_factory("cpu", a.precision)

        def train_step():
            with autocast():
                logits = model(ids[:, :-1])
                loss = (F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)) if a.precision == "fp32"
                        else loss_sum(logits, ids[:, 1:]) / a.T)  # bf16 logits: the trainer's fp32 loss blocks
            loss.backward()
            model.zero_grad(set_to_none=True)
        wall = timed(train_step, a.runs)
        prof, pwall = profiled(train_step)
        out.append(table(f"Training step: forward + backward, B=1, T={a.T}", wall, prof, pwall, floor,
                         f"{a.T / wall:.0f} tok/s."))
        model.eval()

    if a.skip_decode:
        print("\n".join(out))
        return
    prepare_for_decoding(model)

    def prefill():
        with torch.inference_mode():
            return model(ids[:, :a.T], return_state=True, last_only=True)
    wall = timed(prefill, a.runs)
    prof, pwall = profiled(prefill)
    out.append(table(f"Prefill: no-grad forward, T={a.T}, returning the state", wall, prof, pwall, floor,
                     f"{a.T / wall:.0f} tok/s."))

    _, state = prefill()
    toks = ids[0, :a.decode_steps]
    dec = BatchDecoder(model, state.clone())

    def decode_inplace():
        for t in toks:
            dec.step(t.view(1))
    wall = timed(decode_inplace, 1) / len(toks)
    prof, pwall = profiled(lambda: dec.step(toks[:1]))
    out.append(table("Decode step, in-place state (what `rwkvtune generate` runs)", wall, prof, pwall, floor,
                     f"{1 / wall:.1f} tok/s."))

    def decode_forward():
        s = state
        with torch.inference_mode():
            for t in toks:
                _, s = model(t.view(1, 1), state=s, return_state=True)
    wall = timed(decode_forward, 1) / len(toks)
    with torch.inference_mode():
        prof, pwall = profiled(lambda: model(toks[:1].view(1, 1), state=state, return_state=True))
    out.append(table("Decode step, `model(idx, state=..., return_state=True)` (fresh state each token)", wall, prof,
                     pwall, floor, f"{1 / wall:.1f} tok/s."))
    print("\n".join(out))


if __name__ == "__main__":
    main()
