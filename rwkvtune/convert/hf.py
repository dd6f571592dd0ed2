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

import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

import torch

from rwkvtune.configs.check import compare_config, mismatch_error
from rwkvtune.configs.detect import detect
from rwkvtune.configs.model_loader import ModelConfig
from rwkvtune.convert.sources import TensorSource, open_official
from rwkvtune.errors import CheckpointError, OutputError
from rwkvtune.io.checkpoint import load_state_dict
from rwkvtune.io.hf_layout import (
    CONFIG_NAME, EXTRA_NAME, HF_MODEL_TYPE, VOCAB_NAME, _official, _refs, is_hf_folder, official_to_hf,
    hf_shape, to_hf_tensor,
)
from rwkvtune.io.layout import LAYER0_V_KEYS
from rwkvtune.io.safetensors_io import (
    DEFAULT_SHARD_BYTES, SafetensorsReader, TensorSpec, save_safetensors, write_safetensors, write_shards,
)
from rwkvtune.tensor_checks import check_tensor, count_non_finite
from rwkvtune.tokenizer import _default_vocab_file
from rwkvtune.utils import atomic_torch_save, fsync_tree, output_error

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
    return model_config or ModelConfig.from_checkpoint(info)


# fp8 is a storage format: fla, the rwkv package and HF loaders compute in 16/32-bit floats. Without
# a dtype, an fp8 tensor is written in the dtype holding most of the source's other bytes (bfloat16
# when all are fp8); float16, bfloat16 and float32 all hold every fp8 value exactly.
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _out_dtypes(source: TensorSource, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """{official key: the dtype it is written in}: ``dtype`` when given, else the source's own,
    fp8 upcast."""
    if dtype is not None:
        return {k: dtype for k in source.dtypes}
    nbytes: dict[torch.dtype, int] = {}
    for k, d in source.dtypes.items():
        if d not in _FP8:
            nbytes[d] = nbytes.get(d, 0) + math.prod(source.shapes[k]) * torch.empty((), dtype=d).element_size()
    wide = max(nbytes, key=nbytes.get) if nbytes else torch.bfloat16
    return {k: wide if d in _FP8 else d for k, d in source.dtypes.items()}


def _export_specs(source: TensorSource, config: ModelConfig, out_dtypes: dict[str, torch.dtype]):
    """(HF specs, {HF name: (official key, how)}) in the training-code key order."""
    specs, origin = [], {}
    for key in config.param_shapes(layer0_v=True):
        if key not in source.shapes or key in LAYER0_V_KEYS:
            continue
        name, how = official_to_hf(key)
        specs.append(TensorSpec(name, hf_shape(source.shapes[key], how), out_dtypes[key]))
        origin[name] = (key, how)
    return specs, origin


def _checked(key: str, t: torch.Tensor, path, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, refused (naming it) unless dense, floating point and finite, before and
    after the cast: an export must not turn a damaged model into a clean-looking folder, nor a
    value beyond the range of a narrower dtype into an inf that only a later load would find."""
    check_tensor(key, t, path)
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if count_non_finite(out):
        peak = float(t.detach().abs().max().float())
        raise CheckpointError(f"{path}: tensor {key} has values up to {peak:.4g} in magnitude, beyond the range of "
                              f"{str(dtype).replace('torch.', '')}; export with a wider dtype (bfloat16 or float32)")
    return out


def _checked_read(source: TensorSource, key: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of the source in ``dtype``, checked by :func:`_checked`; an error names the file
    that holds it (in an HF folder: which shard, or rwkvtune_extra.safetensors)."""
    where = source._refs[key].file if isinstance(source, HFSource) else source.path
    return _checked(key, source.read(key), where, dtype)


def _main_dtype(specs) -> str:
    counts: dict[torch.dtype, int] = {}
    for s in specs:
        counts[s.dtype] = counts.get(s.dtype, 0) + s.nbytes
    return str(max(counts, key=counts.get)).replace("torch.", "")


def _write_folder(out_dir: str | os.PathLike, fill: Callable[[Path], None], needed: int | None = None) -> Path:
    """Run ``fill(tmp)`` on a new temporary folder next to ``out_dir``, then rename it to
    ``out_dir``: a failure (or Ctrl-C) leaves no half-written folder behind. A failed write (disk
    full) is one OutputError with the ``needed`` bytes."""
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
        raise output_error(out, e) from e
    try:
        fill(tmp)
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above): rename cannot replace it on every platform
        os.replace(tmp, out)
    except BaseException as e:
        written = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file()) if tmp.is_dir() else None
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(out, e, needed, written) from e
        raise
    return out


def export_hf(src: str | os.PathLike, out_dir: str | os.PathLike, model_config: ModelConfig | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Write ``src`` (official .pth/.safetensors or an HF folder) as an HF folder ``out_dir``.

    Tensors are read and written one at a time, so memory stays at the largest tensor whatever
    the model size. ``model_config`` (optional) must match the dims detected from ``src``;
    ``dtype`` casts every tensor (default: keep the source's, fp8 upcast, see :data:`_FP8`). Returns the
    folder path.
    """
    with open_model_source(src) as source:
        config = _check_source(source, model_config)
        out_dtypes = _out_dtypes(source, dtype)
        specs, origin = _export_specs(source, config, out_dtypes)

        def produce(name: str) -> torch.Tensor:
            key, how = origin[name]
            return to_hf_tensor(_checked_read(source, key, out_dtypes[key]), how)

        def fill(tmp: Path) -> None:
            write_shards(tmp, specs, produce, max_shard_bytes, metadata={"format": "pt"}, fsync=False)
            extra = [k for k in LAYER0_V_KEYS if k in source.shapes]
            if extra:  # checked like the rest: our own loader refuses a NaN here, so export must too
                save_safetensors({k: _checked_read(source, k, out_dtypes[k]) for k in extra},
                                 tmp / EXTRA_NAME, metadata={"format": "rwkvtune-layer0-v"})
            cfg = hf_config(config, _main_dtype(specs))
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            shutil.copyfile(_default_vocab_file(), tmp / VOCAB_NAME)

        return _write_folder(out_dir, fill, needed=sum(spec.nbytes for spec in specs))


def convert_to_official(src: str | os.PathLike, out_path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write ``src`` (HF folder, .pth or .safetensors) as one official-layout file, atomically:
    ``.safetensors`` streamed one tensor at a time; ``.pth`` through ``torch.save``, which takes
    the whole state dict (its large tensors stay memory-mapped until written)."""
    with open_model_source(src) as source:
        config = _check_source(source, None)
        keys = [k for k in config.param_shapes(layer0_v=True) if k in source.shapes]
        out_dtypes = _out_dtypes(source, dtype)

        if str(out_path).endswith(".safetensors"):
            specs = [TensorSpec(k, source.shapes[k], out_dtypes[k]) for k in keys]
            write_safetensors(out_path, specs, lambda k: _checked_read(source, k, out_dtypes[k]),
                              metadata={"format": "pt"})
            return
    sd, _ = load_state_dict(src)
    atomic_torch_save({k: _checked(k, sd[k], src, out_dtypes[k]).contiguous() for k in keys}, out_path)
