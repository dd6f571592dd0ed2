"""Checkpoint detection: every dimension of an RWKV-7 ``.pth`` read from its tensor shapes.

Released checkpoints store no metadata, so the shapes are the truth (docs/rwkv7.md §2):
V, C from ``emb.weight``; (H, N) from ``r_k``; L from the largest block index; the low-rank
dims from w1/a1/v1/g1 (v1 of a layer >= 1, since layer 0 may lack v0/v1/v2). The shapes come
from :func:`rwkvtune.io.checkpoint.read_shapes`, which reads no tensor data.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from rwkvtune.errors import CheckpointError
from rwkvtune.io.checkpoint import read_shapes
from rwkvtune.io.layout import SHAPE_FIELDS, official_shapes
from rwkvtune.io.variants import refusal

# Keys that only older RWKV generations have: used to say "this is RWKV-6", not "key missing".
@dataclasses.dataclass
class CheckpointInfo:
    """What detection found in a checkpoint."""

    path: str
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size_a: int
    n_head: int
    dim_att_lora: int
    dim_aaa_lora: int
    dim_mv_lora: int
    dim_gate_lora: int
    dim_ffn: int
    n_params: int
    dtype: str
    has_layer0_v: bool
    key_prefix: str = ""
    extra_keys: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The ``rwkvtune inspect --json`` object."""
        keys = ("n_layer", "n_embd", "vocab_size", "head_size_a", "n_head", "dim_att_lora", "dim_aaa_lora",
                "dim_mv_lora", "dim_gate_lora", "dim_ffn", "n_params", "dtype", "has_layer0_v")
        return {k: getattr(self, k) for k in keys}

    def dims(self) -> dict[str, int]:
        """The shape-deciding dims (SHAPE_FIELDS) as a dict."""
        return {f: getattr(self, f) for f in SHAPE_FIELDS}



def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, source: str) -> tuple[int, ...]:
    shape = tuple(shapes[key])
    if len(shape) != ndim or any(d <= 0 for d in shape):
        raise CheckpointError(f"{source}: inconsistent RWKV-7 state dict: {key} has shape {list(shape)}, "
                              f"expected {ndim} positive dims; the file is damaged or not an RWKV-7 model")
    return shape


def detect(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str] | None = None,
           source: str = "<state dict>", key_prefix: str = "") -> CheckpointInfo:
    """Detect dims from {key: shape}. Raises CheckpointError naming what is missing or inconsistent."""
    other = refusal(source, shapes)  # RWKV-4/5/6 or RWKV-7a/7b: named, not a shape mismatch further down
    if other:
        raise CheckpointError(other)
    required = ["emb.weight", "head.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1",
                "blocks.0.att.g1", "blocks.0.ffn.key.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise CheckpointError(f"{source}: not an RWKV-7 state dict: missing {', '.join(missing)} "
                              f"(found {len(shapes)} keys, e.g. {', '.join(list(shapes)[:3]) or 'none'})")
    V, C = _shape(shapes, "emb.weight", 2, source)
    H, N = _shape(shapes, "blocks.0.att.r_k", 2, source)
    if H * N != C:
        raise CheckpointError(f"{source}: inconsistent RWKV-7 state dict: blocks.0.att.r_k is [{H}, {N}] but "
                              f"emb.weight has n_embd={C}; expected n_head * head_size == n_embd")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    L = max(layers) + 1
    if layers != set(range(L)):
        gaps = sorted(set(range(L)) - layers)
        raise CheckpointError(f"{source}: blocks {gaps} missing (largest block index {L - 1}); the file is incomplete")
    has_v0 = "blocks.0.att.v1" in shapes
    mv_key = "blocks.1.att.v1" if L > 1 else "blocks.0.att.v1"
    if mv_key not in shapes and L > 1:
        raise CheckpointError(f"{source}: not a complete RWKV-7 state dict: missing {mv_key} (value-residual "
                              f"low-rank projection, present in every layer >= 1)")
    dims = {name: _shape(shapes, key, 2, source)[1] for name, key in (
        ("dim_att_lora", "blocks.0.att.w1"), ("dim_aaa_lora", "blocks.0.att.a1"),
        ("dim_mv_lora", mv_key), ("dim_gate_lora", "blocks.0.att.g1")) if key in shapes}
    if "dim_mv_lora" not in dims:
        # One layer and no layer-0 v1: no tensor has this dim. Use the reference trainer's formula
        # (1.3 sqrt(C), rounded to a multiple of 32, minimum 32); any value fits this file.
        dims["dim_mv_lora"] = max(32, round(1.3 * math.sqrt(C) / 32) * 32)
    info = CheckpointInfo(
        path=source,
        n_layer=L,
        n_embd=C,
        vocab_size=V,
        head_size_a=N,
        n_head=H,
        dim_ffn=_shape(shapes, "blocks.0.ffn.key.weight", 2, source)[0],
        n_params=sum(math.prod(s) for s in shapes.values()),
        dtype=_main_dtype(dtypes or {}),
        has_layer0_v=has_v0,
        key_prefix=key_prefix,
        **dims,
    )
    # Every other key must have exactly the shape these dims imply.
    problems = compare_shapes(official_shapes(**info.dims(), layer0_v=has_v0), shapes)
    extra = [p for p in problems if p[1] is None]
    real = [p for p in problems if p[1] is not None]
    if real:
        raise CheckpointError(f"{source}: inconsistent RWKV-7 state dict: " + format_mismatches(real))
    info.extra_keys = tuple(k for k, *_ in extra)
    return info


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Detect every dimension of the checkpoint at ``path`` without reading tensor data."""
    shapes, dtypes, prefix = read_shapes(path)
    return detect(shapes, dtypes, source=str(Path(path).resolve()), key_prefix=prefix)


def _main_dtype(dtypes: Mapping[str, str]) -> str:
    if not dtypes:
        return "unknown"
    counts = Counter(dtypes.values())
    return counts.most_common(1)[0][0] if len(counts) == 1 else "mixed(" + ",".join(sorted(counts)) + ")"


def compare_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                   optional: tuple[str, ...] = ()) -> list[tuple[str, tuple | None, tuple | None]]:
    """(key, expected shape or None if unexpected, found shape or None if missing) for every difference.

    ``optional`` keys may be absent without counting (layer-0 v0/v1/v2).
    """
    out: list[tuple[str, tuple | None, tuple | None]] = []
    for k, shape in expected.items():
        got = found.get(k)
        if got is None:
            if k not in optional:
                out.append((k, tuple(shape), None))
        elif tuple(got) != tuple(shape):
            out.append((k, tuple(shape), tuple(got)))
    out += [(k, None, tuple(s)) for k, s in found.items() if k not in expected]
    return out


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, run = [], [layers[0]]
    for i in layers[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            out.append(run)
            run = [i]
    out.append(run)
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in out)


def format_mismatches(problems: list[tuple[str, tuple | None, tuple | None]], limit: int = 24) -> str:
    """One line for a list of (key, expected, found): equal problems across layers are merged
    (``blocks.0-23.att.w1: expected [2048, 96], found [2048, 64]``), whole missing or unexpected
    layers become one entry, and at most ``limit`` entries are shown (the rest counted)."""
    per_layer: dict[int, list] = {}
    for key, exp, got in problems:
        m = re.match(r"blocks\.(\d+)\.", key)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append((exp, got))
    # Layers whose every problem is "missing" (or every one "unexpected") are reported whole.
    whole: dict[str, list[int]] = {"missing": [], "unexpected": []}
    for layer, items in per_layer.items():
        if len(items) >= 8 and all(g is None for _, g in items):
            whole["missing"].append(layer)
        elif len(items) >= 8 and all(e is None for e, _ in items):
            whole["unexpected"].append(layer)
    skip = set(whole["missing"]) | set(whole["unexpected"])

    groups: dict[tuple, list[int | None]] = {}
    for key, exp, got in problems:
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m and int(m.group(1)) in skip:
            continue
        pattern, layer = (("blocks.{}." + m.group(2)), int(m.group(1))) if m else (key, None)
        groups.setdefault((pattern, exp, got), []).append(layer)
    parts = []
    for kind, layers in whole.items():
        if layers:
            parts.append(f"blocks.{_layer_ranges(sorted(layers))}: {kind} (whole layer"
                         f"{'s' if len(layers) > 1 else ''})")
    for (pattern, exp, got), layers in groups.items():
        key = pattern.format(_layer_ranges(sorted(layers))) if layers[0] is not None else pattern
        if got is None:
            parts.append(f"{key}: missing (expected {list(exp)})")
        elif exp is None:
            parts.append(f"{key}: unexpected key (shape {list(got)})")
        else:
            parts.append(f"{key}: expected {list(exp)}, found {list(got)}")
    more = f"; ... and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more
