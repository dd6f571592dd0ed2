"""State tuning: a trained initial WKV state [L, H, N, N] per model, saved as a small file.

The file holds ``wkv_init`` (fp32, S[value, key] like the model's state) plus the model width it
was tuned for. :func:`load_state_file` is the one reader, with one rule set, for every command
that takes ``--state`` (train's outputs, eval, generate).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from rwkvtune.convert.state_formats import PEFT, detect_state_layout, peft_to_wkv_init, save_peft_state
from rwkvtune.errors import CheckpointError
from rwkvtune.io.artifacts import load_artifact, save_artifact
from rwkvtune.peft.base import Mode
from rwkvtune.tensor_checks import check_tensor

STATE_FORMAT = "rwkvtune-state-v1"
MADE_BY = "state.pth from --mode state"
# A tuned state is a sum of decayed outer products of values and keys; magnitudes beyond this
# cannot come from training and would overflow the model's GroupNorm (ln_x) into inf/NaN.
MAX_STATE_ABS = 1e6


def expected_shape(config) -> tuple[int, int, int, int]:
    return (config.n_layer, config.n_head, config.head_size_a, config.head_size_a)


def save_state_file(path, wkv_init: torch.Tensor, model) -> None:
    """Write the state atomically (``.safetensors`` or a torch file, by the suffix)."""
    save_artifact({"format": STATE_FORMAT, "wkv_init": wkv_init.detach().float().cpu().contiguous(),
                   "n_embd": model.config.n_embd}, path)


def load_state_file(path, model) -> torch.Tensor:
    """The tuned initial state for ``model``: [L, H, N, N] fp32 on the model's device.

    Accepts a state file written by ``rwkvtune train --mode state`` (a dict with ``wkv_init``; a
    torch file or ``.safetensors``), a bare tensor, of shape [L, H, N, N] or [L, 1, H, N, N] (a
    batch-1 state), and the layout RWKV-PEFT and RWKV Runner use (``blocks.N.att.time_state``).
    Refuses, in one line naming the file: a file that is not a state, another model's shape,
    non-float or non-finite values, and magnitudes no training produces.
    """
    obj = load_artifact(path, "state file", MADE_BY)
    if isinstance(obj, dict) and "wkv_init" not in obj and detect_state_layout(obj, str(path)) == PEFT:
        obj = peft_to_wkv_init(obj, str(path))
    t = obj.get("wkv_init") if isinstance(obj, dict) else obj
    if not isinstance(t, torch.Tensor):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a state-tuning file with key 'wkv_init' (a tensor [L, H, N, N]), "
                              f"found {keys or 'an empty dict'}; pass the {MADE_BY}")
    want = expected_shape(model.config)
    if t.dim() == 5 and t.shape[1] == 1:  # [L, 1, H, N, N]: a batch-1 state
        t = t[:, 0]
    if tuple(t.shape) != want:
        raise CheckpointError(f"{path}: state shape {list(t.shape)} does not fit this model (expected "
                              f"{list(want)} = [n_layer, n_head, head_size, head_size]); use the state trained for "
                              f"this model")
    check_tensor("wkv_init", t, path, what="state")
    t = t.float()
    largest = float(t.abs().max()) if t.numel() else 0.0
    if largest > MAX_STATE_ABS:
        raise CheckpointError(f"{path}: wkv_init holds values up to {largest:.3g} in magnitude, expected at most "
                              f"{MAX_STATE_ABS:g} (no state tuning produces more, and the model would overflow); the "
                              f"file is damaged or not a tuned state")
    return t.to(model.emb.weight.device)


class StateMode(Mode):
    """Train only the initial WKV state; the model stays frozen (and bf16 with precision bf16)."""

    name = "state"

    def prepare(self, model, cfg) -> torch.Tensor:
        self.freeze(model, cfg.precision == "bf16")
        return torch.zeros(expected_shape(model.config), device=model.emb.weight.device)

    def initial_values(self, module) -> dict[str, torch.Tensor]:
        return {"wkv_init": torch.zeros(module.wkv_init.shape)}

    def save_outputs(self, run, module, cfg) -> dict[str, str]:
        """state.pth (ours), and the same state in the layout RWKV-PEFT and RWKV Runner load."""
        save_state_file(run.state, module.wkv_init.detach(), module.model)
        save_peft_state(run.state_peft, module.wkv_init.detach())
        return {"state": str(run.state), "state_rwkv_peft": str(run.state_peft)}

    @contextlib.contextmanager
    def reference(self, module) -> Iterator[None]:
        module.reference_active = True  # start from zeros: exactly the base model
        try:
            yield
        finally:
            module.reference_active = False

