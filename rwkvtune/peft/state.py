"""State tuning: a trained initial WKV state [L, H, N, N] per model, saved as a small file.

The file holds ``wkv_init`` (fp32) plus the shape it fits, so `generate --state` and
`eval --state` refuse a state made for another model with a clear message.
"""

from __future__ import annotations


import torch

from rwkvtune.errors import CheckpointError

STATE_FORMAT = "rwkvtune-state-v1"


def expected_shape(model) -> tuple[int, int, int, int]:
    c = model.config
    return (c.n_layer, c.n_head, c.head_size_a, c.head_size_a)


def save_state_file(path, wkv_init: torch.Tensor, model) -> None:
    from rwkvtune.utils import atomic_torch_save

    atomic_torch_save({"format": STATE_FORMAT, "wkv_init": wkv_init.detach().float().cpu().contiguous(),
                       "n_embd": model.config.n_embd}, path)


def load_state_file(path, model) -> torch.Tensor:
    """The tuned initial state for ``model`` ([L, H, N, N] fp32 on the model's device)."""
    from rwkvtune.utils import load_artifact

    obj = load_artifact(path, "state file", "state.pth from --mode state")
    t = obj.get("wkv_init") if isinstance(obj, dict) else obj
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: expected a state-tuning file with key 'wkv_init' (a tensor [L, H, N, N])")
    want = expected_shape(model)
    if tuple(t.shape) != want:
        raise CheckpointError(f"{path}: state shape {list(t.shape)} does not fit this model (expected "
                              f"{list(want)} = [n_layer, n_head, head_size, head_size]); use the state "
                              f"trained for this model")
    return t.float().to(model.emb.weight.device)
