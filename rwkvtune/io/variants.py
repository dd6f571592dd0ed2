"""What a checkpoint is when it is not plain RWKV-7 (x070), named from its key set alone.

rwkvtune trains RWKV-7 "x070" of any depth, width, head size and vocabulary. Other RWKV generations
and the later RWKV-7 variants share many key names with it (``emb.weight``, ``blocks.0.att.*``), so
without this check they fail deep in loading with a shape or missing-key error. Markers (suffixes of
keys under ``blocks.N.``), from the reference code of each generation:

* RWKV-7b: a DeepEmbed FFN plus a "Deep Embedding Attention" branch, ``blocks.N.qkv.*`` (``qq.weight``,
  ``k_emb.weight``, ``lnq.weight``, ...);
* RWKV-7a ("DeepEmbed"): extra FFN tensors ``ffn.s_emb.weight``, ``ffn.s_emb_x.weight``, ``ffn.s0/s1/s2``;
* RWKV-6 (x060): ``att.time_maa_x`` (data-dependent token shift);
* RWKV-5 (x052): ``att.time_faaaa`` without ``time_maa_x``;
* RWKV-4: ``att.time_first`` / ``att.time_mix_k``.

Standard library only; callers pass the key names (or a ``{key: shape}`` mapping).
"""

from __future__ import annotations

import re
from typing import Iterable

SUPPORTED = ("rwkvtune trains RWKV-7 (x070) models only, of any size, head size and vocabulary: use a plain "
             "rwkv7-<release>-<size>-... file (e.g. `rwkvtune models download 1.5b`) or its Hugging Face "
             "folder (model_type 'rwkv7')")

# (regex on the part of a key after "blocks.N.", name of the model, what it adds) in test order:
# 7b carries 7a's tensors too, so it is tested first.
_MARKERS: tuple[tuple[str, str], ...] = (
    (r"qkv\.(qq\.weight|k_emb(_x)?\.weight|v_emb(_x)?\.weight|lnq\.weight|k1|k2)", "an RWKV-7b checkpoint "
     "(DeepEmbed FFN + Deep Embedding Attention)"),
    (r"ffn\.(s_emb(_x)?(\.weight)?|s0|s1|s2)", 'an RWKV-7a ("DeepEmbed") checkpoint'),
    (r"att\.time_maa_x", "an RWKV-6 (x060) checkpoint"),
    (r"att\.time_faaaa", "an RWKV-5 (x052) checkpoint"),
    (r"att\.(time_first|time_mix_k)", "an RWKV-4 checkpoint"),
)
_BLOCK = re.compile(r"(?:.*\.)?blocks\.\d+\.(.+)")


def other_model(keys: Iterable[str]) -> str | None:
    """One phrase naming the model a key set belongs to when it is not plain RWKV-7, with the key
    that shows it, e.g. ``"an RWKV-7a ("DeepEmbed") checkpoint (has 'blocks.0.ffn.s_emb.weight')"``;
    None when no marker of another generation or variant is present."""
    suffixes: dict[str, str] = {}
    for key in keys:
        m = _BLOCK.fullmatch(key)
        if m and m.group(1) not in suffixes:
            suffixes[m.group(1)] = key
    for pattern, what in _MARKERS:
        rx = re.compile(pattern)
        hit = next((key for suffix, key in suffixes.items() if rx.fullmatch(suffix)), None)
        if hit is not None:
            return f"{what} (has {hit!r})"
    return None


def refusal(source: str, keys: Iterable[str]) -> str | None:
    """The one-line refusal for a file or folder whose keys belong to another model, or None."""
    what = other_model(keys)
    return f"{source}: this is {what}, expected RWKV-7 (x070); {SUPPORTED}" if what else None


# Hugging Face config.json "model_type" values of other RWKV generations and common families, for the
# refusal of a folder of another model type.
_HF_TYPES = {
    "rwkv": "RWKV-4 (transformers' RwkvForCausalLM)",
    "rwkv5": "RWKV-5",
    "rwkv6": "RWKV-6",
    "rwkv7a": "RWKV-7a (DeepEmbed)",
    "rwkv7b": "RWKV-7b",
}


def hf_model_type_refusal(config_path: str, model_type: object) -> str:
    """The one-line refusal of a Hugging Face folder whose config.json names another model_type."""
    known = _HF_TYPES.get(model_type) if isinstance(model_type, str) else None
    what = f"a {known} model" if known else f"a model of type {model_type!r}"
    return (f"{config_path}: model_type is {model_type!r}: this folder holds {what}, not RWKV-7; expected "
            f"'rwkv7' (the flash-linear-attention layout); {SUPPORTED}")
