"""The official RWKV-7 checkpoint layout (docs/rwkv7.md §2): key names and shapes, as facts that
every reader and writer of any format shares. Standard library only."""

from __future__ import annotations

from typing import Any, Mapping

# Where relative model files live; model_loader.models_dir() reads the same variable.
MODEL_DIR_ENV = "RWKVTUNE_MODEL_DIR"
DEFAULT_MODEL_DIR = "~/.rwkvtune/models"

# Layer 0 never uses its value-residual parameters (it defines v_first); some released files carry
# them, older ones do not, and every loader accepts both.
LAYER0_V_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")

# Dims that decide tensor shapes: what a checkpoint can confirm or contradict.
SHAPE_FIELDS = ("n_layer", "n_embd", "vocab_size", "head_size_a", "dim_att_lora", "dim_aaa_lora", "dim_mv_lora",
                "dim_gate_lora", "dim_ffn")

# Prefixes that training wrappers put on every key (Lightning, DDP).
KEY_PREFIXES = ("_forward_module.", "module.")


def strip_prefix(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove a wrapper prefix (``_forward_module.``) present on every key; returns (dict, prefix)."""
    for prefix in KEY_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}, prefix
    return dict(state_dict), ""


def official_shapes(n_layer: int, n_embd: int, vocab_size: int, head_size_a: int, dim_att_lora: int,
                    dim_aaa_lora: int, dim_mv_lora: int, dim_gate_lora: int, dim_ffn: int,
                    layer0_v: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint with its shape (docs/rwkv7.md §2), in training-code order.

    ``layer0_v=False`` leaves out layer 0's unused value-residual keys (LAYER0_V_KEYS).
    """
    C, V, F = n_embd, vocab_size, dim_ffn
    H, N = n_embd // head_size_a, head_size_a
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    lowrank = {"w": dim_att_lora, "a": dim_aaa_lora, "v": dim_mv_lora, "g": dim_gate_lora}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            shapes[p + "ln0.weight"] = shapes[p + "ln0.bias"] = (C,)
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            shapes[p + "att." + name] = (1, 1, C)
        for letter, d in lowrank.items():
            shapes[f"{p}att.{letter}1"] = (C, d)
            shapes[f"{p}att.{letter}2"] = (d, C)
        shapes[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[f"{p}att.{name}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"] = shapes[p + "att.ln_x.bias"] = (C,)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    if not layer0_v:
        for key in LAYER0_V_KEYS:
            shapes.pop(key, None)
    shapes["ln_out.weight"] = shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes
