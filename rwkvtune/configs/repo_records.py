"""Records of Hugging Face model folders downloaded by ``rwkvtune models download --repo OWNER/NAME``.

The folder of a repository lands at ``MODELS_DIR/OWNER/NAME``; :data:`RECORDS_NAME` in the models
directory says, for each, which repository, revision and commit it came from and every file with its
size and checksum (the LFS sha256 of a file stored in LFS, the git blob sha1 of one stored in git).
A later ``models download --repo`` finds the folder there without asking the hub, after checking
that every recorded file is present with its recorded size. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from rwkvtune.configs.model_loader import _source_problem
from rwkvtune.errors import ConfigError
from rwkvtune.utils import atomic_write_text, read_json_records

RECORDS_NAME = "rwkvtune-repos.json"
RECORDS_FORMAT = "rwkvtune-repos-v1"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_GIT_OID_RE = re.compile(r"[0-9a-f]{40}")  # a git object id (sha1): a blob's, or a commit's
# A file of the folder: top level only, no hidden or partial names, nothing that climbs out of it.
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")
_FIX = "fix or delete it (it is rewritten by `rwkvtune models download --repo OWNER/NAME`)"


@dataclasses.dataclass(frozen=True)
class RepoFileRecord:
    """One file of a downloaded folder: its name, size in bytes, and the checksum it was verified by."""

    path: str
    size: int
    sha256: str = ""  # the LFS object's sha256; "" for a file stored in git
    git_oid: str = ""  # the git blob sha1 (of b"blob <size>\\0" + content); "" for a file stored in LFS


@dataclasses.dataclass(frozen=True)
class RepoRecord:
    """One downloaded repository: where from (revision as asked, the commit it resolved to) and its files."""

    repo: str  # "owner/name"
    revision: str  # as given to --revision ("main" by default)
    commit: str  # the commit the files were read at; "" when the server named none
    files: tuple[RepoFileRecord, ...]

    @property
    def folder(self) -> str:
        """Its folder, relative to the models directory."""
        return self.repo


def safe_file_name(name: str) -> bool:
    """True for a top-level file name a download may write (no directories, no hidden names)."""
    return bool(_FILE_RE.fullmatch(name)) and not name.endswith(".incomplete")


def repo_problem(repo: str) -> str | None:
    """What is wrong with a repository id (None if it is "owner/name" by the hub's rules)."""
    return _source_problem("hf_repo", repo)


def revision_problem(revision: str) -> str | None:
    return _source_problem("hf_revision", revision)


def records_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / RECORDS_NAME


def _file_record(entry: object, where: str) -> RepoFileRecord:
    if not isinstance(entry, dict) or set(entry) != {"path", "size", "sha256", "git_oid"}:
        raise ConfigError(f"{where}: expected an object with path, size, sha256, git_oid; {_FIX}")
    path, size, sha, oid = entry["path"], entry["size"], entry["sha256"], entry["git_oid"]
    if not (isinstance(path, str) and safe_file_name(path)):
        raise ConfigError(f"{where}: path {path!r} is not a plain file name; {_FIX}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ConfigError(f"{where}: size {size!r} is not a byte count; {_FIX}")
    if not (isinstance(sha, str) and isinstance(oid, str)) or bool(sha) == bool(oid) \
            or (sha and not _SHA256_RE.fullmatch(sha)) or (oid and not _GIT_OID_RE.fullmatch(oid)):
        raise ConfigError(f"{where}: expected exactly one checksum, sha256 (64 hex digits) or git_oid (40 hex "
                          f"digits), found sha256={sha!r}, git_oid={oid!r}; {_FIX}")
    return RepoFileRecord(path, size, sha, oid)


def read_records(directory: str | os.PathLike) -> list[RepoRecord]:
    """The repositories recorded in ``directory`` ([] without a records file), each checked: a wrong
    type, an invalid repository id or commit, an unsafe file name or a malformed checksum is a
    one-line ConfigError naming the file and entry."""
    path = records_path(directory)
    entries = read_json_records(path, RECORDS_FORMAT, "repos", "the repository records", _FIX)
    if entries is None:
        return []
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: repos[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"repo", "revision", "commit", "files"}:
            raise ConfigError(f"{where}: expected an object with repo, revision, commit, files; {_FIX}")
        repo, revision, commit, files = entry["repo"], entry["revision"], entry["commit"], entry["files"]
        if not isinstance(repo, str) or repo_problem(repo):
            raise ConfigError(f"{where}: repo {repo!r} is not a repository id \"owner/name\"; {_FIX}")
        if not isinstance(revision, str) or revision_problem(revision):
            raise ConfigError(f"{where}: revision {revision!r} is not a branch, tag or commit; {_FIX}")
        if not isinstance(commit, str) or (commit and not _GIT_OID_RE.fullmatch(commit)):
            raise ConfigError(f"{where}: commit {commit!r} is not 40 hex digits; {_FIX}")
        if not isinstance(files, list) or not files:
            raise ConfigError(f"{where}: files must be a non-empty list; {_FIX}")
        out.append(RepoRecord(repo, revision, commit,
                              tuple(_file_record(f, f"{where}.files[{j}]") for j, f in enumerate(files))))
    return out


def find(directory: str | os.PathLike, repo: str) -> RepoRecord | None:
    """The record of ``repo`` in ``directory`` (repository ids compare case-insensitively, as on the hub)."""
    return next((r for r in read_records(directory) if r.repo.lower() == repo.lower()), None)


def record(directory: str | os.PathLike, rec: RepoRecord) -> Path:
    """Add (or replace, by repository) one record in ``directory``'s records file, atomically."""

    kept = [r for r in read_records(directory) if r.repo.lower() != rec.repo.lower()]
    entries = [{"repo": r.repo, "revision": r.revision, "commit": r.commit,
                "files": [dataclasses.asdict(f) for f in r.files]}
               for r in sorted(kept + [rec], key=lambda r: r.repo.lower())]
    path = records_path(directory)
    atomic_write_text(path, json.dumps({"format": RECORDS_FORMAT, "repos": entries}, indent=2) + "\n")
    return path


def missing_files(folder: str | os.PathLike, rec: RepoRecord) -> list[str]:
    """The recorded files that are absent from ``folder`` or have another size ([] when all are there)."""
    out = []
    for f in rec.files:
        p = Path(folder) / f.path
        try:
            size = p.stat().st_size if p.is_file() else None
        except OSError:
            size = None
        if size != f.size:
            out.append(f"{f.path} ({'absent' if size is None else f'{size:,} bytes, recorded {f.size:,}'})")
    return out
