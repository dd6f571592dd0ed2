"""Checkpoint detection: every dimension of an RWKV-7 ``.pth`` read from its tensor shapes.

Released checkpoints store no metadata, so the shapes are the truth (reference §2):
V, C from ``emb.weight``; (H, N) from ``r_k``; L from the largest block index; the low-rank
dims from w1/a1/v1/g1 (v1 of a layer >= 1, since layer 0 may lack v0/v1/v2).

The file is opened with ``torch.load(mmap=True)``: tensors stay on disk and only the pickle
(shapes, dtypes, key names) is parsed, so inspecting a 13.3B bf16 file takes about a second and
little memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from rwkvtune.configs.model_loader import ModelConfig, list_available_models
from rwkvtune.errors import CheckpointError

# Prefixes that training wrappers put on every key (Lightning, DDP).
KEY_PREFIXES = ("_forward_module.", "module.")

# Keys that only older RWKV generations have: used to say "this is RWKV-6", not "key missing".
_OTHER_VERSIONS = [
    ("att.time_maa_x", "RWKV-6 (x060)"),
    ("att.time_faaaa", "RWKV-5/6"),
    ("att.time_first", "RWKV-4/5"),
    ("att.time_mix_k", "RWKV-4"),
]


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

    def to_config(self, name: str | None = None) -> ModelConfig:
        """A ModelConfig for this file; recommended settings from the matching registry entry if any."""
        match = matching_registry_entry(self)
        base = ModelConfig.from_name(match) if match else None
        ctx = re.search(r"ctx(\d+)", Path(self.path).name)
        return ModelConfig(
            model_name=name or (base.model_name if base else Path(self.path).stem),
            model_file=self.path,
            description=f"detected from {Path(self.path).name}" + (f" (matches registry {match})" if match else ""),
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            vocab_size=self.vocab_size,
            head_size_a=self.head_size_a,
            ctx_len=int(ctx.group(1)) if ctx else (base.ctx_len if base else 4096),
            dim_att_lora=self.dim_att_lora,
            dim_aaa_lora=self.dim_aaa_lora,
            dim_gate_lora=self.dim_gate_lora,
            dim_mv_lora=self.dim_mv_lora,
            dim_ffn=self.dim_ffn,
            recommended_ctx_len=base.recommended_ctx_len if base else 1024,
            recommended_batch_size=base.recommended_batch_size if base else 1,
            recommended_lr=base.recommended_lr if base else 1e-5,
            config_path=self.path,
        )


def strip_prefix(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove a wrapper prefix (``_forward_module.``) present on every key; returns (dict, prefix)."""
    for prefix in KEY_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}, prefix
    return dict(state_dict), ""


def load_state_dict(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, Any], str]:
    """Open a ``.pth`` as a state dict (memory-mapped by default), prefix stripped.

    Raises CheckpointError for a missing path, a truncated/corrupt file, or a non-dict payload.
    """
    import torch

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found; check the path (relative model files resolve "
                              f"against $RWKVTUNE_MODEL_DIR)")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, expected a .pth file")
    try:
        obj = torch.load(p, map_location="cpu", mmap=mmap, weights_only=True)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (pre-zip) torch.save format cannot be mapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{p}: cannot read as a torch checkpoint ({str(e).splitlines()[0]}); "
                                  f"the file may be truncated or corrupt: download or save it again") from None
    except Exception as e:  # pickle errors, EOF, weights_only refusals
        raise CheckpointError(f"{p}: cannot read as a torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file may be truncated or not a "
                              f"state dict") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: found a {type(obj).__name__}, expected a state dict (key -> tensor) "
                              f"saved with torch.save(model.state_dict())")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{p}: key {bad!r} is not a tensor; expected a plain state dict "
                              f"(is this a training-state file? use its 'model' entry)")
    return strip_prefix(obj)


def detect(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str] | None = None,
           source: str = "<state dict>", key_prefix: str = "") -> CheckpointInfo:
    """Detect dims from {key: shape}. Raises CheckpointError naming what is missing or inconsistent."""
    for marker, version in _OTHER_VERSIONS:
        if any(k.endswith(marker) for k in shapes):
            raise CheckpointError(f"{source}: this is an {version} checkpoint (has '*.{marker}'), expected "
                                  f"RWKV-7 (x070); rwkvtune only trains RWKV-7")
    required = ["emb.weight", "head.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1",
                "blocks.0.att.g1", "blocks.0.ffn.key.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise CheckpointError(f"{source}: not an RWKV-7 state dict: missing {', '.join(missing)} "
                              f"(found {len(shapes)} keys, e.g. {', '.join(list(shapes)[:3]) or 'none'})")
    V, C = shapes["emb.weight"]
    H, N = shapes["blocks.0.att.r_k"]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    L = max(layers) + 1
    if layers != set(range(L)):
        gaps = sorted(set(range(L)) - layers)
        raise CheckpointError(f"{source}: blocks {gaps} missing (largest block index {L - 1}); the file is incomplete")
    has_v0 = "blocks.0.att.v1" in shapes
    v_layer = 1 if L > 1 else 0
    mv_key = f"blocks.{v_layer}.att.v1"
    if mv_key not in shapes:
        raise CheckpointError(f"{source}: missing {mv_key} (value-residual low-rank), expected in RWKV-7 layers >= 1")
    info = CheckpointInfo(
        path=source,
        n_layer=L,
        n_embd=C,
        vocab_size=V,
        head_size_a=N,
        n_head=H,
        dim_att_lora=shapes["blocks.0.att.w1"][1],
        dim_aaa_lora=shapes["blocks.0.att.a1"][1],
        dim_mv_lora=shapes[mv_key][1],
        dim_gate_lora=shapes["blocks.0.att.g1"][1],
        dim_ffn=shapes["blocks.0.ffn.key.weight"][0],
        n_params=sum(math.prod(s) for s in shapes.values()),
        dtype=_main_dtype(dtypes or {}),
        has_layer0_v=has_v0,
        key_prefix=key_prefix,
    )
    if H * N != C:
        raise CheckpointError(f"{source}: r_k is [{H}, {N}] but emb.weight has n_embd={C}; expected H*N == n_embd")
    # Every other key must have exactly the shape these dims imply.
    cfg = _bare_config(info)
    problems = compare_shapes(cfg.param_shapes(layer0_v=has_v0), shapes)
    extra = [p for p in problems if p[1] is None]
    real = [p for p in problems if p[1] is not None]
    if real:
        raise CheckpointError(f"{source}: inconsistent RWKV-7 state dict: " + format_mismatches(real))
    info.extra_keys = tuple(k for k, *_ in extra)
    return info


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Detect every dimension of the checkpoint at ``path`` without reading tensor data."""
    sd, prefix = load_state_dict(path, mmap=True)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()}
    return detect(shapes, dtypes, source=str(Path(path).resolve()), key_prefix=prefix)


def _main_dtype(dtypes: Mapping[str, str]) -> str:
    if not dtypes:
        return "unknown"
    counts = Counter(dtypes.values())
    return counts.most_common(1)[0][0] if len(counts) == 1 else "mixed(" + ",".join(sorted(counts)) + ")"


def _bare_config(info: CheckpointInfo) -> ModelConfig:
    return ModelConfig(model_name="detected", n_layer=info.n_layer, n_embd=info.n_embd,
                       vocab_size=info.vocab_size, head_size_a=info.head_size_a,
                       dim_att_lora=info.dim_att_lora, dim_aaa_lora=info.dim_aaa_lora,
                       dim_mv_lora=info.dim_mv_lora, dim_gate_lora=info.dim_gate_lora, dim_ffn=info.dim_ffn)


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


def format_mismatches(problems: list[tuple[str, tuple | None, tuple | None]], limit: int = 12) -> str:
    parts = []
    for key, exp, got in problems[:limit]:
        if got is None:
            parts.append(f"{key}: missing (expected {list(exp)})")
        elif exp is None:
            parts.append(f"{key}: unexpected key (shape {list(got)})")
        else:
            parts.append(f"{key}: expected {list(exp)}, found {list(got)}")
    more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(parts) + more


LAYER0_V = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def check_config_against(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> list:
    """Every (key, expected, found) difference between a config and a checkpoint's shapes."""
    return compare_shapes(config.param_shapes(layer0_v=True), shapes, optional=LAYER0_V)


def matching_registry_entry(info: CheckpointInfo) -> str | None:
    """Name of the registry entry whose dims equal the checkpoint's, or None."""
    dims = ("n_layer", "n_embd", "vocab_size", "head_size_a", "dim_att_lora", "dim_aaa_lora", "dim_mv_lora",
            "dim_gate_lora", "dim_ffn")
    for name in list_available_models():
        try:
            cfg = ModelConfig.from_name(name)
        except Exception:  # a broken user config must not break detection; `models check` reports it
            continue
        if all(getattr(cfg, d) == getattr(info, d) for d in dims):
            return name
    return None


def mismatch_error(config: ModelConfig, path: str, shapes: Mapping[str, tuple[int, ...]],
                   info: CheckpointInfo | None = None) -> CheckpointError:
    """The error for 'this file does not fit this config': every key, and the entry that does fit."""
    problems = check_config_against(config, shapes)
    if info is None:
        try:
            info = detect(shapes, source=path)
        except CheckpointError:
            info = None
    match = matching_registry_entry(info) if info else None
    hint = (f" The file matches registry entry {match!r}: use --model {match} or load it by path."
            if match else " Load the file by path (dims are detected from it) or create a config with "
                          "`rwkvtune models new`.")
    return CheckpointError(f"{path} does not fit config {config.model_name!r} ({len(problems)} mismatch(es)): "
                           f"{format_mismatches(problems)}.{hint}")
