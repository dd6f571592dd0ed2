"""Running the model for decoding: a CPU-friendly weight layout, and the model helpers that
streaming and batched generation share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.generate.config import GenerationError


# Decode batches up to this many rows take the column-split product below; more rows (a prefill)
# are one large GEMM, which MKL already runs well.
_SPLIT_ROWS = 64


class _DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose no-grad products on CPU with a
    transposed-storage weight (W_t = [in, out] buffer) are split over the torch threads.

    * One row: MKL runs a single-row x @ W_t on one core up to fairly large W, so a decoded token
      used about half of a 2-core machine's memory bandwidth. Splitting the inner dimension into
      one contiguous block of rows of W_t per thread (a view, no copy) and summing the partial
      products runs the blocks in parallel (measured on 2 cores: 768x768 1.5x, 768x3072
      1.6-1.7x, the 65536x768 head 1.9x faster). The summation order differs from one long dot
      product (fp32 rounding only).
    * 2 to 64 rows (batched decoding): MKL's x @ W_t for few rows was measured slower than the
      same product as a batch of column blocks of W_t (a strided view, no copy), which bmm runs
      in parallel: at 32 rows on 2 cores 768x768 1.15x, 768x3072 and 3072x768 1.2x, the head
      (32 blocks of 2048 columns) 1.45x faster; at 8 rows 1.5-1.7x. Every output is the same
      dot product as before, only scheduled differently.
    Anything else (more rows, autograd, other layouts, one thread) is plain F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        o, i = self.out_features, self.in_features
        threads = torch.get_num_threads()
        if not (threads > 1 and self.bias is None and not torch.is_grad_enabled() and w.stride() == (1, o)
                and x.dtype == w.dtype and w.device.type == "cpu" and x.shape[-1] == i):
            return F.linear(x, w, self.bias)
        rows = x.numel() // i
        nb = min(threads, 8)
        if rows == 1 and i % nb == 0:
            w_t = w.t().view(nb, i // nb, o)  # contiguous [in, out] buffer, split along `in`
            return torch.bmm(x.reshape(nb, 1, i // nb), w_t).sum(0).reshape(*x.shape[:-1], o)
        nb = 32 if o >= 32768 else 4
        if 1 < rows <= _SPLIT_ROWS and o % nb == 0:
            blocks = w.t().as_strided((nb, i, o // nb), (o // nb, o, 1))  # column blocks of W_t
            out = torch.matmul(x.reshape(1, rows, i).expand(nb, rows, i), blocks)  # [nb, rows, o / nb]
            return out.transpose(0, 1).reshape(*x.shape[:-1], o)
        return F.linear(x, w, self.bias)


@torch.no_grad()
def prepare_for_decoding(model):
    """Make one-token decoding on CPU faster; values, shapes and state_dict keys do not change.

    * The matrices a decoded token multiplies (head, receptance/key/value/output, ffn key/value)
      are re-stored transposed: ``weight`` becomes a transposed view of an [in, out] buffer, so a
      single row x @ W^T streams W row by row (x @ W_t), which on CPU is faster (head ~1.5-2.5x
      on 2 cores). With one thread ffn.value (4C -> C) is faster as stored and is left alone.
    * Those plain nn.Linear modules become :class:`_DecodeLinear` (a subclass: same parameters),
      whose one-row no-grad product runs on all threads.
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
