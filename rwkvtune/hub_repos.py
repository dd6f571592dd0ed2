"""Hugging Face model folders from the hub: ``rwkvtune models download --repo OWNER/NAME``.

An official HF-layout repository (``RWKV/RWKV7-Goose-World3-1.5B-HF``, ``fla-hub/rwkv7-1.5B-world``;
the layout is in :mod:`rwkvtune.convert.hf`) is downloaded as a folder ``MODELS_DIR/OWNER/NAME``, which
then loads like any HF folder (``rwkvtune generate --model MODELS_DIR/OWNER/NAME``):

* which files: ``config.json``, the ``*.safetensors`` weights (and ``model.safetensors.index.json``) and
  the tokenizer/vocab files, top level only. Pickle weights (``*.bin``, ``*.pt``, ``*.pth``) are skipped
  with a note and a repository whose weights are only pickles is refused; code (``*.py``), READMEs and
  the rest are left out too: nothing downloaded here can run code;
* verified, every file, against the hub's file listing (``list_repo_tree``): an LFS file by its size and
  LFS sha256 (plus the safetensors format check of :mod:`rwkvtune.hub`, and the resolve HEAD's
  ``X-Linked-Etag``/``X-Linked-Size`` must agree when the server sends them), a file stored in git
  (config.json, tokenizer files) by its size and git blob id, ``sha1(b"blob <size>\\0" + content)``.
  A plain ``ETag`` is never taken for a checksum;
* read at one commit: the resolve HEAD of config.json names the commit (``X-Repo-Commit``) the revision
  points to, and every file is fetched at that commit, so a push during the download cannot mix two
  versions (a file changed in between fails its listing checksum: run again);
* refused early: a config.json whose ``model_type`` is not ``rwkv7`` stops the download after that one
  small file; a repository without safetensors weights before anything is fetched;
* atomic: files arrive in a staging folder ``MODELS_DIR/.downloads/OWNER--NAME@COMMIT`` (resumable:
  verified files and the partial one are kept when a download is interrupted, and the next call
  continues), the finished folder's tensor names and shapes are checked (headers only) to be a complete
  RWKV-7 model, and only then is it renamed to ``MODELS_DIR/OWNER/NAME``: nothing half-written ever
  appears under that name;
* recorded in ``MODELS_DIR/rwkvtune-repos.json`` (:mod:`rwkvtune.configs.repo_records`): repository,
  revision, commit, every file's size and checksum, so a later call finds the folder offline.

Transfers (resume with ``Range``, bounded retries with backoff, size checks while bytes arrive, the
token kept from the CDN) are :mod:`rwkvtune.hub`'s. huggingface_hub is needed (``rwkvtune[hub]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import types
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlsplit

from rwkvtune import hub
from rwkvtune.configs import model_loader, repo_records
from rwkvtune.configs.repo_records import RepoFileRecord, RepoRecord
from rwkvtune.io.variants import hf_model_type_refusal
from rwkvtune.errors import CheckpointError, ConfigError, DownloadError, OutputError, RwkvtuneError
from rwkvtune.hub_releases import RepoFile, list_repo_files
from rwkvtune.configs.detect import detect
from rwkvtune.io.layout import LAYER0_V_KEYS
from rwkvtune.configs.model_loader import ModelConfig
from rwkvtune.utils import fsync_tree

# The names of rwkvtune.io.hf_layout, which imports torch: this module must not at import.
CONFIG_NAME = "config.json"
HF_MODEL_TYPE = "rwkv7"
WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")
# Tokenizer and generation files of HF repositories (data: JSON, text, a sentencepiece protobuf).
_TOKENIZER_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model"}
_VOCAB_RE = re.compile(r"[^/]*vocab[^/]*\.(txt|json)", re.IGNORECASE)  # rwkv_vocab_v20230424.txt
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HASH_CHUNK = 8 << 20  # bytes per read when hashing


@dataclasses.dataclass
class RepoDownload:
    """What ``download_repo`` did: the folder, its record, whether bytes were downloaded (False: it was
    already there), and the files of the repository left out."""

    folder: Path
    record: RepoRecord
    fresh: bool
    skipped_pickles: list[str] = dataclasses.field(default_factory=list)
    skipped_other: list[str] = dataclasses.field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.record.files)


# ---- which files ---------------------------------------------------------------------------


def select(files: list[RepoFile]) -> tuple[list[RepoFile], list[str], list[str]]:
    """(files to download, config.json first; pickle weights left out; other files left out)."""
    fetch, pickles, other = [], [], []
    for f in files:
        name, low = f.path, f.path.lower()
        wanted = ("/" not in name and repo_records.safe_file_name(name)
                  and (name == CONFIG_NAME or low.endswith((".safetensors", ".safetensors.index.json"))
                       or name in _TOKENIZER_NAMES or _VOCAB_RE.fullmatch(name)))
        if wanted:
            fetch.append(f)
        elif low.endswith(_PICKLE_SUFFIXES):
            pickles.append(name)
        else:
            other.append(name)
    fetch.sort(key=lambda f: (f.path != CONFIG_NAME, f.path))
    return fetch, pickles, other


def _check_listing(where: str, fetch: list[RepoFile], pickles: list[str]) -> None:
    """Refuse, before any byte is fetched, a listing that cannot give a verified RWKV-7 HF folder."""
    names = {f.path for f in fetch}
    if CONFIG_NAME not in names:
        raise CheckpointError(f"{where}: lists no {CONFIG_NAME} at its top level, so it is not a Hugging Face model "
                              f"folder; nothing was downloaded; for a registry size use `rwkvtune models download "
                              f"SIZE`")
    if not names & set(WEIGHTS_NAMES):
        found = (f"only {', '.join(pickles[:4])} (pickle files, which rwkvtune never loads)" if pickles
                 else "no model.safetensors")
        raise CheckpointError(f"{where}: its weights are {found}; expected model.safetensors (or shards with "
                              f"model.safetensors.index.json); nothing was downloaded; use a repository that "
                              f"publishes safetensors weights")
    for f in fetch:
        lfs = bool(f.sha256)
        if not (lfs or f.git_oid):
            raise DownloadError(f"{where}: the hub's file listing gives no checksum for {f.path} (no LFS sha256, no "
                                f"git oid), so it could not be verified; nothing was downloaded; check HF_ENDPOINT")


# ---- one file --------------------------------------------------------------------------------


@dataclasses.dataclass
class _FileJob(hub._Job):
    """One file of a repository: :class:`rwkvtune.hub._Job` with the listing's checksums, its partial
    file in the staging folder, and messages that name ``--repo``/``--revision``."""

    file: RepoFile | None = None
    folder: Path | None = None  # the final folder, for messages

    @property
    def partial(self) -> Path:
        key = (self.file.sha256 or self.file.git_oid)[:16]
        return self.target.parent / f".{self.target.name}.{key}.incomplete"

    @property
    def where(self) -> str:
        return f"`rwkvtune models download --repo {self.config.hf_repo}`"

    @property
    def by_hand(self) -> str:
        return f"download {self.url} by hand into {self.folder}"

    def fix(self, *fields: str) -> str:
        names = {"hf_repo": "--repo", "hf_revision": "--revision", "hf_filename": "the repository's file list"}
        return " and ".join(names[f] for f in fields)


def _hub_functions(where: str) -> types.SimpleNamespace:
    try:
        from huggingface_hub import errors
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, http_backoff, tqdm
    except ImportError as e:
        raise DownloadError(f"{where}: downloading needs the huggingface_hub package, which is not installed; "
                            f"install it with: {hub.INSTALL_HINT}") from e
    return types.SimpleNamespace(errors=errors, build_hf_headers=build_hf_headers, get_session=get_session,
                                 raise_for_status=hf_raise_for_status, http_backoff=http_backoff, tqdm=tqdm)


def _job(repo: str, revision: str, ref: str, f: RepoFile, staging: Path, folder: Path, hf, retries: int,
         backoff_s: float) -> _FileJob:
    endpoint = (os.environ.get(model_loader.HF_ENDPOINT_ENV) or model_loader.DEFAULT_HF_ENDPOINT).rstrip("/")
    url = f"{endpoint}/{repo}/resolve/{quote(ref, safe='')}/{quote(f.path)}"
    source = types.SimpleNamespace(hf_repo=repo, hf_revision=revision, hf_filename=f.path, config_path="",
                                   model_name=repo, sha256=f.sha256, download_url=url)
    return _FileJob(source, url, staging / f.path, hf, retries=retries, backoff_s=backoff_s, sha256=f.sha256,
                    sha256_from="the hub's listing", size=f.size, file=f, folder=folder)


def _head(job: _FileJob) -> str:
    """HEAD the file: where its bytes are (the CDN for an LFS file), and the commit the revision resolves
    to ("" when the server names none). An LFS file's X-Linked-Etag/X-Linked-Size, when sent, must
    agree with the listing."""
    try:
        response, location = hub._head(job)
    except RwkvtuneError:
        raise
    except Exception as e:
        hub._raise_translated(job, e)
    linked = hub._etag(response.headers.get("X-Linked-Etag"))
    raw_size = (response.headers.get("X-Linked-Size") or "").strip()
    if job.file.sha256 and ((linked and linked != job.file.sha256)
                            or (raw_size.isdigit() and int(raw_size) != job.file.size)):
        raise DownloadError(f"{job.url}: the hub's metadata (X-Linked-Etag {linked or '-'}, X-Linked-Size "
                            f"{raw_size or '-'}) disagrees with its file listing (sha256 {job.file.sha256}, "
                            f"{job.file.size:,} bytes); nothing was saved under {job.folder}; run the command "
                            f"again, and if it fails the same way check HF_ENDPOINT")
    job.get_url = location
    job.keep_auth = urlsplit(location)[:2] == urlsplit(job.url)[:2]
    commit = (response.headers.get("X-Repo-Commit") or "").strip().lower()
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else ""


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content: sha1 of ``b"blob <size>\\0"`` + the bytes."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: Path, f: RepoFile) -> str:
    """"" when ``path`` is the listed file (size, then format and LFS sha256, or git blob id); else what
    is wrong."""
    size = path.stat().st_size
    if size != f.size:
        return f"size mismatch: the downloaded file has {size:,} bytes, the hub's listing says {f.size:,}"
    if f.sha256:
        if f.path.lower().endswith(".safetensors") and (wrong := hub._format_problem(path, f.path)):
            return f"the downloaded file {wrong}: the server sent something else (an error page?)"
        if (got := hub._sha256(path)) != f.sha256:
            return f"checksum mismatch: the downloaded file has sha256 {got}, the hub's listing (LFS oid) says {f.sha256}"
    elif (got := git_blob_sha1(path)) != f.git_oid:
        return f"checksum mismatch: the downloaded file has git blob id {got}, the hub's listing says {f.git_oid}"
    return ""


def _fetch(job: _FileJob, progress: bool) -> None:
    """Download one file into the staging folder, verified; a bad download is deleted."""
    dest, f = job.target, job.file
    for stale in glob.glob(str(dest.parent / f".{glob.escape(dest.name)}.*.incomplete")):
        if Path(stale) != job.partial:
            Path(stale).unlink(missing_ok=True)  # another version's partial file
    if job.done() > f.size:
        job.partial.unlink()
    hub._transfer(job, progress)
    problem = file_problem(job.partial, f)
    if problem:
        job.partial.unlink(missing_ok=True)
        raise DownloadError(f"{job.url}: {problem}; the download was deleted and nothing was saved under "
                            f"{job.folder}; run the command again, and if it fails the same way the server "
                            f"(HF_ENDPOINT) does not serve the published file")
    os.replace(job.partial, dest)


# ---- the folder ------------------------------------------------------------------------------


def _check_config(path: Path, where: str) -> None:
    """config.json must be a JSON object with model_type "rwkv7"."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: {CONFIG_NAME} is not valid JSON ({type(e).__name__}); expected the config "
                              f"of a Hugging Face model folder") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: {CONFIG_NAME} is a JSON {type(cfg).__name__}, expected an object")
    if cfg.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(hf_model_type_refusal(f"{where}: {CONFIG_NAME}", cfg.get("model_type")))


def _check_model(staging: Path, where: str) -> None:
    """The staged folder must be a complete RWKV-7 model in the HF layout: every tensor name known, every
    key of its detected dims present with its shape (headers only; no tensor data is read)."""
    from rwkvtune.io.hf_layout import hf_shapes

    try:
        shapes = hf_shapes(staging)
        info = detect(shapes, source=str(staging))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: the downloaded files are not a loadable RWKV-7 Hugging Face folder "
                              f"({e})") from e
    expected = ModelConfig.from_checkpoint(info).param_shapes(layer0_v=info.has_layer0_v)
    wrong = [f"{k} {list(shapes.get(k, ())) or 'missing'} (expected {list(s)})" for k, s in expected.items()
             if k not in LAYER0_V_KEYS and tuple(shapes.get(k, ())) != tuple(s)]
    if wrong:
        raise CheckpointError(f"{where}: the downloaded weights are incomplete or inconsistent: "
                              f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")


@contextlib.contextmanager
def _locked(work: Path, slug: str, folder: Path) -> Iterator[None]:
    import filelock

    lock = filelock.FileLock(str(work / f"{slug}.lock"), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout as e:
        raise DownloadError(f"{folder}: another download of this repository is running (lock {lock.lock_file}); "
                            f"wait for it to finish") from e
    try:
        yield
    finally:
        lock.release()


def _present(base: Path, repo: str, revision: str) -> RepoDownload | None:
    """The recorded folder of ``repo`` when it is there, checked against its record; None when absent."""
    rec = repo_records.find(base, repo)
    folder = base / (rec.folder if rec else repo)
    if rec is None:
        if folder.exists():
            raise OutputError(f"{folder}: exists but was not downloaded by rwkvtune (no entry in "
                              f"{repo_records.records_path(base)}); move it away, or pass --force to replace it")
        return None
    if not folder.is_dir():
        return None
    if revision not in (rec.revision, rec.commit):
        raise ConfigError(f"{folder} holds {rec.repo} at revision {rec.revision!r} (commit {rec.commit or 'unknown'}), "
                          f"not {revision!r}; pass --force to replace it with revision {revision!r}")
    missing = repo_records.missing_files(folder, rec)
    if missing:
        raise CheckpointError(f"{folder}: recorded files missing or changed: {', '.join(missing[:3])}; pass --force "
                              f"to download the repository again")
    return RepoDownload(folder, rec, fresh=False)


def download_repo(repo: str, revision: str = "main", models_dir: str | os.PathLike | None = None,
                  force: bool = False, progress: bool = True, retries: int | None = None,
                  backoff_s: float | None = None) -> RepoDownload:
    """Download the HF-layout repository ``repo`` (``"owner/name"``) at ``revision`` as the folder
    ``MODELS_DIR/owner/name``, every file verified, and record it; see the module docstring.

    A recorded folder that is present is returned without network access unless ``force``, which
    downloads it again and replaces the folder only once the new one is complete. ``retries`` and
    ``backoff_s`` as in :func:`rwkvtune.hub.download_model`. Raises a one-line RwkvtuneError.
    """
    repo, revision = repo.strip(), revision.strip()
    if problem := repo_records.repo_problem(repo):
        raise ConfigError(f"--repo {repo!r}: expected {problem}")
    if problem := repo_records.revision_problem(revision):
        raise ConfigError(f"--revision {revision!r}: expected {problem}")
    base = Path(models_dir).expanduser().absolute() if models_dir is not None else model_loader.models_dir()
    if not force and (found := _present(base, repo, revision)):
        return found
    rec = repo_records.find(base, repo)
    folder = base / (rec.folder if rec else repo)
    where = f"{repo} (revision {revision})"
    files = list_repo_files(repo, revision, fields=("--repo", "--revision"))
    fetch, pickles, other = select(files)
    _check_listing(where, fetch, pickles)
    hf = _hub_functions(where)
    retries = hub.RETRIES if retries is None else max(0, int(retries))
    backoff_s = hub.BACKOFF_S if backoff_s is None else max(0.0, float(backoff_s))

    work = base / hub.WORK_DIR
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise hub._unwritable(base, e) from e
    owner, name = repo.split("/")
    slug = f"{owner}--{name}"  # the hub allows no "--" in ids: unambiguous
    with _locked(work, slug, folder):
        config_file = fetch[0]
        commit = _head(_job(repo, revision, revision, config_file, work, folder, hf, retries, backoff_s))
        ref = commit or revision
        where = f"{repo} (revision {revision}" + (f", commit {commit[:12]})" if commit and commit != revision else ")")
        staging = work / f"{slug}@{quote(ref, safe='')}"
        for old in glob.glob(str(work / f"{glob.escape(slug)}@*")):
            if Path(old) != staging:
                shutil.rmtree(old, ignore_errors=True)  # another commit's staging: its files cannot be used
        staging.mkdir(exist_ok=True)
        todo = [f for f in fetch if not ((staging / f.path).is_file() and not file_problem(staging / f.path, f))]
        need = sum(f.size for f in todo)
        free = shutil.disk_usage(work).free
        if need > free:
            raise OutputError(f"{base}: not enough disk space for {repo}: {need / 1e9:.2f} GB more needed, "
                              f"{free / 1e9:.2f} GB free; free some space, or choose another directory with "
                              f"--models-dir DIR or ${model_loader.MODEL_DIR_ENV}")
        hub._say(progress, f"downloading {len(fetch)} file(s) of {where}, {need:,} bytes\n  into {folder}")
        for f in fetch:
            if f in todo:
                job = _job(repo, revision, ref, f, staging, folder, hf, retries, backoff_s)
                _head(job)
                _fetch(job, progress)
            if f is config_file:
                try:
                    _check_config(staging / f.path, where)
                except CheckpointError:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
        keep = {f.path for f in fetch}
        for p in staging.iterdir():
            if p.name not in keep:  # a partial file of another version
                p.unlink()
        try:
            _check_model(staging, where)
        except CheckpointError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"{e}; the download was deleted, nothing was saved under {folder}") from e
        record = RepoRecord(repo, revision, commit, tuple(
            RepoFileRecord(f.path, f.size, f.sha256, "" if f.sha256 else f.git_oid) for f in fetch))
        _install(base, staging, folder, record, work / f"{slug}.old-{os.getpid()}")
    return RepoDownload(folder, record, fresh=True, skipped_pickles=pickles, skipped_other=other)


def _install(base: Path, staging: Path, folder: Path, record: RepoRecord, aside: Path) -> None:
    """Record the download, then rename the verified staging folder into place (a folder already there,
    with --force, is moved aside first and deleted once the new one is in place). Recording first: a
    record without its folder only means "download again"."""
    try:
        fsync_tree(staging)
        repo_records.record(base, record)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists() or folder.is_symlink():
            os.rename(folder, aside)
        try:
            os.rename(staging, folder)
        except OSError:
            if aside.exists() and not folder.exists():
                os.rename(aside, folder)  # put the old folder back
            raise
    except RwkvtuneError:
        raise
    except OSError as e:
        raise hub._unwritable(folder.parent, e) from e
    if aside.is_symlink() or aside.is_file():
        aside.unlink()
    elif aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
