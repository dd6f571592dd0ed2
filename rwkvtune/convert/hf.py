"""The Hugging Face RWKV-7 layout of flash-linear-attention (fla): name mapping, export, import.

This is the layout that fla's ``RWKV7ForCausalLM``, the fla-hub and RWKV/*-HF model repos,
the ``rwkv7-hf`` package, mlx-lm and llama.cpp's GGUF converter read. A folder holds
``config.json`` (``model_type`` "rwkv7"), ``model.safetensors`` (or shards plus
``model.safetensors.index.json``) and the World vocab ``rwkv_vocab_v20230424.txt``.

Tensor names (``i`` = layer; C = n_embd, D = a low-rank dim; "T" = stored transposed, "vec" =
stored as [C] instead of [1, 1, C]). Facts from fla's ``fla/layers/rwkv7.py``,
``fla/models/rwkv7/modeling_rwkv7.py`` and ``utils/convert_from_rwkv7.py``, and from the
``rwkv7-hf`` converter, which writes the same names; checked by loading our exports in
``rwkv7-hf`` and reading its own conversions (tests/test_hf.py):

| official (.pth) | Hugging Face (fla) | how |
|---|---|---|
| emb.weight [V, C] | model.embeddings.weight | same |
| blocks.0.ln0.weight / .bias | model.layers.0.pre_norm.weight / .bias | same |
| blocks.i.ln1.weight / .bias | model.layers.i.attn_norm.weight / .bias | same |
| blocks.i.ln2.weight / .bias | model.layers.i.ffn_norm.weight / .bias | same |
| blocks.i.att.x_r, x_w, x_k, x_v, x_a, x_g [1, 1, C] | model.layers.i.attn.x_r ... x_g [1, 1, C] | same |
| blocks.i.att.w0 [1, 1, C] | model.layers.i.attn.w_lora.lora.2.bias [C] | vec |
| blocks.i.att.w1 [C, D] | model.layers.i.attn.w_lora.lora.0.weight [D, C] | T |
| blocks.i.att.w2 [D, C] | model.layers.i.attn.w_lora.lora.2.weight [C, D] | T |
| blocks.i.att.a0 / a1 / a2 | model.layers.i.attn.a_lora.{lora.2.bias,lora.0.weight,lora.2.weight} | vec, T, T |
| blocks.i.att.v0 / v1 / v2 (i>=1) | model.layers.i.attn.v_lora.{lora.2.bias,lora.0.weight,lora.2.weight} | vec, T, T |
| blocks.i.att.g1 / g2 (no g0) | model.layers.i.attn.g_lora.{lora.0.weight, lora.2.weight} | T, T |
| blocks.i.att.k_k, k_a [1, 1, C] | model.layers.i.attn.k_k, k_a [C] | vec |
| blocks.i.att.r_k [H, N] | model.layers.i.attn.r_k [H, N] | same |
| blocks.i.att.{receptance,key,value,output}.weight | model.layers.i.attn.{r,k,v,o}_proj.weight | same |
| blocks.i.att.ln_x.weight / .bias | model.layers.i.attn.g_norm.weight / .bias | same |
| blocks.i.ffn.x_k [1, 1, C] | model.layers.i.ffn.x_k [C] | vec |
| blocks.i.ffn.key.weight / value.weight | model.layers.i.ffn.key.weight / value.weight | same |
| ln_out.weight / .bias | model.norm.weight / .bias | same |
| head.weight [V, C] | lm_head.weight (not tied) | same |

* Layer 0's value-residual parameters (``blocks.0.att.v0/v1/v2``) are never used and the HF
  layout has no place for them. An export keeps them, when the source has them, in
  ``rwkvtune_extra.safetensors`` (official names; HF loaders ignore the file), and an import
  restores them from it; without it the state dict simply lacks them, as older official files do.
* The older fla layout (until April 2025) fused the six token-shift vectors into one tensor
  ``model.layers.i.attn.x_x`` [6, C], rows in the order r, w, k, v, a, g; it is read too, as
  is the [6, 1, 1, C] form that some published RWKV/*-HF checkpoints carry.
  Vectors are accepted as [C] or [1, 1, C] (fla's earliest files), whatever the current form.
* One numeric difference to know: fla and rwkv7-hf give ``g_norm`` (ln_x) the eps
  ``head_dim * norm_eps``; the reference uses 64e-5 for every head size. They agree for the
  released head size 64 only; a model with another head size runs slightly differently there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

import torch

from rwkvtune.configs.checkpoint import (
    LAYER0_V, compare_config, detect, load_state_dict, mismatch_error, read_shapes, strip_prefix,
)
from rwkvtune.configs.model_loader import ModelConfig
from rwkvtune.convert.safetensors_io import (
    DEFAULT_SHARD_BYTES, SafetensorsReader, TensorSpec, folder_entries, load_safetensors, safetensors_specs,
    save_safetensors, write_safetensors, write_shards,
)
from rwkvtune.convert.sources import TensorSource, open_official
from rwkvtune.errors import CheckpointError, OutputError
from rwkvtune.utils import atomic_torch_save, output_error

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

def official_to_hf(key: str) -> tuple[str, str]:
    """(HF name, how) for an official key; KeyError for keys outside RWKV-7."""
    if key in _TOP:
        return _TOP[key], SAME
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(key)
    hf, how = _LAYER[m.group(2)]
    return f"model.layers.{m.group(1)}.{hf}", how


def hf_to_official(name: str) -> tuple[str, str]:
    """(official key, how) for an HF name (not the fused x_x); KeyError for others."""
    if name in _TOP_BACK:
        return _TOP_BACK[name], SAME
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LAYER_BACK:
        raise KeyError(name)
    off, how = _LAYER_BACK[m.group(2)]
    return f"blocks.{m.group(1)}.{off}", how


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}); expected the JSON config of a Hugging Face "
                              f"model folder") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'rwkv7' (an RWKV-7 model in "
                              f"the flash-linear-attention layout); rwkvtune only reads RWKV-7")
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
        except KeyError:
            raise CheckpointError(f"{folder}: tensor {name!r} is not part of the RWKV-7 Hugging Face layout "
                                  f"(expected model.embeddings.weight, model.layers.N.attn.*/ffn.*, model.norm.*, "
                                  f"lm_head.weight); the folder holds another model or variant") from None
        refs[key] = _Ref(file, name, how, None, _official_shape(name, spec.shape, how, folder), spec.dtype)
    extra = folder / EXTRA_NAME
    if extra.is_file():
        for name, spec in safetensors_specs(extra).items():
            if name not in LAYER0_V:
                raise CheckpointError(f"{extra}: unexpected tensor {name!r}; this side file holds only "
                                      f"{', '.join(LAYER0_V)}; remove the file or write the export again")
            refs[name] = _Ref(extra, name, SAME, None, spec.shape, spec.dtype)
    return refs


def hf_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{official key: shape} of an HF folder, from headers only (no tensor data read); feed it
    to ``rwkvtune.configs.checkpoint.detect`` for the dims."""
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


class HFSource(TensorSource):
    """An HF folder as a TensorSource in the official layout (one tensor read at a time)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = str(folder)
        self._refs = _refs(folder)
        self._readers: dict[Path, SafetensorsReader] = {}
        self.shapes = {k: r.shape for k, r in self._refs.items()}
        self.dtypes = {k: r.dtype for k, r in self._refs.items()}

    def read(self, key: str) -> torch.Tensor:
        r = self._refs[key]
        if r.file not in self._readers:
            self._readers[r.file] = SafetensorsReader(r.file)
        return _official(self._readers[r.file].read(r.name), r)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


def open_model_source(path: str | os.PathLike) -> TensorSource:
    """An official .pth / .safetensors file or an HF folder, as a source of official tensors."""
    if is_hf_folder(path):
        return HFSource(path)
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: is a directory without {CONFIG_NAME}; expected a .pth or .safetensors file, "
                              f"or a Hugging Face RWKV-7 folder ({CONFIG_NAME} + model.safetensors)")
    return open_official(path)


# ---- export -------------------------------------------------------------------------------------

def hf_config(model_config: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """The config.json of an export, with the field names fla's RWKV7Config (and rwkv7-hf) read."""
    c = model_config
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "head_dim": c.head_size_a,
        "num_heads": c.n_head,
        "intermediate_size": int(c.dim_ffn),
        "hidden_ratio": c.dim_ffn / c.n_embd,
        "decay_low_rank_dim": c.dim_att_lora,
        "a_low_rank_dim": c.dim_aaa_lora,
        "v_low_rank_dim": c.dim_mv_lora,
        "gate_low_rank_dim": c.dim_gate_lora,
        "value_dim": [c.n_embd] * c.n_layer,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "attn_mode": "chunk",
        "attn": None,
        # fla's fused (Triton) norms are GPU-only; the plain ones compute the same and run anywhere.
        "fuse_norm": False,
        "fuse_cross_entropy": True,
        "use_cache": True,
        "tie_word_embeddings": False,
        # World vocab: id 0 is end of text; there is no separate BOS or padding token.
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "max_position_embeddings": c.ctx_len,
        "initializer_range": 0.02,
        "torch_dtype": torch_dtype,
    }


def _check_source(source: TensorSource, model_config: ModelConfig | None) -> ModelConfig:
    """Dims detected from the source's shapes; a given config must agree with them."""
    info = detect(source.shapes, {k: str(d).replace("torch.", "") for k, d in source.dtypes.items()},
                  source=source.path)
    if info.extra_keys:
        raise CheckpointError(f"{source.path}: unexpected keys {', '.join(info.extra_keys[:5])} (not part of RWKV-7 "
                              f"x070); this file is from a variant rwkvtune does not support")
    if model_config is not None and compare_config(model_config, info):
        raise mismatch_error(model_config, source.path, source.shapes, info)
    return model_config or info.to_config()


def _export_specs(source: TensorSource, config: ModelConfig, dtype: torch.dtype | None):
    """(HF specs, {HF name: (official key, how)}) in the training-code key order."""
    specs, origin = [], {}
    for key in config.param_shapes(layer0_v=True):
        if key not in source.shapes or key in LAYER0_V:
            continue
        name, how = official_to_hf(key)
        specs.append(TensorSpec(name, hf_shape(source.shapes[key], how), dtype or source.dtypes[key]))
        origin[name] = (key, how)
    return specs, origin


def _main_dtype(specs) -> str:
    counts: dict[torch.dtype, int] = {}
    for s in specs:
        counts[s.dtype] = counts.get(s.dtype, 0) + s.nbytes
    return str(max(counts, key=counts.get)).replace("torch.", "")


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself to disk before the rename makes them visible."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_folder(out_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp)`` on a new temporary folder next to ``out_dir``, then rename it to
    ``out_dir``: a failure (or Ctrl-C) leaves no half-written folder behind."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise OutputError(f"{out}: {what}; choose a new output directory or remove it (an export never "
                          f"overwrites files)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise output_error(out, e) from None
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above): rename cannot replace it on every platform
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(out, e) from None
        raise
    return out


def export_hf(src: str | os.PathLike, out_dir: str | os.PathLike, model_config: ModelConfig | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Write ``src`` (official .pth/.safetensors or an HF folder) as an HF folder ``out_dir``.

    Tensors are read and written one at a time, so memory stays at the largest tensor whatever
    the model size. ``model_config`` (optional) must match the dims detected from ``src``;
    ``dtype`` casts every tensor (default: keep the source's). Returns the folder path.
    """
    from rwkvtune.tokenizer import _default_vocab_file

    with open_model_source(src) as source:
        config = _check_source(source, model_config)
        specs, origin = _export_specs(source, config, dtype)

        def produce(name: str) -> torch.Tensor:
            key, how = origin[name]
            t = to_hf_tensor(source.read(key), how)
            return t.to(dtype) if dtype is not None else t

        def fill(tmp: Path) -> None:
            write_shards(tmp, specs, produce, max_shard_bytes, metadata={"format": "pt"}, fsync=False)
            extra = [k for k in LAYER0_V if k in source.shapes]
            if extra:
                save_safetensors({k: source.read(k) if dtype is None else source.read(k).to(dtype) for k in extra},
                                 tmp / EXTRA_NAME, metadata={"format": "rwkvtune-layer0-v"})
            cfg = hf_config(config, _main_dtype(specs))
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            shutil.copyfile(_default_vocab_file(), tmp / VOCAB_NAME)

        return _write_folder(out_dir, fill)


def load_model_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(official state dict, stripped key prefix) of an HF folder, an official ``.safetensors``
    or a ``.pth``; memory-mapped, never unpickling anything but tensors."""
    if is_hf_folder(path):
        return load_hf_state_dict(path), ""
    if str(path).endswith(".safetensors"):
        return strip_prefix(load_safetensors(path))
    return load_state_dict(path, mmap=True)


def read_model_shapes(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str], str]:
    """({official key: shape}, {key: dtype name}, stripped prefix) of an HF folder, an official
    ``.safetensors`` or a ``.pth``, from headers only: the same answer as
    ``rwkvtune.configs.checkpoint.read_shapes`` gives for a ``.pth``."""
    if is_hf_folder(path) or str(path).endswith(".safetensors"):
        with open_model_source(path) as s:
            return dict(s.shapes), {k: str(d).replace("torch.", "") for k, d in s.dtypes.items()}, s.key_prefix
    return read_shapes(path)


def convert_to_official(src: str | os.PathLike, out_path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write ``src`` (HF folder, .pth or .safetensors) as one official-layout file, atomically:
    ``.safetensors`` streamed one tensor at a time; ``.pth`` through ``torch.save``, which takes
    the whole state dict (its large tensors stay memory-mapped until written)."""
    with open_model_source(src) as source:
        config = _check_source(source, None)
        keys = [k for k in config.param_shapes(layer0_v=True) if k in source.shapes]

        def produce(key: str) -> torch.Tensor:
            t = source.read(key)
            return t.to(dtype) if dtype is not None else t

        if str(out_path).endswith(".safetensors"):
            specs = [TensorSpec(k, source.shapes[k], dtype or source.dtypes[k]) for k in keys]
            write_safetensors(out_path, specs, produce, metadata={"format": "pt"})
            return
    sd, _ = load_model_state_dict(src)
    atomic_torch_save({k: (sd[k] if dtype is None else sd[k].to(dtype)).contiguous() for k in keys}, out_path)
