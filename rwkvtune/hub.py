"""Release weights from the Hugging Face Hub: where a model file comes from, and its download.

``download_model("1.5b")`` fetches the file named by a config's ``source`` section and puts it
at exactly ``config.model_path`` (under ``--models-dir``/``models_dir`` when given):

* resumable: bytes arrive in ``DIR/.downloads/FILE.SHA.incomplete``, and an interrupted download
  (lost connection, Ctrl-C, killed process) continues from there on the next call. huggingface_hub's
  ``hf_hub_download`` cannot do that (since 1.18 it deletes its partial file on failure, see
  huggingface_hub#4306 and #4196), so its HTTP building blocks are used directly:
  ``get_hf_file_metadata`` (HEAD on the resolve URL) and ``http_get`` (GET with a Range header,
  which also retries dropped connections within one call);
* verified: the finished file's sha256 must equal the hub's (an LFS file's ETag is its sha256) and
  the config's ``source.sha256`` when set. Only a verified file is renamed to its final name, so a
  partial or corrupt download never appears there; a mismatch deletes the download;
* a file already present is returned without any network access; ``force=True`` downloads it again,
  and the old file stays in place until the new one is verified.

``HF_ENDPOINT`` (a mirror, or the tests' local server) and ``HF_TOKEN`` are honoured.
huggingface_hub is an optional dependency (``pip install "rwkvtune[hub]"``), imported only when a
download runs: :func:`missing_model_hint` and :func:`download_command` need the standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import os
import shlex
import shutil
import sys
import types
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from rwkvtune import __version__
from rwkvtune.configs import model_loader
from rwkvtune.configs.model_loader import ModelConfig, load_model_config
from rwkvtune.errors import ConfigError, DownloadError, OutputError, RwkvtuneError

INSTALL_HINT = 'pip install "rwkvtune[hub]"'
WORK_DIR = ".downloads"  # next to the final file, so the last step is a rename on one filesystem
_CHUNK = 8 << 20


# ---- where a model file comes from (standard library only) ---------------------------------


def target_path(config: ModelConfig, models_dir: str | os.PathLike | None = None) -> Path:
    """Where the config's model file belongs: ``config.model_path``, or under ``models_dir`` if given.

    An absolute ``model_file`` is used as is, like ``config.model_path`` does.
    """
    path = Path(config.model_file).expanduser()
    if path.is_absolute():
        return path
    base = Path(models_dir).expanduser().absolute() if models_dir is not None else model_loader.models_dir()
    return base / path


def _command_arg(config: ModelConfig) -> str:
    """How the command line names this config: its registry name if that loads this very file, else
    the .json path; "" for a config that has no file (built in Python)."""
    path = config.config_path or ""
    if not path.lower().endswith(".json"):
        return ""
    key = model_loader._registry_key(Path(path).name)
    found = model_loader.list_available_models().get(key)
    if found and Path(found).resolve() == Path(path).resolve():
        return key
    return shlex.quote(path)


def download_command(config: ModelConfig) -> str:
    """``rwkvtune models download NAME`` for this config, or "" without a source or a config file."""
    arg = _command_arg(config) if config.hf_repo else ""
    return f"rwkvtune models download {arg}" if arg else ""


def missing_model_hint(config: ModelConfig) -> str:
    """One line for "model file not found" errors: which file, which directory, how to get it.

    Use as ``f"model file not found: {missing_model_hint(config)}"``.
    """
    if not config.model_file:
        where = config.config_path or f"config {config.model_name!r}"
        return f"{where} names no model file (model_file); pass the .pth path instead"
    target = Path(config.model_path)
    directory = target.parent
    if directory == model_loader.models_dir():
        place = f"the models directory {directory} (${model_loader.MODEL_DIR_ENV}; set it to use another)"
    else:
        place = str(directory)
    if not config.hf_repo:
        where = config.config_path or f"config {config.model_name!r}"
        return (f"{target.name} is not in {place}; put it there ({where} names no download source), or point "
                f"the config at the file's actual location")
    command = download_command(config)
    get = f"run `{command}`, or download" if command else "download"
    return f"{target.name} is not in {place}; {get} {config.download_url} into {directory}"


# ---- download ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """One download: what, from where, to where, and what it must hash to."""

    config: ModelConfig
    url: str  # the resolve URL users see (HEAD goes there)
    target: Path
    hf: types.SimpleNamespace  # the huggingface_hub functions and errors used
    get_url: str = ""  # where the bytes come from (a CDN after the hub's redirect)
    sha256: str = ""  # expected checksum
    sha256_from: str = ""  # who says so, for the mismatch message
    size: int | None = None
    keep_auth: bool = True  # False when get_url is on another host: the token stays with the hub

    @property
    def partial(self) -> Path:
        return self.target.parent / WORK_DIR / f"{self.target.name}.{self.sha256[:16]}.incomplete"

    @property
    def where(self) -> str:
        return self.config.config_path or f"config {self.config.model_name!r}"

    @property
    def by_hand(self) -> str:
        return f"download {self.url} by hand into {self.target.parent}"


def download_model(name_or_config: str | os.PathLike | ModelConfig, models_dir: str | os.PathLike | None = None,
                   force: bool = False, progress: bool = True) -> Path:
    """Download a registry model's file from its source into the models directory; returns its path.

    ``name_or_config``: a registry name ("1.5b"), a .json config path or a :class:`ModelConfig`.
    ``models_dir`` overrides ``$RWKVTUNE_MODEL_DIR`` for a relative ``model_file``. A file already
    there is returned at once, without network access, unless ``force``. ``progress`` shows
    huggingface_hub's progress bar and a status line on stderr. Raises a one-line
    :class:`~rwkvtune.errors.RwkvtuneError` (ConfigError, DownloadError, OutputError) on failure.
    """
    config = name_or_config if isinstance(name_or_config, ModelConfig) else load_model_config(name_or_config)
    target = target_path(config, models_dir) if config.model_file else None
    if not config.hf_repo or target is None:
        where = config.config_path or f"config {config.model_name!r}"
        put = f", or put {target.name} into {target.parent} yourself" if target else ""
        raise ConfigError(f"{where}: no download source (the config has no \"source\" section with hf_repo and "
                          f"hf_filename); add one{put}")
    if target.is_file() and not force:
        return target  # trusted without a network round trip; `rwkvtune models check` compares its shapes
    if target.exists() and not target.is_file():
        raise OutputError(f"{target}: is a directory, not a model file; move it away or choose another "
                          f"directory with --models-dir DIR or ${model_loader.MODEL_DIR_ENV}")
    job = _Job(config, config.download_url, target, _import_hub(config, target))
    _read_metadata(job)
    _make_work_dir(job)
    with _exclusive(job):
        _drop_stale_partials(job, force)
        _say(progress, f"downloading {job.url}\n  into {target}")
        _transfer(job, progress)
        _verify(job, progress)
        try:
            os.replace(job.partial, target)
        except OSError as e:
            raise _unwritable(target.parent, e) from None
    return target


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _import_hub(config: ModelConfig, target: Path) -> types.SimpleNamespace:
    """The parts of huggingface_hub used here, or a one-line error saying how to install it."""
    try:
        from huggingface_hub import errors, get_hf_file_metadata
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            build_hf_headers,
            disable_progress_bars,
            enable_progress_bars,
        )
    except ImportError:
        raise DownloadError(f"downloading needs the huggingface_hub package, which is not installed; install it "
                            f"with: {INSTALL_HINT} (or download {config.download_url} by hand into "
                            f"{target.parent})") from None
    return types.SimpleNamespace(
        errors=errors, get_hf_file_metadata=get_hf_file_metadata, http_get=http_get,
        build_hf_headers=build_hf_headers, bars_disabled=are_progress_bars_disabled,
        disable_bars=disable_progress_bars, enable_bars=enable_progress_bars)


def _unwritable(directory: Path, e: OSError) -> OutputError:
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a directory" if blocker else (e.strerror or type(e).__name__)
    return OutputError(f"{directory}: cannot write the model file there ({why}); choose another directory with "
                       f"--models-dir DIR or ${model_loader.MODEL_DIR_ENV}")


def _make_work_dir(job: _Job) -> None:
    try:
        (job.target.parent / WORK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(job.target.parent, e) from None


def _read_metadata(job: _Job) -> None:
    """HEAD the resolve URL: the file's sha256, size and final location."""
    endpoint = f"{urlsplit(job.url).scheme}://{urlsplit(job.url).netloc}"
    try:
        meta = job.hf.get_hf_file_metadata(job.url, library_name="rwkvtune", library_version=__version__,
                                           endpoint=endpoint)
    except Exception as e:
        _raise_translated(job, e)
    etag = (meta.etag or "").lower()
    hub_sha = etag if model_loader._SHA256_RE.match(etag) else ""  # an LFS file's ETag is its sha256
    pinned = job.config.sha256
    if pinned and hub_sha and pinned != hub_sha:
        raise DownloadError(f"{job.url}: the hub's file has sha256 {hub_sha}, but source.sha256 in {job.where} is "
                            f"{pinned}: the file changed since the config was written; pin source.hf_revision to "
                            f"the commit you want, or update source.sha256")
    if not (pinned or hub_sha):
        raise DownloadError(f"{job.url}: the server gave no sha256 for the file (ETag {meta.etag!r}), so a download "
                            f"could not be verified; set source.sha256 in {job.where} to the file's checksum, or "
                            f"{job.by_hand}")
    job.sha256, job.sha256_from = pinned or hub_sha, (f"source.sha256 in {job.where}" if pinned else "the hub's")
    job.size = meta.size
    job.get_url = meta.location or job.url
    if job.get_url == job.url and meta.commit_hash:
        # No redirect: fetch from the commit just resolved, so a push in between cannot mix two files.
        revision = job.url.split("/resolve/", 1)[1].split("/", 1)[0]
        job.get_url = job.url.replace(f"/resolve/{revision}/", f"/resolve/{meta.commit_hash}/", 1)
    job.keep_auth = urlsplit(job.get_url)[:2] == urlsplit(job.url)[:2]


@contextlib.contextmanager
def _exclusive(job: _Job) -> Iterator[None]:
    """One download per file at a time: two writers appending to one partial file would corrupt it.

    filelock comes with huggingface_hub. Where locks do not work (some network filesystems) the
    checksum still refuses a corrupted file.
    """
    import filelock

    lock_path = job.target.parent / WORK_DIR / f"{job.target.name}.lock"
    lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise DownloadError(f"{job.target}: another download of this file is running (lock {lock_path}); wait for "
                            f"it to finish") from None
    except OSError as e:
        raise _unwritable(job.target.parent, e) from None
    try:
        yield
    finally:
        lock.release()


def _drop_stale_partials(job: _Job, force: bool) -> None:
    """Remove partial downloads that cannot be continued: another version's, an oversized one, or
    (with ``force``) any."""
    pattern = str(job.target.parent / WORK_DIR / f"{glob.escape(job.target.name)}.*.incomplete")
    for path in map(Path, glob.glob(pattern)):
        if path != job.partial or force:
            path.unlink(missing_ok=True)
    if job.size is not None and job.partial.is_file() and job.partial.stat().st_size > job.size:
        job.partial.unlink()


def _kept(job: _Job) -> str:
    """What an interrupted download leaves for the next call."""
    done = job.partial.stat().st_size if job.sha256 and job.partial.is_file() else 0
    if not done:
        return ""
    total = f" of {job.size:,}" if job.size is not None else ""
    return f"; {done:,}{total} bytes are kept in {job.partial}: run the same command again to resume"


def _check_space(job: _Job, done: int) -> None:
    if job.size is None:
        return
    need, free = job.size - done, shutil.disk_usage(job.target.parent).free
    if need > free:
        raise OutputError(f"{job.target.parent}: not enough disk space for {job.target.name}: {need / 1e9:.2f} GB "
                          f"more needed, {free / 1e9:.2f} GB free; free some space, or choose another directory "
                          f"with --models-dir DIR or ${model_loader.MODEL_DIR_ENV}{_kept(job)}")


def _transfer(job: _Job, progress: bool) -> None:
    """Append the missing bytes to the partial file (a Range request when some are there already)."""
    done = job.partial.stat().st_size if job.partial.is_file() else 0
    _check_space(job, done)
    if done:
        _say(progress, f"  resuming at {done:,}" + (f" of {job.size:,} bytes" if job.size is not None else " bytes"))
    headers = job.hf.build_hf_headers(library_name="rwkvtune", library_version=__version__)
    if not job.keep_auth:  # a signed CDN URL: the hub token must not travel there
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    try:
        with open(job.partial, "ab") as f, _progress_bars(job, progress):
            job.hf.http_get(job.get_url, f, resume_size=done, headers=headers, expected_size=job.size,
                            displayed_filename=job.target.name)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"download of {job.target.name} stopped{_kept(job)}") from None
    except Exception as e:
        _raise_translated(job, e)


@contextlib.contextmanager
def _progress_bars(job: _Job, show: bool) -> Iterator[None]:
    """huggingface_hub's progress bars on or off for this download only (its switch is global)."""
    was_disabled = job.hf.bars_disabled()
    if not show:
        job.hf.disable_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            job.hf.enable_bars()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify(job: _Job, progress: bool) -> None:
    """The partial file must hash to the expected sha256; a bad one is deleted (it cannot be resumed)."""
    _say(progress, f"  verifying sha256 of {job.target.name}")
    got = _sha256(job.partial)
    if got != job.sha256:
        job.partial.unlink(missing_ok=True)
        raise DownloadError(f"{job.url}: checksum mismatch: the downloaded file has sha256 {got}, {job.sha256_from} "
                            f"is {job.sha256}; the download was deleted and {job.target} left as it was; run the "
                            f"command again, and if it fails the same way the published file differs from its "
                            f"checksum")


# ---- errors --------------------------------------------------------------------------------

# Packages whose exceptions are transport failures (connection refused, DNS, timeout, dropped
# connection): huggingface_hub has used requests, httpx and httpx2.
_HTTP_PACKAGES = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "h2", "ssl"}


def _is_transport_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__module__.split(".")[0] in _HTTP_PACKAGES for c in type(e).__mro__[:-2])


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raise_translated(job: _Job, e: Exception) -> None:
    error = _translate(job, e)
    if error is None:
        raise e  # not a failure this module knows how to explain: a bug, keep its traceback
    raise error from None


def _translate(job: _Job, e: Exception) -> RwkvtuneError | None:
    """A one-line error for an exception of the HEAD or the GET; None for an unexpected one (a bug)."""
    errs, cfg = job.hf.errors, job.config
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, getattr(errs, "OfflineModeIsEnabled", ())):
        return DownloadError(f"{job.url}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network requests; "
                             f"unset it to download, or {job.by_hand}")
    if isinstance(e, errs.GatedRepoError):
        return DownloadError(f"{job.url}: {cfg.hf_repo} is a gated repository: accept its terms on its page and "
                             f"set HF_TOKEN to a token of that account")
    if isinstance(e, errs.RepositoryNotFoundError):
        return DownloadError(f"{job.url}: repository {cfg.hf_repo} not found (or private: set HF_TOKEN); check "
                             f"source.hf_repo in {job.where}")
    if isinstance(e, errs.RevisionNotFoundError):
        return DownloadError(f"{job.url}: revision {cfg.hf_revision!r} not found in {cfg.hf_repo}; check "
                             f"source.hf_revision in {job.where}")
    if isinstance(e, errs.EntryNotFoundError) or status == 404:
        return DownloadError(f"{job.url}: file {cfg.hf_filename} not found in {cfg.hf_repo} (HTTP 404); check "
                             f"source.hf_filename and source.hf_revision in {job.where}")
    if status in (401, 403):
        return DownloadError(f"{job.url}: access denied (HTTP {status}); set HF_TOKEN to a token that may read "
                             f"{cfg.hf_repo}, or {job.by_hand}")
    if status is not None:
        return DownloadError(f"{job.url}: the server answered HTTP {status}; try again later, or "
                             f"{job.by_hand}{_kept(job)}")
    if _is_transport_error(e):
        endpoint = os.environ.get(model_loader.HF_ENDPOINT_ENV)
        check = f"HF_ENDPOINT={endpoint}" if endpoint else "your network connection"
        return DownloadError(f"cannot download {job.url} ({_one_line(str(e) or type(e).__name__)}); check {check}, "
                             f"or {job.by_hand}{_kept(job)}")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return OutputError(f"{job.target.parent}: disk full while downloading {job.target.name}; free some space "
                           f"or choose another directory with --models-dir DIR or "
                           f"${model_loader.MODEL_DIR_ENV}{_kept(job)}")
    if isinstance(e, OSError) and e.errno is not None:
        return _unwritable(job.target.parent, e)
    if isinstance(e, OSError):  # http_get's size check: the server sent fewer or more bytes than announced
        return DownloadError(f"download of {job.url} incomplete ({_one_line(str(e))}){_kept(job)}")
    return None
