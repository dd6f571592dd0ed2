"""Running the model for decoding: a CPU-friendly weight layout, and the model helpers that
streaming and batched generation share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.generate.config import GenerationError


# Decode batches up to this many rows take the few-rows products below; more rows (a prefill) are
# one large GEMM, left to F.linear.
_FEW_ROWS = 64
_ONEDNN: list = []  # the probed oneDNN kernel (or None), once per process


def _onednn_linear():
    """torch's oneDNN fp32 linear kernel (``torch.ops.mkldnn._linear_pointwise``, the one
    torch.compile uses on CPU), or None where it is missing or disagrees with F.linear.

    Why: on this project's AMD EPYC (AVX-512) machine MKL's sgemm for 8-32 rows was measured at
    about half the speed of oneDNN on one core (32 rows: 768x768 0.39 vs 0.21 ms, 3072x768 1.8
    vs 0.9 ms, the 65536x768 head 49 vs 23 ms); it reads the plain weight, or the transposed
    storage of :func:`prepare_for_decoding`, without a copy. It is a private operator, so it is
    probed once against F.linear and never trusted blindly.
    """
    if not _ONEDNN:
        fn = None
        try:
            op = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(3, 64, generator=g), torch.randn(96, 64, generator=g)
            with torch.no_grad():
                ok = all(torch.allclose(op(x, ww, None, "none", [None], ""), F.linear(x, w), atol=1e-4, rtol=1e-4)
                         for ww in (w, w.t().contiguous().t()))
            if ok and torch.backends.mkldnn.is_available():
                fn = lambda x, w: op(x, w, None, "none", [None], "")  # noqa: E731
        except (AttributeError, RuntimeError):
            pass
        _ONEDNN.append(fn)
    return _ONEDNN[0]


@torch.compiler.assume_constant_result
def _threads() -> int:
    # torch.get_num_threads() breaks a torch.compile graph; the count is fixed while one compiled
    # step runs (a changed count recompiles nothing: the split is a view, right either way)
    return torch.get_num_threads()


def rows_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias), faster for the 2 to 64 rows of a batched decode step on CPU
    in fp32 without autograd: oneDNN where it works, else (transposed storage, 2+ threads) a
    batch of column blocks of W_t that bmm runs in parallel, which measured 1.15-1.45x faster
    than MKL's x @ W_t at 32 rows on 2 cores. Same values up to fp32 rounding."""
    o, i = w.shape
    rows = x.numel() // i if x.shape[-1] == i else 0
    if not (1 < rows <= _FEW_ROWS and x.dtype == w.dtype == torch.float32 and w.device.type == "cpu"
            and not torch.is_grad_enabled()):
        return F.linear(x, w)
    dnn = _onednn_linear()
    if dnn is not None:
        return dnn(x.reshape(rows, i), w).reshape(*x.shape[:-1], o)
    nb = 32 if o >= 32768 else 4
    if _threads() > 1 and w.stride() == (1, o) and o % nb == 0:
        blocks = w.t().as_strided((nb, i, o // nb), (o // nb, o, 1))  # column blocks of W_t
        out = torch.matmul(x.reshape(1, rows, i).expand(nb, rows, i), blocks)  # [nb, rows, o / nb]
        return out.transpose(0, 1).reshape(*x.shape[:-1], o)
    return F.linear(x, w)


class SplitChoice:
    """Whether one-row products split their inner dimension across threads (see _DecodeLinear),
    decided once per process by timing whole decode steps both ways: :class:`BatchDecoder`'s
    first one-row steps on CPU alternate the two (after ``WARMUP`` untimed steps), with the
    model's own weights in the cache state of real decoding, and the faster (the minimum of
    ``ROUNDS`` steps each, robust to a descheduled step) is kept for the rest of the process.
    Why measured: the split was 1.5-1.9x faster per product on an AMD EPYC machine, and made
    whole decode steps 7% slower on an Intel Xeon with AMX and a 480 MiB L3 (paired in one
    process: 27.4 against 25.6 ms a token), where MKL's own one-row product keeps up. Either way
    the values differ only by fp32 summation order."""

    WARMUP, ROUNDS = 1, 3
    split = True        # the setting while undecided, and where nothing was measured
    decided = False
    _steps = 0
    _best = [float("inf"), float("inf")]   # fastest step seen [without, with] the split

    @classmethod
    def before_step(cls) -> bool:
        """Set the setting of the next calibration step; False when that step is not timed."""
        n = cls._steps - cls.WARMUP
        cls.split = n < 0 or n % 2 == 0
        return n >= 0

    @classmethod
    def after_step(cls, seconds: float | None) -> None:
        if seconds is not None:
            cls._best[int(cls.split)] = min(cls._best[int(cls.split)], seconds)
        cls._steps += 1
        if cls._steps == cls.WARMUP + 2 * cls.ROUNDS:
            cls.split, cls.decided = cls._best[1] <= cls._best[0], True

    @classmethod
    def reset(cls) -> None:
        cls.split, cls.decided, cls._steps, cls._best = True, False, 0, [float("inf"), float("inf")]


class _DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose no-grad products on CPU are faster.

    * One row, transposed-storage weight (W_t = [in, out] buffer), 2+ threads: MKL can run a
      single-row x @ W_t on one core up to fairly large W, so a decoded token used about half of
      a 2-core machine's memory bandwidth. Splitting the inner dimension into one contiguous
      block of rows of W_t per thread (a view, no copy) and summing the partial products runs
      the blocks in parallel (measured on 2 AMD cores: 768x768 1.5x, 768x3072 1.6-1.7x, the
      65536x768 head 1.9x faster). The summation order differs from one long dot product (fp32
      rounding only). Whether it pays on this CPU is measured: :class:`SplitChoice`.
    * 2 to 64 rows (batched decoding): :func:`rows_linear`.
    Anything else (more rows, autograd, bias) is plain F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        o, i = self.out_features, self.in_features
        if self.bias is not None or torch.is_grad_enabled() or x.shape[-1] != i or x.dtype != w.dtype:
            return F.linear(x, w, self.bias)
        nb = min(_threads(), 8)
        if (SplitChoice.split and x.numel() == i and nb > 1 and i % nb == 0 and w.stride() == (1, o)
                and w.device.type == "cpu"):
            w_t = w.t().view(nb, i // nb, o)  # contiguous [in, out] buffer, split along `in`
            return torch.bmm(x.reshape(nb, 1, i // nb), w_t).sum(0).reshape(*x.shape[:-1], o)
        return rows_linear(x, w)


@torch.no_grad()
def prepare_for_decoding(model):
    """Make one-token decoding on CPU faster; values, shapes and state_dict keys do not change.

    * The matrices a decoded token multiplies (head, receptance/key/value/output, ffn key/value)
      are re-stored transposed: ``weight`` becomes a transposed view of an [in, out] buffer, so a
      single row x @ W^T streams W row by row (x @ W_t), which on CPU is faster (head ~1.5-2.5x
      on 2 cores). With one thread ffn.value (4C -> C) is faster as stored and is left alone.
    * Those plain nn.Linear modules become :class:`_DecodeLinear` (a subclass: same parameters),
      whose one-row no-grad product can split across all threads (where that measures faster:
      :class:`SplitChoice`).
    Larger-T matmuls (prefill, training) run at the same speed either way, and saved checkpoints
    are unaffected (``official_state_dict`` writes contiguous tensors). Returns ``model``.
    """
    threads = torch.get_num_threads()
    mods = [getattr(model, "head", None)]
    for block in getattr(model, "blocks", ()):
        att = block.att
        mods += [att.receptance, att.key, att.value, att.output, block.ffn.key]
        if threads > 1:
            mods.append(block.ffn.value)
    for mod in mods:
        w = getattr(mod, "weight", None)
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu"):
            continue
        if w.is_contiguous():
            w.data = w.data.t().contiguous().t()
        if type(mod) is nn.Linear:
            mod.__class__ = _DecodeLinear
    return model


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def check_wkv_init(model, wkv_init: torch.Tensor) -> None:
    cfg = getattr(model, "config", None)
    if not isinstance(wkv_init, torch.Tensor):
        raise GenerationError(f"wkv_init: expected a tensor [L, H, N, N], found {type(wkv_init).__name__}")
    if cfg is None:
        return
    expect = (cfg.n_layer, cfg.n_head, cfg.head_size_a, cfg.head_size_a)
    if tuple(wkv_init.shape) != expect:
        raise GenerationError(f"wkv_init: shape {list(wkv_init.shape)} does not fit this model, expected "
                              f"[L, H, N, N] = {list(expect)}; the state was tuned for another model size")
