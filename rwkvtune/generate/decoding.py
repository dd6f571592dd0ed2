"""Running the model for decoding: a CPU-friendly weight layout, and the model helpers that
streaming and batched generation share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.generate.config import GenerationError


class _DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose one-row product, with grad disabled on
    CPU and a transposed-storage weight, is split over the torch threads.

    MKL runs a single-row x @ W_t on one core up to fairly large W, so a decoded token used about
    half of a 2-core machine's memory bandwidth. Splitting the inner dimension into one contiguous
    block of rows of W_t per thread (a view, no copy) and summing the partial products runs the
    blocks in parallel (measured on 2 cores: 768x768 1.5x, 768x3072 1.6-1.7x, the 65536x768 head
    1.9x faster). The summation order differs from one long dot product (fp32 rounding only).
    Anything else (more rows, autograd, other layouts, one thread) is plain F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        o, i = self.out_features, self.in_features
        nb = min(torch.get_num_threads(), 8)
        if (nb > 1 and self.bias is None and not torch.is_grad_enabled() and x.numel() == i and i % nb == 0
                and w.stride() == (1, o) and x.dtype == w.dtype and w.device.type == "cpu"):
            w_t = w.t().view(nb, i // nb, o)  # contiguous [in, out] buffer, split along `in`
            return torch.bmm(x.reshape(nb, 1, i // nb), w_t).sum(0).reshape(*x.shape[:-1], o)
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
