"""Tuned-state files: ours <-> the layout RWKV-PEFT writes and RWKV Runner reads.

* ours (``rwkvtune.peft.state``): ``{"format": "rwkvtune-state-v1", "wkv_init": [L, H, N, N] fp32,
  "n_embd": C}``, S[value, key] per head (row = value index, column = key index).
* RWKV-PEFT / RWKV Runner: a flat state dict ``{"blocks.{i}.att.time_state": [H, N, N]}``, one
  key per layer (RWKV-PEFT saves its state-tuning run as exactly these keys, in the model dtype,
  usually bf16; a merged model may also carry them).

Orientation (facts from their code, then measured): for RWKV-7 ``time_state[h]`` is S[value, key],
the same as ours, so no transpose. RWKV-PEFT's x070 state tuning hands ``time_state`` to the
Triton kernel as the initial state, whose output is ``y_i = sum_j S[i, j] r_j`` (rows are
values), and to fla's ``chunk_rwkv7`` after ``transpose(1, 2)``, since fla's state is
[key, value]. RWKV Runner puts ``time_state`` unchanged into the ``rwkv`` package's state list
(element ``3 i + 1``, fp32), whose v7 update is ``S = S diag(w) + S a b^T + v k^T``; it transposes
only for RWKV-5/6, whose states are [key, value].
Measured: tests/test_hf.py runs a random state in the ``rwkv`` package exactly the way RWKV
Runner feeds a ``time_state`` file and in our model as ``wkv_init``, and the logits agree
within 1e-4; the transposed state gives clearly different logits, so the test tells the two
orientations apart.

The token-shift parts of the RNN state are not in either file: both tools start them at zero.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

from rwkvtune.errors import CheckpointError
from rwkvtune.io.artifacts import load_artifact
from rwkvtune.io.layout import strip_prefix
from rwkvtune.io.safetensors_io import load_safetensors
from rwkvtune.tensor_checks import check_stored
from rwkvtune.utils import atomic_torch_save

STATE_FORMAT = "rwkvtune-state-v1"  # rwkvtune.peft.state.STATE_FORMAT
PEFT_KEY = "blocks.{}.att.time_state"
_PEFT_RE = re.compile(r"blocks\.(\d+)\.att\.time_state")
OURS, PEFT = "rwkvtune", "rwkv-peft"


def detect_state_layout(obj: Any, source: str = "<state>") -> str:
    """"rwkvtune" or "rwkv-peft" for a loaded state file; CheckpointError for anything else."""
    if isinstance(obj, torch.Tensor):
        return OURS  # a bare [L, H, N, N] tensor, as peft.state.load_state_file accepts
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: found a {type(obj).__name__}, expected a state file (rwkvtune's "
                              f"state.pth or RWKV-PEFT's blocks.N.att.time_state dict)")
    if obj.get("format") == STATE_FORMAT or "wkv_init" in obj:
        return OURS
    keys, _ = strip_prefix({k: None for k in obj if isinstance(k, str)})
    if keys and any(_PEFT_RE.fullmatch(k) for k in keys):
        return PEFT
    shown = ", ".join(map(str, list(obj)[:3])) or "none"
    raise CheckpointError(f"{source}: not a state file: expected 'wkv_init' (rwkvtune) or "
                          f"'blocks.N.att.time_state' keys (RWKV-PEFT / RWKV Runner), found keys {shown}")


def peft_to_wkv_init(state_dict: Mapping[str, torch.Tensor], source: str = "<state>") -> torch.Tensor:
    """RWKV-PEFT ``{"blocks.{i}.att.time_state": [H, N, N]}`` -> our ``wkv_init`` [L, H, N, N] fp32.

    Other keys (a merged model's weights) are ignored; the layers must run 0..L-1 with equal shapes.
    """
    sd, _ = strip_prefix(dict(state_dict))
    found = {int(m.group(1)): v for k, v in sd.items() if (m := _PEFT_RE.fullmatch(k))}
    if not found:
        raise CheckpointError(f"{source}: no 'blocks.N.att.time_state' keys; expected an RWKV-PEFT state file")
    L = max(found) + 1
    missing = sorted(set(range(L)) - set(found))
    if missing:
        raise CheckpointError(f"{source}: time_state missing for layers {missing} (largest layer {L - 1}); the file "
                              f"is incomplete: use the complete state file")
    first = found[0]
    for i in range(L):
        t = found[i]
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1] != t.shape[2] or t.shape != first.shape:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{source}: {PEFT_KEY.format(i)} is {shape}, expected [H, N, N] like "
                                  f"{PEFT_KEY.format(0)} {list(first.shape)}; the file is damaged")
        check_stored(PEFT_KEY.format(i), t, source, what="state")  # before .float() casts it silently
    return torch.stack([found[i].float() for i in range(L)]).contiguous()


def wkv_init_to_peft(wkv_init: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our ``wkv_init`` [L, H, N, N] -> RWKV-PEFT / RWKV Runner ``{"blocks.{i}.att.time_state"}``.

    fp32 by default (exact; RWKV Runner casts to fp32 anyway, RWKV-PEFT copies into its model dtype).
    """
    if wkv_init.dim() != 4 or wkv_init.shape[2] != wkv_init.shape[3]:
        raise ValueError(f"wkv_init must be [L, H, N, N], got {list(wkv_init.shape)}")
    return {PEFT_KEY.format(i): wkv_init[i].detach().to("cpu", dtype).contiguous() for i in range(wkv_init.shape[0])}


def to_wkv_init(obj: Any, source: str = "<state>") -> torch.Tensor:
    """``wkv_init`` [L, H, N, N] fp32 from a loaded state file of either layout."""
    if detect_state_layout(obj, source) == PEFT:
        return peft_to_wkv_init(obj, source)
    t = obj if isinstance(obj, torch.Tensor) else obj.get("wkv_init")
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise CheckpointError(f"{source}: 'wkv_init' must be a tensor [L, H, N, N]")
    return t.float()


def load_state_any(path: str | os.PathLike) -> torch.Tensor:
    """``wkv_init`` from a state file of either layout: ``.pth`` (``weights_only`` torch.load)
    or ``.safetensors`` (RWKV-PEFT keys, or ``wkv_init``)."""
    if str(path).endswith(".safetensors"):
        obj: Any = load_safetensors(path, mmap_file=False)
    else:
        obj = load_artifact(path, "state file", "state.pth from --mode state, or an RWKV-PEFT state .pth")
    return to_wkv_init(obj, str(path))


def save_peft_state(path: str | os.PathLike, wkv_init: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Write ``wkv_init`` as an RWKV-PEFT / RWKV Runner state ``.pth``, atomically."""
    atomic_torch_save(wkv_init_to_peft(wkv_init, dtype), path)
