"""Configs against checkpoints: does this file fit this config, and if not, what differs.

One check serves ``rwkvtune models check``, ``examples/test_model_configs.py`` and every loader
that is told which dims to expect (a registry name, ``RWKV7.from_checkpoint(expect=...)``).
Only shapes are compared: no tensor data is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import rwkvtune.configs.releases as releases
from rwkvtune.configs.detect import CheckpointInfo, compare_shapes, detect, format_mismatches
from rwkvtune.io.checkpoint import read_shapes
from rwkvtune.io.layout import LAYER0_V_KEYS, SHAPE_FIELDS
from rwkvtune.configs.model_loader import (
    ModelConfig,
    all_config_files,
    config_dirs,
    entry_releases,
    matching_registry_entry,
    with_release,
    CONFIG_PATH_ENV,
    PACKAGE_MODELS_DIR,
)
from rwkvtune.io.variants import refusal
from rwkvtune.utils import human_count
from rwkvtune.errors import CheckpointError, RwkvtuneError


def check_config_against(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> list:
    """Every (key, expected, found) difference between a config and a checkpoint's shapes."""
    return compare_shapes(config.param_shapes(layer0_v=True), shapes, optional=LAYER0_V_KEYS)


def compare_config(config: ModelConfig, info: CheckpointInfo) -> list[tuple[str, int, int]]:
    """Every (field, config value, detected value) that differs between a config and a checkpoint."""
    return [(f, getattr(config, f), getattr(info, f)) for f in SHAPE_FIELDS if getattr(config, f) != getattr(info, f)]


def mismatch_error(config: ModelConfig, path: str, shapes: Mapping[str, tuple[int, ...]],
                   info: CheckpointInfo | None = None) -> CheckpointError:
    """The error for 'this file does not fit this config': every differing dim and tensor key
    (expected = config, found = file), and the registry entry that does fit, if any."""
    problems = check_config_against(config, shapes)
    if info is None:
        try:
            info = detect(shapes, source=path)
        except CheckpointError:
            info = None
    source = f" (from {config.config_path})" if config.config_path else ""
    fields = ""
    if info is not None:
        diffs = compare_config(config, info)
        if diffs:
            fields = "dims: " + "; ".join(f"{f}: expected {e}, found {g}" for f, e, g in diffs) + ". "
    match = matching_registry_entry(info) if info else None
    if match:
        hint = (f" The file matches registry entry {match!r}: use that config "
                f"(load_model_config({match!r}), `rwkvtune models show {match}`) or load the file by path.")
    else:
        hint = (" No registry entry matches the file: load it by path (dims are detected from it) or create a "
                "config with `rwkvtune models new CHECKPOINT --name NAME`.")
    # When the dims already explain the difference, a few tensor keys illustrate it; else list them all.
    shown = format_mismatches(problems, limit=6 if fields else 24)
    return CheckpointError(f"{path} does not fit config {config.model_name!r}{source}: {fields}"
                           f"{len(problems)} tensor mismatch(es): {shown}.{hint}")


@dataclasses.dataclass
class CheckResult:
    """The verdict on one config file."""

    key: str
    path: str
    ok: bool
    detail: str
    config: ModelConfig | None = None
    compared: bool = False  # a model file was present and compared
    shadowed_by: str | None = None  # an equal name in an earlier directory hides this one



def check_one(key: str, path: str) -> CheckResult:
    """Validate one config file and, when its model file is present, compare the file's shapes."""
    try:
        cfg = ModelConfig.from_file(path)
    except RwkvtuneError as e:
        return CheckResult(key, path, False, str(e))
    dims = f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, {human_count(cfg.n_params)} params"
    named = releases.parse_name(cfg.model_file) if cfg.model_file else None
    if named and named.ctx_len != cfg.ctx_len:
        return CheckResult(key, path, False, f"{path}: architecture.ctx_len is {cfg.ctx_len}, but its model file "
                                             f"{cfg.model_file} says ctx{named.ctx_len}; set ctx_len to "
                                             f"{named.ctx_len}", cfg)
    if not cfg.model_file:
        return CheckResult(key, path, True, f"{dims}; no model_file", cfg)
    if not Path(cfg.model_path).is_file():
        return CheckResult(key, path, True, f"{dims}; model file not present ({cfg.model_path}), shape check "
                                            f"skipped", cfg)
    try:
        shapes, _, _ = read_shapes(cfg.model_path)
    except CheckpointError as e:
        return CheckResult(key, path, False, f"{path}: model file unreadable: {e}", cfg, True)
    other = refusal(cfg.model_path, shapes)
    if other:
        return CheckResult(key, path, False, other, cfg, True)
    if check_config_against(cfg, shapes):
        return CheckResult(key, path, False, str(mismatch_error(cfg, cfg.model_path, shapes)), cfg, True)
    return CheckResult(key, path, True, f"{dims}; matches model file {cfg.model_path}", cfg, True)


def check_releases(key: str, path: str, cfg: ModelConfig) -> list[CheckResult]:
    """One result per release of the entry's size other than the pinned one that is present in the
    models directory or recorded there (``KEY@RELEASE-DATE``): its file compared with the entry's dims,
    a file of another variant (RWKV-7a/7b) named; a broken records file is one failed result."""
    try:
        size, default, known = entry_releases(cfg, key)
    except RwkvtuneError as e:
        return [CheckResult(f"{key}@*", path, False, str(e), cfg)]
    out = []
    for rel in known:
        if default is not None and rel.file == default.file:
            continue  # the entry's own file: check_one compared it
        name, rcfg = f"{key}@{rel.label}", with_release(cfg, rel)
        if not Path(rcfg.model_path).is_file():
            out.append(CheckResult(name, path, True, f"{rel.origin}: {rel.file} not present ({rcfg.model_path}), "
                                                     f"shape check skipped", rcfg))
            continue
        try:
            shapes, _, _ = read_shapes(rcfg.model_path)
            other = refusal(rcfg.model_path, shapes)
        except CheckpointError as e:
            out.append(CheckResult(name, path, False, f"model file unreadable: {e}", rcfg, True))
            continue
        if other:
            out.append(CheckResult(name, path, False, other, rcfg, True))
        elif check_config_against(rcfg, shapes):
            out.append(CheckResult(name, path, False, str(mismatch_error(rcfg, rcfg.model_path, shapes)), rcfg, True))
        else:
            out.append(CheckResult(name, path, True, f"release {rel.label} (ctx {rel.ctx_len}, {rel.origin}) matches "
                                                     f"model file {rcfg.model_path}", rcfg, True))
    return out


def check_all() -> tuple[list[CheckResult], list[str]]:
    """Check every config in reach (the package's and $RWKVTUNE_CONFIG_PATH's, shadowed ones too);
    returns (results, warnings about config directories)."""
    warnings = [f"${CONFIG_PATH_ENV} entry {d} is not a directory (ignored)"
                for d in config_dirs() if d != PACKAGE_MODELS_DIR and not d.is_dir()]
    results = []
    for key, path, shadowed_by in all_config_files():
        result = check_one(key, path)
        result.shadowed_by = shadowed_by
        results.append(result)
        if result.config is not None and shadowed_by is None:
            results += check_releases(key, path, result.config)
    return results, warnings
