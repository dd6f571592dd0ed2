"""The Hugging Face RWKV-7 layout of flash-linear-attention (fla): tensor names and reading a
model folder into the official layout (the mapping table is in :mod:`rwkvtune.convert.hf`).

Headers are read without tensor data, and tensors are memory-mapped: no pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from rwkvtune.errors import CheckpointError
from rwkvtune.io.layout import LAYER0_V_KEYS
from rwkvtune.io.safetensors_io import folder_entries, load_safetensors, safetensors_specs
from rwkvtune.io.variants import hf_model_type_refusal
from rwkvtune.utils import read_error

CONFIG_NAME = "config.json"
VOCAB_NAME = "rwkv_vocab_v20230424.txt"
EXTRA_NAME = "rwkvtune_extra.safetensors"
HF_MODEL_TYPE = "rwkv7"
SAME, TRANSPOSED, VEC = "same", "T", "vec"
FUSED_SHIFT = "attn.x_x"  # older fla layout: [6, C]
FUSED_ORDER = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")

_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
        "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}


def _layer_table() -> dict[str, tuple[str, str]]:
    """{official suffix after 'blocks.i.': (HF suffix after 'model.layers.i.', how)}."""
    t = {f"{ln}.{p}": (f"{hf}.{p}", SAME) for ln, hf in (("ln0", "pre_norm"), ("ln1", "attn_norm"),
                                                        ("ln2", "ffn_norm")) for p in ("weight", "bias")}
    t.update({f"att.{x}": (f"attn.{x}", SAME) for x in FUSED_ORDER})
    for letter in "wavg":
        if letter != "g":
            t[f"att.{letter}0"] = (f"attn.{letter}_lora.lora.2.bias", VEC)
        t[f"att.{letter}1"] = (f"attn.{letter}_lora.lora.0.weight", TRANSPOSED)
        t[f"att.{letter}2"] = (f"attn.{letter}_lora.lora.2.weight", TRANSPOSED)
    t.update({"att.k_k": ("attn.k_k", VEC), "att.k_a": ("attn.k_a", VEC), "att.r_k": ("attn.r_k", SAME)})
    for name, proj in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
        t[f"att.{name}.weight"] = (f"attn.{proj}.weight", SAME)
    t.update({f"att.ln_x.{p}": (f"attn.g_norm.{p}", SAME) for p in ("weight", "bias")})
    t.update({"ffn.x_k": ("ffn.x_k", VEC), "ffn.key.weight": ("ffn.key.weight", SAME),
              "ffn.value.weight": ("ffn.value.weight", SAME)})
    return t


_LAYER = _layer_table()
_LAYER_BACK = {hf: (off, how) for off, (hf, how) in _LAYER.items()}
_TOP_BACK = {hf: off for off, hf in _TOP.items()}


# ---- the mapping, one tensor at a time -----------------------------------------------------------

def _translate(name: str, top: dict, pattern: str, layer: dict, template: str) -> tuple[str, str]:
    """(translated name, how) by the top-level table or the per-layer one; KeyError for others."""
    if name in top:
        return top[name], SAME
    m = re.fullmatch(pattern, name)
    if not m or m.group(2) not in layer:
        raise KeyError(name)
    other, how = layer[m.group(2)]
    return template.format(m.group(1), other), how


def official_to_hf(key: str) -> tuple[str, str]:
    """(HF name, how) for an official key; KeyError for keys outside RWKV-7."""
    return _translate(key, _TOP, r"blocks\.(\d+)\.(.+)", _LAYER, "model.layers.{}.{}")


def hf_to_official(name: str) -> tuple[str, str]:
    """(official key, how) for an HF name (not the fused x_x); KeyError for others."""
    return _translate(name, _TOP_BACK, r"model\.layers\.(\d+)\.(.+)", _LAYER_BACK, "blocks.{}.{}")


def hf_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    """The HF shape of an official tensor of ``shape``."""
    if how == TRANSPOSED:
        return tuple(reversed(shape))
    return (shape[-1],) if how == VEC else tuple(shape)


def to_hf_tensor(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == TRANSPOSED:
        return t.t().contiguous()
    return t.reshape(-1) if how == VEC else t


def _official_shape(name: str, shape: tuple[int, ...], how: str, folder) -> tuple[int, ...]:
    """The official shape of an HF tensor, refusing shapes the layout cannot have."""
    ok = {TRANSPOSED: len(shape) == 2, VEC: len(shape) >= 1 and all(d == 1 for d in shape[:-1]),
          SAME: True}[how]
    if not ok:
        want = {TRANSPOSED: "2 dims", VEC: "[C] or [1, 1, C]"}[how]
        raise CheckpointError(f"{folder}: tensor {name!r} has shape {list(shape)}, expected {want}; the folder is "
                              f"damaged or not an RWKV-7 model")
    if how == TRANSPOSED:
        return tuple(reversed(shape))
    return (1, 1, shape[-1]) if how == VEC else tuple(shape)


def from_hf_tensor(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == TRANSPOSED:
        return t.t().contiguous()
    return t.reshape(1, 1, -1) if how == VEC else t


# ---- reading HF folders -------------------------------------------------------------------------

def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a directory with a ``config.json`` (a Hugging Face model folder); whether it is
    an RWKV-7 one in this layout is for :func:`hf_shapes` to say, with a reason if not."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_hf_config(folder: str | os.PathLike) -> dict:
    """config.json of an HF folder, checked to be RWKV-7 with safetensors weights."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise read_error(path, e, CheckpointError, "the model folder's config") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}); expected the JSON config of a Hugging Face "
                              f"model folder") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(hf_model_type_refusal(str(path), cfg.get("model_type")))
    if not any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        bins = sorted(p.name for p in folder.glob("*.bin"))
        found = f"only {', '.join(bins)} (pickle files, which rwkvtune never loads)" if bins else "no weights"
        raise CheckpointError(f"{folder}: found {found}; expected model.safetensors (or shards with "
                              f"model.safetensors.index.json): re-save the model with safetensors, e.g. "
                              f"transformers' save_pretrained(..., safe_serialization=True)")
    return cfg


@dataclasses.dataclass(frozen=True)
class _Ref:
    """Where one official tensor lives in an HF folder."""

    file: Path
    name: str  # the tensor's name in that file
    how: str
    row: int | None  # row of the fused x_x tensor
    shape: tuple[int, ...]  # official shape
    dtype: torch.dtype


def _refs(folder: str | os.PathLike) -> dict[str, _Ref]:
    """{official key: _Ref} for every tensor of an HF folder (headers only)."""
    folder = Path(folder)
    read_hf_config(folder)
    refs: dict[str, _Ref] = {}
    for name, (file, spec) in folder_entries(folder).items():
        m = re.fullmatch(r"model\.layers\.(\d+)\." + re.escape(FUSED_SHIFT), name)
        if m:
            if len(spec.shape) < 2 or spec.shape[0] != 6 or any(d != 1 for d in spec.shape[1:-1]):
                raise CheckpointError(f"{folder}: tensor {name!r} has shape {list(spec.shape)}, expected [6, C] or "
                                      f"[6, 1, 1, C] (the older fused token-shift vectors); the folder is damaged")
            for row, x in enumerate(FUSED_ORDER):
                refs[f"blocks.{m.group(1)}.att.{x}"] = _Ref(file, name, SAME, row, (1, 1, spec.shape[-1]), spec.dtype)
            continue
        try:
            key, how = hf_to_official(name)
        except KeyError as e:
            raise CheckpointError(f"{folder}: tensor {name!r} is not part of the RWKV-7 Hugging Face layout "
                                  f"(expected model.embeddings.weight, model.layers.N.attn.*/ffn.*, model.norm.*, "
                                  f"lm_head.weight); the folder holds another model or variant") from e
        refs[key] = _Ref(file, name, how, None, _official_shape(name, spec.shape, how, folder), spec.dtype)
    extra = folder / EXTRA_NAME
    if extra.is_file():
        for name, spec in safetensors_specs(extra).items():
            if name not in LAYER0_V_KEYS:
                raise CheckpointError(f"{extra}: unexpected tensor {name!r}; this side file holds only "
                                      f"{', '.join(LAYER0_V_KEYS)}; remove the file or write the export again")
            refs[name] = _Ref(extra, name, SAME, None, spec.shape, spec.dtype)
    return refs


def hf_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{official key: shape} of an HF folder, from headers only (no tensor data read); feed it
    to ``rwkvtune.io.checkpoint.detect`` for the dims."""
    return {k: r.shape for k, r in _refs(folder).items()}


def _official(t: torch.Tensor, r: _Ref) -> torch.Tensor:
    if r.row is not None:
        return t[r.row].reshape(r.shape).clone()  # a row of x_x: its own small tensor
    return from_hf_tensor(t, r.how).reshape(r.shape)


def load_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{official key: tensor} of an HF folder. The large tensors are memory-mapped (nothing is
    read until used); the transposed low-rank matrices and split vectors are small copies."""
    refs = _refs(folder)
    mapped: dict[Path, dict[str, torch.Tensor]] = {}
    out = {}
    for key, r in refs.items():
        if r.file not in mapped:
            mapped[r.file] = load_safetensors(r.file)
        out[key] = _official(mapped[r.file][r.name], r)
    return out


def tensor_specs(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({official key: shape}, {key: dtype name}) of an HF folder or an official ``.safetensors``
    file, from headers only."""
    if Path(path).is_dir():
        refs = _refs(path)
        return {k: r.shape for k, r in refs.items()}, {k: _dtype_name(r.dtype) for k, r in refs.items()}
    specs = safetensors_specs(path)
    return {k: tuple(v.shape) for k, v in specs.items()}, {k: _dtype_name(v.dtype) for k, v in specs.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
