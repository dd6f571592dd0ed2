"""Model config registry: one dataclass, many ways in.

A :class:`ModelConfig` describes an RWKV-7 ("x070") architecture: the dimensions that decide
every tensor shape in a checkpoint, plus the release file it belongs to and recommended
fine-tuning hyper-parameters. It can come from

* a registry name: ``load_model_config("1.5b")`` (also ``"1.5B"``, ``"rwkv7-1.5b"``),
* a JSON file in the registry format (``rwkvtune/configs/models/*.json``),
* a ``.pth`` checkpoint, whose dimensions are read from tensor shapes (no data is loaded).

Registry directories: the JSON files shipped in this package, plus every directory named in
``RWKVTUNE_CONFIG_PATH`` (``os.pathsep``-separated), so users add models without editing
site-packages. A user directory wins over the package on equal names.

Model files: a relative ``model_file`` resolves against the models directory,
``RWKVTUNE_MODEL_DIR`` if set, else ``~/.rwkvtune/models`` (see :func:`models_dir`). An optional
``source`` section names where the file is published (a Hugging Face repository and file);
``rwkvtune models download NAME`` (:mod:`rwkvtune.hub`) fetches it from there.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import rwkvtune.configs.releases as releases
from rwkvtune.configs.detect import CheckpointInfo, inspect_checkpoint
from rwkvtune import log
from rwkvtune.configs.run_source import resolve_run
from rwkvtune.errors import ConfigError
from rwkvtune.io.layout import DEFAULT_MODEL_DIR, MODEL_DIR_ENV, SHAPE_FIELDS, official_shapes
from rwkvtune.utils import atomic_write_text, not_found, read_error

PACKAGE_MODELS_DIR = Path(__file__).resolve().parent / "models"
CONFIG_PATH_ENV = "RWKVTUNE_CONFIG_PATH"
ARCHITECTURE_VERSION = "x070"
HF_ENDPOINT_ENV = "HF_ENDPOINT"  # huggingface_hub's own variable: a mirror serves the same URLs
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_HF_REVISION = "main"

# JSON layout: section -> {field: type}; a name ending in "?" is optional. Types are checked
# strictly (a bool is not an int, an int is accepted where a float is expected).
# lora_dims.dim_aaa_lora: the a1/a2 rank; defaults to dim_att_lora (true of all releases).
# source: where the model file is published (field names are those of ModelConfig): hf_repo is the
# "owner/name" of a Hugging Face model repository, hf_filename the file's path in it, hf_revision a
# branch, tag or commit (default "main"), sha256 the file's checksum when known (checked besides
# the hub's own).
_LAYOUT: dict[str, dict[str, type]] = {
    "": {"model_name": str, "model_file?": str, "source?": dict, "description?": str, "architecture_version?": str,
         "architecture": dict, "lora_dims": dict, "training?": dict},
    "architecture": {"n_layer": int, "n_embd": int, "vocab_size": int, "head_size_a": int, "ctx_len": int,
                     "dim_ffn?": int},
    "lora_dims": {"dim_att_lora": int, "dim_aaa_lora?": int, "dim_gate_lora": int, "dim_mv_lora": int},
    "training": {"recommended_ctx_len?": int, "recommended_batch_size?": int, "recommended_lr?": float},
    "source": {"hf_repo": str, "hf_filename": str, "hf_revision?": str, "sha256?": str},
}
# section -> {field: (type, required)}
_SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    section: {name.rstrip("?"): (typ, not name.endswith("?")) for name, typ in fields.items()}
    for section, fields in _LAYOUT.items()}

# Sane ranges: catch typos (an extra zero, a width in the wrong field) before a 40 GB allocation.
_RANGES: dict[str, tuple[float, float]] = {
    "n_layer": (1, 512),
    "n_embd": (4, 65536),
    "vocab_size": (2, 1 << 22),
    "head_size_a": (1, 1024),
    "ctx_len": (1, 1 << 24),
    "dim_ffn": (1, 1 << 20),
    "dim_att_lora": (1, 8192),
    "dim_aaa_lora": (1, 8192),
    "dim_gate_lora": (1, 8192),
    "dim_mv_lora": (1, 8192),
    "recommended_ctx_len": (1, 1 << 24),
    "recommended_batch_size": (1, 1 << 16),
    "recommended_lr": (1e-12, 1.0),
}


def models_dir() -> Path:
    """Directory where release ``.pth`` files live (``$RWKVTUNE_MODEL_DIR`` or ``~/.rwkvtune/models``)."""
    return Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR).expanduser().absolute()


@dataclasses.dataclass
class ModelConfig:
    """An RWKV-7 architecture plus its release file and recommended fine-tuning settings.

    Field names follow the checkpoint vocabulary. ``dim_*_lora`` are the model's own low-rank
    projections (w1/w2 decay, a1/a2 in-context rate, v1/v2 value residual, g1/g2 gate): they
    are architecture, unrelated to PEFT LoRA adapters.
    """

    model_name: str
    n_layer: int
    n_embd: int
    dim_att_lora: int  # D_DECAY: w1 [C, D], w2 [D, C]
    dim_gate_lora: int  # D_GATE: g1/g2
    dim_mv_lora: int  # D_MV: v1/v2 (layers >= 1)
    dim_aaa_lora: int | None = None  # D_AAA: a1/a2; None -> dim_att_lora
    vocab_size: int = 65536
    head_size_a: int = 64
    ctx_len: int = 4096
    dim_ffn: int | None = None  # None -> 4 * n_embd
    model_file: str = ""
    # Where model_file is published (the JSON "source" section); all "" when unknown.
    hf_repo: str = ""  # Hugging Face repository "owner/name"
    hf_filename: str = ""  # the file's path in that repository
    hf_revision: str = ""  # branch, tag or commit; "main" when a source is given without one
    sha256: str = ""  # the file's known checksum, if any
    description: str = ""
    architecture_version: str = ARCHITECTURE_VERSION
    recommended_ctx_len: int = 1024
    recommended_batch_size: int = 1
    recommended_lr: float = 1e-5
    config_path: str | None = None  # where this config was read from (JSON or .pth)

    def __post_init__(self) -> None:
        if self.dim_aaa_lora is None:
            self.dim_aaa_lora = self.dim_att_lora
        if self.dim_ffn is None:
            self.dim_ffn = 4 * self.n_embd
        problems = _check_values(dataclasses.asdict(self))
        # The JSON schema requires both in "source"; built directly, a half source is caught here.
        if (bool(self.hf_repo) != bool(self.hf_filename)
                or (not self.hf_repo and (self.hf_revision or self.sha256))):
            problems.append("source: found only some of hf_repo/hf_filename/hf_revision/sha256, expected "
                            "hf_repo and hf_filename together (the others only with them) or none")
        if self.hf_repo and not self.hf_revision:
            self.hf_revision = DEFAULT_HF_REVISION
        if self.hf_filename and not self.model_file:  # the download keeps the published name
            self.model_file = PurePosixPath(self.hf_filename).name
        if problems:
            where = self.config_path or f"config {self.model_name!r}"
            raise ConfigError(f"{where}: " + "; ".join(problems))

    # ---- derived -------------------------------------------------------------------------
    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size_a

    @property
    def model_path(self) -> str:
        """Absolute path of the model file: absolute ``model_file`` as is, else under models_dir()."""
        if not self.model_file:
            return ""
        p = Path(self.model_file).expanduser()
        if not p.is_absolute():
            p = models_dir() / p
        return str(p)

    @property
    def release(self) -> str:
        """``release-date`` of the model file when its name follows the official scheme
        (``rwkv7-g1a-1.5b-20250922-ctx4096.pth`` -> ``"g1a-20250922"``), else ""."""
        rel = releases.parse_name(self.model_file) if self.model_file else None
        return rel.label if rel else ""

    @property
    def download_url(self) -> str:
        """URL of the published model file (under ``$HF_ENDPOINT`` when set); "" without a source."""
        if not self.hf_repo:
            return ""
        endpoint = (os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")
        # The hub's resolve URL; quoted as huggingface_hub quotes it, so both name the same file.
        return f"{endpoint}/{self.hf_repo}/resolve/{quote(self.hf_revision, safe='')}/{quote(self.hf_filename)}"

    @property
    def n_params(self) -> int:
        """Parameter count of the official layout, counting layer-0 v0/v1/v2 (as released files do)."""
        return sum(math.prod(s) for s in self.param_shapes(layer0_v=True).values())

    def param_shapes(self, layer0_v: bool = True) -> dict[str, tuple[int, ...]]:
        """Every key of an official checkpoint with its shape (order: training-code order)."""
        return official_shapes(**self.dims(), layer0_v=layer0_v)

    def dims(self) -> dict[str, int]:
        """The shape-deciding dims (what a checkpoint can confirm or contradict)."""
        return {f: getattr(self, f) for f in SHAPE_FIELDS}

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A registry entry: ``"1.5b"``, ``"1.5B"`` or ``"rwkv7-1.5b"``, resolved to the newest release of
        that size present in the models directory, else the entry's pinned file; ``"1.5b@g1a"`` names a
        release (see :mod:`rwkvtune.configs.releases`)."""
        base, spec = releases.split_spec(name)
        available = list_available_models()
        key = _registry_key(base)
        if key not in available:
            close = difflib.get_close_matches(key, list(available), n=1, cutoff=0.3)
            hint = f" Closest: {close[0]!r}." if close else ""
            raise ConfigError(
                f"unknown model {name!r}.{hint} Available: {', '.join(available) or 'none'}. "
                f"Pass a registry name, a .json config or a .pth checkpoint path "
                f"(add your own configs to a directory listed in {CONFIG_PATH_ENV})."
            )
        return resolve_release(cls.from_file(available[key]), key, spec)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """A JSON config in the registry format; every problem in the file is reported at once."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(not_found(path, "config file", "check the path or run `rwkvtune models` to list "
                                                             "configs"))
        fix = "fix the file or regenerate it with `rwkvtune models new`"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            json.dumps(raw, ensure_ascii=False).encode("utf-8")  # JSON's "\\ud800" escapes allow lone surrogates
        except OSError as e:
            raise read_error(path, e, ConfigError, "the config") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); {fix}") from e
        except RecursionError as e:
            raise ConfigError(f"{path}: not a config: nested deeper than the JSON reader's recursion limit; "
                              f"{fix}") from e
        except UnicodeEncodeError as e:
            raise ConfigError(f"{path}: holds {e.object[e.start:e.end]!r}, a lone surrogate (half of a UTF-16 pair), "
                              f"which is not valid Unicode; {fix}") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> "ModelConfig":
        problems = validate_config_dict(raw)
        if problems:
            raise ConfigError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))
        arch, dims, train = raw["architecture"], raw["lora_dims"], raw.get("training", {})
        return cls(
            model_name=raw["model_name"],
            model_file=raw.get("model_file", ""),
            description=raw.get("description", ""),
            architecture_version=raw.get("architecture_version", ARCHITECTURE_VERSION),
            config_path=source,
            **arch,
            **dims,
            **train,
            **raw.get("source", {}),
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | CheckpointInfo, name: str | None = None) -> "ModelConfig":
        """Dimensions detected from a checkpoint (shapes only, no tensor data is read).

        Recommended settings come from the registry entry with the same dims, when one exists; the
        context length from a ``ctx4096``-style part of the file name, else that entry's.
        """
        info = path if isinstance(path, CheckpointInfo) else inspect_checkpoint(path)
        match = matching_registry_entry(info)
        base = cls.from_name(match) if match else None
        ctx = releases.ctx_from_name(info.path) or (base.ctx_len if base else 4096)
        recommended = {f: getattr(base, f) for f in ("recommended_ctx_len", "recommended_batch_size",
                                                      "recommended_lr")} if base else {}
        if recommended:  # never recommend training beyond what the model was trained on
            recommended["recommended_ctx_len"] = min(recommended["recommended_ctx_len"], ctx)
        return cls(
            model_name=name or (base.model_name if base else Path(info.path).stem),
            model_file=info.path,
            description=f"detected from {Path(info.path).name}" + (f" (matches registry {match})" if match else ""),
            ctx_len=ctx,
            config_path=info.path,
            **info.dims(),
            **recommended,
        )

    # ---- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The registry JSON layout (the seed's format plus architecture_version, dim_aaa_lora and,
        when known, source)."""
        arch = {
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "vocab_size": self.vocab_size,
            "head_size_a": self.head_size_a,
            "ctx_len": self.ctx_len,
        }
        if self.dim_ffn != 4 * self.n_embd:
            arch["dim_ffn"] = self.dim_ffn
        out: dict[str, Any] = {"model_name": self.model_name, "model_file": self.model_file}
        if self.hf_repo:
            out["source"] = {"hf_repo": self.hf_repo, "hf_filename": self.hf_filename, "hf_revision": self.hf_revision}
            if self.sha256:
                out["source"]["sha256"] = self.sha256
        return out | {
            "description": self.description,
            "architecture_version": self.architecture_version,
            "architecture": arch,
            "lora_dims": {
                "dim_att_lora": self.dim_att_lora,
                "dim_aaa_lora": self.dim_aaa_lora,
                "dim_gate_lora": self.dim_gate_lora,
                "dim_mv_lora": self.dim_mv_lora,
            },
            "training": {
                "recommended_ctx_len": self.recommended_ctx_len,
                "recommended_batch_size": self.recommended_batch_size,
                "recommended_lr": self.recommended_lr,
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON config atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _registry_key(name: str) -> str:
    """Registry key of a name or config file name: lower case, without ``.json`` and ``rwkv7-``."""
    key = name.strip().lower()
    if key.endswith(".json"):
        key = key[:-5]
    return key[len("rwkv7-"):] if key.startswith("rwkv7-") else key


def _is_type(value: Any, typ: type) -> bool:
    if isinstance(value, bool):
        return typ is bool
    if typ is float:
        return isinstance(value, (int, float))
    return isinstance(value, typ)


def validate_config_dict(raw: Any) -> list[str]:
    """All problems of a registry-format dict, each as 'field: found X, expected Y'.

    Type, missing-field, unknown-field and value problems are all collected (a wrongly typed
    field is only left out of the value checks), so one run shows everything to fix.
    """
    if not isinstance(raw, dict):
        return [f"top level: found {type(raw).__name__}, expected a JSON object"]
    problems: list[str] = []
    flat: dict[str, Any] = {}  # well-typed values, for the value checks
    names: dict[str, str] = {}  # field -> qualified name used in messages
    for section, fields in _SCHEMA.items():
        data = raw if section == "" else raw.get(section)
        if section and not isinstance(data, dict):
            continue  # missing/wrong-typed section is reported by the top-level pass
        prefix = f"{section}." if section else ""
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{prefix}{key}: unknown field{hint}; allowed: {', '.join(fields)}")
        for key, (typ, required) in fields.items():
            if key not in data:
                if required:
                    problems.append(f"{prefix}{key}: missing, expected {typ.__name__}")
                continue
            if not _is_type(data[key], typ):
                problems.append(f"{prefix}{key}: found {data[key]!r} ({type(data[key]).__name__}), "
                                f"expected {typ.__name__}")
            elif typ is not dict:
                flat[key] = data[key]
                names[key] = prefix + key
    return problems + _check_values(flat, names)


def _fmt_bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_values(flat: dict[str, Any], names: dict[str, str] | None = None) -> list[str]:
    """Range and consistency problems of well-typed values; ``names`` gives qualified field names."""
    names = names or {}
    problems = []
    for key, (lo, hi) in _RANGES.items():
        value = flat.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not lo <= value <= hi:
            kind = "a positive number" if key == "recommended_lr" else "a positive integer"
            problems.append(f"{names.get(key, key)}: found {value!r}, expected {kind} in "
                            f"{_fmt_bound(lo)}..{_fmt_bound(hi)}")
    C, N = flat.get("n_embd"), flat.get("head_size_a")
    if (isinstance(C, int) and isinstance(N, int) and not isinstance(C, bool) and not isinstance(N, bool)
            and C > 0 and N > 0 and C % N):
        problems.append(f"{names.get('n_embd', 'n_embd')}: found {C}, expected a multiple of head_size_a={N} "
                        f"(n_head = n_embd / head_size_a must be a whole number)")
    problems += _check_source(flat, names)
    version = flat.get("architecture_version", ARCHITECTURE_VERSION)
    if version != ARCHITECTURE_VERSION:
        problems.append(f"architecture_version: found {version!r}, expected {ARCHITECTURE_VERSION!r} "
                        f"(only RWKV-7 is supported)")
    return problems


# Hub repository ids: "owner/name", letters, digits, "-", "_", "."; no "--" or ".." (the hub's rules).
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _source_problem(key: str, value: str) -> str | None:
    """What is wrong with one source field's value (None if fine)."""
    if key == "hf_repo" and (not _REPO_RE.match(value) or ".." in value or "--" in value or len(value) > 200):
        return 'a Hugging Face repository id "owner/name", e.g. "BlinkDL/rwkv7-g1"'
    if key == "hf_filename":
        parts = value.split("/")
        if not value or "\\" in value or any(p in ("", ".", "..") for p in parts) or not value.isprintable():
            return "the file's path inside the repository, e.g. \"rwkv7-g1-1.5b-20250429-ctx4096.pth\""
    if key == "hf_revision" and (not value or not value.isprintable() or any(c.isspace() for c in value)
                                 or ".." in value):
        return 'a branch, tag or commit of the repository, e.g. "main"'
    if key == "sha256" and not _SHA256_RE.match(value):
        return "64 lowercase hex digits (the file's sha256)"
    return None


def _check_source(flat: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Source fields' problems. From JSON (``names`` given) every field present is checked, even "";
    from the dataclass, "" means "no source" and only set fields are checked."""
    problems = []
    for key in _SCHEMA["source"]:
        value = flat.get(key)
        if not isinstance(value, str) or (value == "" and key not in names):
            continue
        expected = _source_problem(key, value)
        if expected:
            problems.append(f"{names.get(key, key)}: found {value!r}, expected {expected}")
    return problems


_warned_missing: set[Path] = set()  # config_dirs() runs many times per command: warn once per entry


def config_dirs() -> list[Path]:
    """Directories searched for configs: ``$RWKVTUNE_CONFIG_PATH`` entries first, then the package's.

    An entry that is not a directory is kept (callers skip it) but warned about once: a typo there
    would otherwise just make the user's configs silently absent.
    """
    extra = [Path(p).expanduser() for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p.strip()]
    for d in extra:
        if not d.is_dir() and d not in _warned_missing:
            _warned_missing.add(d)
            what = "does not exist" if not d.exists() else "is not a directory"
            log.warn(f"${CONFIG_PATH_ENV} entry {d} {what}, so no configs are read from it; fix or remove "
                     f"that entry")
    return extra + [PACKAGE_MODELS_DIR]


def all_config_files() -> list[tuple[str, str, str | None]]:
    """Every config JSON in reach as (registry key, path, path of the file that shadows it or None).

    Unlike :func:`list_available_models` this keeps configs hidden by an equal name in an
    earlier directory, so ``rwkvtune models check`` can validate them too.
    """
    winners = list_available_models()
    out = []
    for directory in config_dirs():
        if not directory.is_dir():
            continue
        for f in sorted(directory.glob("*.json"), key=lambda f: _size_key(_registry_key(f.name))):
            key = _registry_key(f.name)
            winner = winners.get(key)
            out.append((key, str(f), None if winner == str(f) else winner))
    return out


def _size_key(key: str) -> tuple[float, str]:
    """Sort registry keys by the size in their name ("0.1b" < "13.3b"), other names last."""
    try:
        size = float(key[:-1]) if key.endswith("b") else math.inf
    except ValueError:
        size = math.inf
    return (size if math.isfinite(size) else math.inf), key


def list_available_models() -> dict[str, str]:
    """Registry names mapped to their config file paths, sorted by model size.

    The package's configs plus every ``*.json`` in the ``$RWKVTUNE_CONFIG_PATH`` directories;
    on equal names the first directory of ``$RWKVTUNE_CONFIG_PATH`` wins, and any user directory
    wins over the package.
    """
    found: dict[str, str] = {}
    for directory in reversed(config_dirs()):  # package first, so user dirs override equal names
        if not directory.is_dir():
            continue
        for f in sorted(directory.glob("*.json")):
            found[_registry_key(f.name)] = str(f)
    return dict(sorted(found.items(), key=lambda item: _size_key(item[0])))


def _default_release(cfg: ModelConfig) -> releases.Release | None:
    """The release an entry pins (its JSON's model file), with the JSON's source and checksum."""
    rel = releases.parse_name(cfg.model_file) if cfg.model_file else None
    if rel is None:
        return None
    return dataclasses.replace(rel, sha256=cfg.sha256, hf_repo=cfg.hf_repo, hf_filename=cfg.hf_filename,
                               hf_revision=cfg.hf_revision, origin=releases.REGISTRY)


def entry_releases(cfg: ModelConfig, key: str, extra=()) -> tuple[str | None, releases.Release | None,
                                                                   list[releases.Release]]:
    """(size, pinned default, every known release of that size, oldest first) of a registry entry as
    read from its JSON; (None, None, []) for an entry whose file is outside the naming scheme and
    whose name is no size. ``extra``: releases from a hub listing."""
    size = releases.entry_size(key, cfg.model_file, cfg.hf_filename)
    if size is None:
        return None, None, []
    default = _default_release(cfg)
    return size, default, releases.known_releases(size, default, models_dir(), extra)


def release_present(cfg: ModelConfig, rel: releases.Release) -> bool:
    """Whether a release's file is in the models directory (the pinned one: at the entry's model_path)."""
    if rel.origin == releases.REGISTRY or rel.file == Path(cfg.model_file).name:
        if Path(cfg.model_path).is_file():
            return True
    return (models_dir() / rel.file).is_file()


def with_release(cfg: ModelConfig, rel: releases.Release) -> ModelConfig:
    """The entry's config for another release of its size: same dims and recommendations, that file,
    its source (the entry's repository unless the release names its own), checksum and context length."""
    if cfg.model_file and rel.file == Path(cfg.model_file).name:
        return cfg
    repo = rel.hf_repo or cfg.hf_repo
    folder = str(PurePosixPath(cfg.hf_filename).parent) if cfg.hf_filename else "."
    filename = rel.hf_filename or (rel.file if folder == "." else f"{folder}/{rel.file}")
    return dataclasses.replace(
        cfg, model_file=rel.file, hf_repo=repo, hf_filename=filename if repo else "",
        hf_revision=(rel.hf_revision or cfg.hf_revision) if repo else "", sha256=rel.sha256 if repo else "",
        ctx_len=rel.ctx_len, recommended_ctx_len=min(cfg.recommended_ctx_len, rel.ctx_len),
        description=f"{cfg.description} (release {rel.label})".strip())


def resolve_release(cfg: ModelConfig, key: str, spec: str = "") -> ModelConfig:
    """An entry's config (as read from its JSON) for the release ``spec`` names ("" = the newest
    present, else the pinned default). An entry without a pinned release of the scheme is returned as
    is for "", and names no release otherwise."""
    size, default, known = entry_releases(cfg, key)
    if default is None and not spec:
        return cfg  # no pinned release: a config of the user's own, never swapped for another file
    if size is None:
        raise ConfigError(f"{key}@{spec}: entry {key} ({cfg.config_path}) has no releases: its model file "
                          f"{cfg.model_file!r} does not follow {releases.SCHEME}; use {key!r}")
    chosen = releases.choose(spec, known, lambda r: release_present(cfg, r), default, key)
    return with_release(cfg, chosen)


def matching_registry_entry(info: CheckpointInfo) -> str | None:
    """Name of the registry entry whose dims equal the checkpoint's, or None."""
    for name in list_available_models():
        try:
            cfg = ModelConfig.from_name(name)
        except Exception:  # a broken user config must not break detection; `models check` reports it
            continue
        if cfg.dims() == info.dims():
            return name
    return None


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def is_model_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a model file or folder (not a registry name or a .json config):
    a .pth/.pt/.safetensors path, or a Hugging Face model folder (a directory with config.json)."""
    s = os.fspath(path)
    return s.strip().lower().endswith(_CHECKPOINT_SUFFIXES) or (Path(s) / "config.json").is_file()


def load_model_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A registry name, a ``.json`` config path, or a model path -> ModelConfig.

    Names are case-insensitive, with or without the ``rwkv7-`` prefix ("1.5b", "1.5B",
    "rwkv7-1.5b"). A model path (``.pth``, official-layout ``.safetensors``, or a Hugging Face
    RWKV-7 folder) has its dimensions detected from its tensor shapes.
    """
    s = os.fspath(name_or_path)
    if not isinstance(s, str):
        raise ConfigError(f"expected a model name or path as str, found {type(s).__name__}")
    low = s.strip().lower()
    base, spec = releases.split_spec(s)
    if spec and not Path(s).exists() and _registry_key(base) in list_available_models():
        return ModelConfig.from_name(s)  # "1.5b@rwkv7-g1a-...pth": a release by file name, not a path
    run = resolve_run(s)  # a training run's directory: its final.pth, or the base its adapter/state is on
    if run is not None:
        return ModelConfig.from_checkpoint(run.model) if run.is_final else load_model_config(run.model)
    if is_model_path(s):
        return ModelConfig.from_checkpoint(s)
    if low.endswith(".json") and (os.sep in s or (os.altsep or os.sep) in s or Path(s).exists()):
        return ModelConfig.from_file(s)
    if os.sep in s and Path(s).exists() and _registry_key(s) not in list_available_models():
        what = ("a directory without config.json (not a Hugging Face model folder)" if Path(s).is_dir()
                else "a file that is neither .pth/.pt/.safetensors nor .json")
        raise ConfigError(f"{s}: is {what}; expected a registry name (see `rwkvtune models`), a .pth or .safetensors "
                          f"checkpoint, a Hugging Face RWKV-7 folder or a .json config")
    return ModelConfig.from_name(s)
