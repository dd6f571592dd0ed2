"""Releases of a registry size: which files of the official naming scheme are known, which are present,
and which one a name like ``"1.5b"`` or ``"1.5b@g1a"`` means.

BlinkDL publishes every RWKV-7 release as ``rwkv7-<release>-<size>-<date>-ctx<N>.pth`` (for example
``rwkv7-g1-1.5b-20250429-ctx4096.pth``): the release names the training data generation (g0, g0a, g1,
g1a, g1a2, ...; later is better at equal size), ``<date>`` is ``YYYYMMDD`` and ``ctx<N>`` the context
length the model was trained with. A registry entry is a size whose JSON pins one release (its
``model_file``); further releases of that size are known from

* files of the scheme present in the models directory (downloaded by hand, or by this tool), and
* the records file :data:`RECORDS_NAME` in the models directory, written by ``rwkvtune models download
  --latest`` / ``--release R``: file, release, date, context, sha256 and repository of each file it
  chose, so later runs resolve the same file offline and a new download is checked against that sha256.

``"1.5b"`` resolves to the newest known release present in the models directory, else to the pinned
default; ``"1.5b@g1a"`` names one (by release, ``release-date``, or file name). Standard library only.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

from rwkvtune.errors import ConfigError
from rwkvtune.utils import atomic_write_text, read_json_records

RECORDS_NAME = "rwkvtune-releases.json"
RECORDS_FORMAT = "rwkvtune-releases-v1"
SCHEME = "rwkv7-<release>-<size>-<date>-ctx<N>.pth"
# The official scheme. release: a letter then letters/digits (g1, g1a2, g0a); size: "0.1b", "13.3b".
_NAME_RE = re.compile(r"rwkv7-(?P<release>[a-z][a-z0-9]*)-(?P<size>\d+(?:\.\d+)?b)-(?P<date>\d{8})"
                      r"-ctx(?P<ctx>[1-9]\d{0,7})\.pth")
# Files of other RWKV-7 variants in the same scheme (rwkv7a-..., rwkv7b-...): not trainable here.
VARIANT_RE = re.compile(r"rwkv7[a-z]-[a-z][a-z0-9]*-\d+(?:\.\d+)?b-\d{8}-ctx\d+\.pth")
_SIZE_RE = re.compile(r"\d+(?:\.\d+)?b")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

# Where a release is known from, for listings.
REGISTRY, RECORDED, LOCAL, HUB = "registry", "recorded", "local file", "hub"


@dataclasses.dataclass(frozen=True)
class Release:
    """One file of the official scheme, and what is known about it."""

    file: str  # file name, e.g. "rwkv7-g1-1.5b-20250429-ctx4096.pth"
    release: str  # "g1"
    size: str  # "1.5b"
    date: str  # "20250429"
    ctx_len: int  # 4096
    sha256: str = ""  # known checksum (recorded at download), "" if unknown
    hf_repo: str = ""  # where it is published, "" if unknown
    hf_filename: str = ""  # its path in that repository ("" -> file)
    hf_revision: str = ""
    origin: str = ""  # REGISTRY, RECORDED, LOCAL or HUB

    @property
    def label(self) -> str:
        """``release-date``: unique even when a release was published twice for a size."""
        return f"{self.release}-{self.date}"

    def newness(self) -> tuple[str, str]:
        """Sort key: by date, then release name (later letters/numbers are later data)."""
        return self.date, self.release


def parse_name(name: str) -> Release | None:
    """The release a file name of the official scheme describes; None for any other name
    (directories in the name are ignored: only its last part counts)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    m = _NAME_RE.fullmatch(base)
    if not m:
        return None
    try:
        datetime.date(int(m["date"][:4]), int(m["date"][4:6]), int(m["date"][6:]))
    except ValueError:
        return None  # "20251340" is no date: not the scheme
    return Release(base, m["release"], m["size"], m["date"], int(m["ctx"]))


def ctx_from_name(name: str) -> int | None:
    """The context length a model file's name states (``...-ctx8192.pth`` or any ``ctx<N>``), or None."""
    rel = parse_name(name)
    if rel:
        return rel.ctx_len
    m = re.search(r"ctx(\d{1,8})(?!\d)", name.replace("\\", "/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


def entry_size(key: str, model_file: str, hf_filename: str = "") -> str | None:
    """The size a registry entry stands for: that of its pinned file if the file follows the scheme,
    else the key itself when it is a size ("1.5b"); None for an entry without a release train."""
    for name in (model_file, hf_filename):
        rel = parse_name(name) if name else None
        if rel:
            return rel.size
    return key if _SIZE_RE.fullmatch(key) else None


# ---- records -------------------------------------------------------------------------------------

_RECORD_FIELDS = {"file": str, "release": str, "size": str, "date": str, "ctx_len": int, "sha256": str,
                  "hf_repo": str, "hf_filename": str, "hf_revision": str}


def records_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / RECORDS_NAME


def read_records(directory: str | os.PathLike) -> list[Release]:
    """The releases recorded in ``directory``'s records file ([] without one), each checked: a field of
    the wrong type, a file name outside the scheme or disagreeing with its fields, or a malformed
    sha256 is a one-line ConfigError naming the file and entry."""
    path = records_path(directory)
    fix = "fix or delete it (it is rewritten by `rwkvtune models download SIZE --latest`)"
    entries = read_json_records(path, RECORDS_FORMAT, "releases", "the release records", fix)
    if entries is None:
        return []
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: releases[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: found {type(entry).__name__}, expected an object; {fix}")
        bad = [f"{k} (expected {t.__name__})" for k, t in _RECORD_FIELDS.items()
               if not isinstance(entry.get(k), t) or isinstance(entry.get(k), bool)]
        if bad or set(entry) - set(_RECORD_FIELDS):
            extra = sorted(set(entry) - set(_RECORD_FIELDS))
            raise ConfigError(f"{where}: missing or wrongly typed {', '.join(bad) or 'nothing'}"
                              + (f"; unknown {', '.join(extra)}" if extra else "") + f"; {fix}")
        rel = parse_name(entry["file"])
        fields = (entry["release"], entry["size"], entry["date"], entry["ctx_len"])
        if rel is None or entry["file"] != rel.file or (rel.release, rel.size, rel.date, rel.ctx_len) != fields:
            raise ConfigError(f"{where}: file {entry['file']!r} does not follow {SCHEME} or disagrees with the "
                              f"entry's release/size/date/ctx_len {fields}; {fix}")
        if entry["sha256"] and not _SHA256_RE.fullmatch(entry["sha256"]):
            raise ConfigError(f"{where}: sha256 {entry['sha256']!r} is not 64 lowercase hex digits; {fix}")
        out.append(dataclasses.replace(rel, sha256=entry["sha256"], hf_repo=entry["hf_repo"],
                                       hf_filename=entry["hf_filename"], hf_revision=entry["hf_revision"],
                                       origin=RECORDED))
    return out


def record(directory: str | os.PathLike, rel: Release) -> Path:
    """Add (or replace, by file name) one release in ``directory``'s records file, atomically."""

    kept = [r for r in read_records(directory) if r.file != rel.file]
    entries = [{k: getattr(r, k) for k in _RECORD_FIELDS} for r in sorted(kept + [rel], key=Release.newness)]
    path = records_path(directory)
    atomic_write_text(path, json.dumps({"format": RECORDS_FORMAT, "releases": entries}, indent=2) + "\n")
    return path


# ---- what is known, and resolution ----------------------------------------------------------------


def local_files(directory: str | os.PathLike, size: str) -> list[Release]:
    """Files of the scheme and this size present in ``directory`` (not in its subdirectories)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in sorted(names):
        rel = parse_name(name)
        if rel and rel.size == size and (Path(directory) / name).is_file():
            out.append(dataclasses.replace(rel, origin=LOCAL))
    return out


def known_releases(size: str, default: Release | None, directory: str | os.PathLike,
                   extra: Iterable[Release] = ()) -> list[Release]:
    """Every release of ``size`` known here, oldest first: the registry's pinned default, the recorded
    ones, the files present in ``directory``, and ``extra`` (a hub listing). One entry per file; what a
    record says (sha256, repository) wins over a bare local file."""
    by_file: dict[str, Release] = {}
    sources = [[default] if default else [], [r for r in read_records(directory) if r.size == size],
               local_files(directory, size), [r for r in extra if r.size == size]]
    for group in sources:
        for rel in group:
            if rel.file not in by_file:
                by_file[rel.file] = rel
            elif not by_file[rel.file].sha256 and rel.sha256:  # a checksum learnt later is kept
                by_file[rel.file] = dataclasses.replace(by_file[rel.file], sha256=rel.sha256)
    return sorted(by_file.values(), key=Release.newness)


def _matches(spec: str, rel: Release) -> bool:
    s = spec.strip().lower()
    return s in (rel.release, rel.label, rel.file.lower(), rel.file.lower()[:-len(".pth")])


def choose(spec: str, releases: list[Release], is_present: Callable[[Release], bool], default: Release | None,
           what: str) -> Release:
    """The release ``spec`` names among ``releases``; ``spec`` "" means the newest present one, else
    ``default``. Unknown or ambiguous specs are a ConfigError naming the close ones (``what`` names the
    entry, e.g. "1.5b")."""
    if not spec.strip():
        present = [r for r in releases if is_present(r)]
        if present:
            return max(present, key=Release.newness)
        if default is None:
            raise ConfigError(f"{what}: no release is pinned or present")
        return default
    hits = [r for r in releases if _matches(spec, r)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ConfigError(f"{what}@{spec}: ambiguous, {len(hits)} files of release {spec!r}: "
                          + ", ".join(f"{what}@{r.label} ({r.file})" for r in hits) + "; name one by release-date")
    names = sorted({r.release for r in releases} | {r.label for r in releases})
    close = difflib.get_close_matches(spec.strip().lower(), names, n=3, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise ConfigError(f"{what}@{spec}: no release {spec!r} of {what} is known here.{hint} Known: "
                      f"{', '.join(names) or 'none'}. `rwkvtune models releases {what}` lists them; "
                      f"`rwkvtune models download {what} --release {spec}` asks the hub for it")


def split_spec(name: str) -> tuple[str, str]:
    """``"1.5b@g1a"`` -> ("1.5b", "g1a"); ``"1.5b"`` -> ("1.5b", "")."""
    base, _, spec = name.partition("@")
    return base, spec.strip()
