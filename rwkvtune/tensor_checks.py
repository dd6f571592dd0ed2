"""Checks on tensors read from files (models, adapters, states, resumable checkpoints).

One NaN weight makes every logit NaN: generation then prints nothing and evaluation reports NaN,
both with exit status 0, and integer or complex tensors would be cast to float without a word.
Every loader calls :func:`check_stored` on what the file holds (dtype and layout: free, no data
read) and :func:`check_finite` on the tensor it keeps (one pass over its data, in slices, so the
check never holds a second copy of the model), and names the tensor that fails.
"""

from __future__ import annotations

import torch

from rwkvtune.errors import CheckpointError

_SLICE = 1 << 24  # elements per isfinite() call: bounds the temporary mask at 16 MB


def check_stored(name: str, t: torch.Tensor, source, what: str = "tensor") -> None:
    """``t`` must be a dense floating-point tensor (what training writes), else CheckpointError."""
    if t.layout != torch.strided:
        raise CheckpointError(f"{source}: {what} {name} is stored as a {str(t.layout).replace('torch.', '')} tensor, "
                              f"expected a dense one; save the weights with t.to_dense() (or the file is not a "
                              f"model)")
    if not t.is_floating_point():
        raise CheckpointError(f"{source}: {what} {name} holds {str(t.dtype).replace('torch.', '')} values, expected "
                              f"floating-point weights (float32, bfloat16 or float16); the file was not saved from "
                              f"a trained model, or is damaged")


def _isfinite(chunk: torch.Tensor) -> torch.Tensor:
    if chunk.element_size() == 1:  # 8-bit floats (fp8): torch has no isfinite kernel; float32 holds them exactly
        chunk = chunk.float()
    return torch.isfinite(chunk)


def count_non_finite(t: torch.Tensor) -> int:
    """Number of NaN/inf values of ``t`` (0 for a finite tensor, checked in slices)."""
    flat = t.detach().reshape(-1)
    step = _SLICE // 4 if flat.element_size() == 1 else _SLICE  # an fp8 slice is checked as float32
    for start in range(0, flat.numel(), step):
        if not bool(_isfinite(flat[start:start + step]).all()):  # only on failure: the count for the message
            return sum(int((~_isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))
    return 0


def check_finite(name: str, t: torch.Tensor, source, what: str = "tensor") -> None:
    """``t`` must hold no NaN or inf, else CheckpointError naming it and how many."""
    bad = count_non_finite(t)
    if bad:
        raise CheckpointError(f"{source}: {what} {name} holds {bad} non-finite value(s) (NaN or inf) of "
                              f"{t.numel()}; the file is damaged or was saved from a run that diverged: use an "
                              f"earlier checkpoint")


def check_tensor(name: str, t: torch.Tensor, source, what: str = "tensor") -> None:
    """Both checks: dense, floating point and finite."""
    check_stored(name, t, source, what)
    check_finite(name, t, source, what)
