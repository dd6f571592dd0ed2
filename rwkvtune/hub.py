"""Release weights from the Hugging Face Hub: where a model file comes from, and its download.

``download_model("1.5b")`` fetches the file named by a config's ``source`` section and puts it
at exactly ``config.model_path`` (under ``--models-dir``/``models_dir`` when given):

* resumable: bytes arrive in ``DIR/.downloads/FILE.SHA.incomplete``, and an interrupted download
  (lost connection, Ctrl-C, killed process) continues from there on the next call. huggingface_hub's
  ``hf_hub_download`` cannot do that (since 1.18 it deletes its partial file on failure, see
  huggingface_hub#4306 and #4196), and its ``http_get`` retries for as long as a server sends any
  bytes, even the same ones again (a server that drops connections and ignores ``Range``), so the
  transfer loop is ours, on huggingface_hub's HTTP session (proxies, offline mode, user agent);
* bounded: a failed GET (dropped connection, timeout, HTTP 408/429/5xx) is retried after
  ``backoff_s * 2**k`` seconds (capped at :data:`BACKOFF_MAX_S`), at most ``retries`` times in a
  row without the file growing past its furthest byte; then one line says so and the partial
  file is kept for the next call;
* verified against the hub's LFS metadata: the resolve HEAD's ``X-Linked-Etag`` (the LFS object's
  sha256) and ``X-Linked-Size``, as huggingface_hub's ``get_hf_file_metadata`` reads them, plus the
  config's ``source.sha256`` when set. A plain ``ETag`` is never taken for a checksum: a mirror's
  ETag describes whatever it serves (an HTML error page hashes to its own ETag). The size is checked
  while bytes arrive, and the finished file must be a PyTorch zip archive (``.pth``) or a
  safetensors file (``.safetensors``) and hash to the expected sha256. Only then is it renamed to
  its final name, so a partial, foreign or corrupt download never appears there; a mismatch
  deletes the download;
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
import time
import types
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin, urlsplit

from rwkvtune import log
from rwkvtune.configs import model_loader
from rwkvtune.configs.model_loader import ModelConfig, load_model_config
from rwkvtune.errors import ConfigError, DownloadError, OutputError, RwkvtuneError
from rwkvtune import __version__

INSTALL_HINT = 'pip install "rwkvtune[hub]"'
WORK_DIR = ".downloads"  # next to the final file, so the last step is a rename on one filesystem
_CHUNK = 8 << 20  # bytes per read when hashing
_GET_CHUNK = 1 << 20  # bytes per network read: what a dropped connection can lose from the buffer
# A failed GET is retried at most RETRIES times in a row without new bytes, waiting BACKOFF_S *
# 2**k seconds before the k-th such retry (capped at BACKOFF_MAX_S): 1+2+4+8+16 s, about half a
# minute of outage bridged. download_model takes both as arguments (the tests use milliseconds).
RETRIES = 5
BACKOFF_S = 1.0
BACKOFF_MAX_S = 30.0
_MAX_REDIRECTS = 5  # same-host redirects of the resolve HEAD (a renamed repository)
_TIMEOUT_S = 10.0  # connect/read timeout of each request, as huggingface_hub's default


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
        if config.release and config.model_file != ModelConfig.from_file(found).model_file:
            return f"{key}@{config.release}"  # another release of the entry's size than the pinned one
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
    retries: int = RETRIES
    backoff_s: float = BACKOFF_S
    get_url: str = ""  # where the bytes come from (a CDN after the hub's redirect)
    sha256: str = ""  # expected checksum
    sha256_from: str = ""  # who says so, for the mismatch message
    size: int | None = None  # bytes, from the hub's X-Linked-Size
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

    def fix(self, *fields: str) -> str:
        """Where the user sets the source ``fields`` (hf_repo, hf_revision, hf_filename), for not-found
        errors: the config's source section here; a ``--repo`` download names its options instead."""
        return " and ".join(f"source.{f}" for f in fields) + f" in {self.where}"

    def done(self) -> int:
        return self.partial.stat().st_size if self.partial.is_file() else 0


def download_model(name_or_config: str | os.PathLike | ModelConfig, models_dir: str | os.PathLike | None = None,
                   force: bool = False, progress: bool = True, retries: int | None = None,
                   backoff_s: float | None = None) -> Path:
    """Download a registry model's file from its source into the models directory; returns its path.

    ``name_or_config``: a registry name ("1.5b"), a .json config path or a :class:`ModelConfig`.
    ``models_dir`` overrides ``$RWKVTUNE_MODEL_DIR`` for a relative ``model_file``. A file already
    there is returned at once, without network access, unless ``force``. ``progress`` shows a
    progress bar and a status line on stderr. ``retries`` (default :data:`RETRIES`) failed GETs in a
    row without new bytes end the call, the k-th after ``backoff_s * 2**k`` seconds (default
    :data:`BACKOFF_S`). Raises a one-line :class:`~rwkvtune.errors.RwkvtuneError` (ConfigError,
    DownloadError, OutputError) on failure.
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
    job = _Job(config, config.download_url, target, _import_hub(config, target),
               retries=RETRIES if retries is None else max(0, int(retries)),
               backoff_s=BACKOFF_S if backoff_s is None else max(0.0, float(backoff_s)))
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
            raise _unwritable(target.parent, e) from e
    return target


def _say(progress: bool, message: str) -> None:
    if progress:
        log.info(message)


def _import_hub(config: ModelConfig, target: Path) -> types.SimpleNamespace:
    """The parts of huggingface_hub used here, or a one-line error saying how to install it."""
    try:
        from huggingface_hub import errors
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, http_backoff, tqdm
    except ImportError as e:
        raise DownloadError(f"downloading needs the huggingface_hub package, which is not installed; install it "
                            f"with: {INSTALL_HINT} (or download {config.download_url} by hand into "
                            f"{target.parent})") from e
    return types.SimpleNamespace(errors=errors, build_hf_headers=build_hf_headers, get_session=get_session,
                                 raise_for_status=hf_raise_for_status, http_backoff=http_backoff, tqdm=tqdm)


def _unwritable(directory: Path, e: OSError) -> OutputError:
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a directory" if blocker else (e.strerror or type(e).__name__)
    return OutputError(f"{directory}: cannot write the model file there ({why}); choose another directory with "
                       f"--models-dir DIR or ${model_loader.MODEL_DIR_ENV}")


def _make_work_dir(job: _Job) -> None:
    try:
        (job.target.parent / WORK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(job.target.parent, e) from e


def _headers(job: _Job) -> dict[str, str]:
    headers = dict(job.hf.build_hf_headers(library_name="rwkvtune", library_version=__version__))
    headers["Accept-Encoding"] = "identity"  # sizes count the file's bytes, not a compressed stream's
    return headers


def _head(job: _Job):
    """HEAD the resolve URL, following redirects that stay on its host (a renamed repository); a
    redirect elsewhere (the CDN) carries the metadata itself and is not followed, so the token
    stays with the hub. Not retried: a hub that does not answer is reported at once."""
    url = job.url
    for _ in range(_MAX_REDIRECTS):
        response = job.hf.http_backoff("HEAD", url, headers=_headers(job), timeout=_TIMEOUT_S, follow_redirects=False,
                                       max_retries=0, retry_on_exceptions=(), retry_on_status_codes=())
        job.hf.raise_for_status(response)
        location = response.headers.get("Location")
        if not (300 <= response.status_code < 400 and location):
            return response, url
        target = urljoin(url, location)
        if urlsplit(target)[:2] != urlsplit(url)[:2]:
            return response, target
        url = target
    raise DownloadError(f"{job.url}: more than {_MAX_REDIRECTS} redirects; check HF_ENDPOINT, or {job.by_hand}")


def _etag(value: str | None) -> str:
    return (value or "").strip().removeprefix("W/").strip('"').lower()


def _read_metadata(job: _Job) -> None:
    """The file's sha256 and size from the hub's LFS metadata, and where its bytes are."""
    try:
        response, location = _head(job)
    except RwkvtuneError:
        raise
    except Exception as e:
        _raise_translated(job, e)
    linked_sha = _etag(response.headers.get("X-Linked-Etag"))  # the LFS object id: its sha256
    hub_sha = linked_sha if model_loader._SHA256_RE.match(linked_sha) else ""
    raw_size = response.headers.get("X-Linked-Size")
    if raw_size is not None and not raw_size.strip().isdigit():
        raise DownloadError(f"{job.url}: the server's X-Linked-Size header is {raw_size!r}, not a byte count; check "
                            f"HF_ENDPOINT, or {job.by_hand}")
    pinned = job.config.sha256
    if pinned and hub_sha and pinned != hub_sha:
        raise DownloadError(f"{job.url}: the hub's file has sha256 {hub_sha}, but source.sha256 in {job.where} is "
                            f"{pinned}: the file changed since the config was written; pin source.hf_revision to "
                            f"the commit you want, or update source.sha256")
    if not (pinned or hub_sha):
        etag = response.headers.get("ETag")
        raise DownloadError(f"{job.url}: the server gave no LFS sha256 for the file (no X-Linked-Etag header; its "
                            f"ETag {etag!r} describes whatever it serves, not the published file), so a download "
                            f"could not be verified; set source.sha256 in {job.where} to the file's checksum, or "
                            f"{job.by_hand}")
    job.sha256, job.sha256_from = pinned or hub_sha, (f"source.sha256 in {job.where}" if pinned else "the hub's")
    job.size = int(raw_size) if raw_size is not None else None
    job.get_url = location
    commit = response.headers.get("X-Repo-Commit")
    if job.get_url == job.url and commit:
        # No redirect: fetch from the commit just resolved, so a push in between cannot mix two files.
        revision = job.url.split("/resolve/", 1)[1].split("/", 1)[0]
        job.get_url = job.url.replace(f"/resolve/{revision}/", f"/resolve/{commit}/", 1)
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
    except filelock.Timeout as e:
        raise DownloadError(f"{job.target}: another download of this file is running (lock {lock_path}); wait for "
                            f"it to finish") from e
    except OSError as e:
        raise _unwritable(job.target.parent, e) from e
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
    if job.size is not None and job.done() > job.size:
        job.partial.unlink()


def _kept(job: _Job) -> str:
    """What an interrupted download leaves for the next call."""
    done = job.done() if job.sha256 else 0
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


class _Retry(Exception):
    """A GET that failed in a way worth trying again (the message says how)."""


def _retryable(job: _Job, e: BaseException) -> bool:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return status in (408, 429) or 500 <= status < 600
    return isinstance(e, _Retry) or _is_transport_error(e)


def _transfer(job: _Job, progress: bool) -> None:
    """Append the missing bytes to the partial file, one GET per try, until it has ``job.size``
    bytes (or a GET of unknown length ends cleanly).

    Only a try that makes the file longer than it ever was resets the count of failures, so a
    server that drops the connection at the same byte every time, or ignores ``Range`` and sends
    the start again, ends after ``job.retries`` further tries instead of looping forever.
    """
    done = job.done()
    _check_space(job, done)
    if done:
        _say(progress, f"  resuming at {done:,}" + (f" of {job.size:,} bytes" if job.size is not None else " bytes"))
    headers = _headers(job)
    if not job.keep_auth:  # a signed CDN URL: the hub token must not travel there
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    furthest, stalled, tries = done, 0, 0
    bar = job.hf.tqdm(total=job.size, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=job.target.name, disable=not progress)
    try:
        while job.size is None or job.done() < job.size:
            tries += 1
            try:
                _get_once(job, headers, bar)
                if job.size is None:
                    return  # no size to reach: a GET that ended cleanly delivered the file
                continue  # _get_once returns only with job.size bytes (short is a _Retry)
            except RwkvtuneError:
                raise
            except Exception as e:
                if not _retryable(job, e):
                    _raise_translated(job, e)
                last = e
            if job.done() > furthest:
                furthest, stalled = job.done(), 0
            else:
                stalled += 1
            if stalled >= job.retries:
                raise DownloadError(
                    f"cannot download {job.url}: gave up after {tries} tries, the last {stalled} without a new byte "
                    f"({_describe(last)}); check {_network_hint()}, or {job.by_hand}{_kept(job)}") from last
            time.sleep(min(BACKOFF_MAX_S, job.backoff_s * 2 ** stalled))
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(f"download of {job.target.name} stopped{_kept(job)}") from e
    finally:
        bar.close()


def _content_range_start(value: str | None) -> int | None:
    """N of ``Content-Range: bytes N-M/T``, None when absent or malformed."""
    unit, _, rest = (value or "").partition(" ")
    first = rest.split("-", 1)[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _get_once(job: _Job, headers: dict[str, str], bar) -> None:
    """One GET from the partial file's end: ``Range`` when some bytes are there. A server that
    ignores it (200) or starts earlier sends bytes we have; they are read and dropped, the file
    stays as it is. Writes never go past ``job.size``."""
    done = job.done()
    request_headers = dict(headers, Range=f"bytes={done}-") if done else headers
    with job.hf.get_session().stream("GET", job.get_url, headers=request_headers, timeout=_TIMEOUT_S,
                                     follow_redirects=True) as response:
        job.hf.raise_for_status(response)
        start = _content_range_start(response.headers.get("Content-Range")) if response.status_code == 206 else 0
        if start is None or start > done:
            raise DownloadError(f"{job.url}: asked for bytes {done:,}- the server answered Content-Range "
                                f"{response.headers.get('Content-Range')!r}; check HF_ENDPOINT, or {job.by_hand}")
        length = response.headers.get("Content-Length")
        if (job.size is not None and length is not None and length.isdigit()
                and response.headers.get("Content-Encoding", "identity") == "identity"
                and start + int(length) != job.size):
            raise DownloadError(f"{job.url}: size mismatch: the server sends {start + int(length):,} bytes, the hub's "
                                f"LFS metadata (X-Linked-Size) says {job.size:,}; nothing was saved; check "
                                f"HF_ENDPOINT, or {job.by_hand}{_kept(job)}")
        skip = done - start
        with open(job.partial, "ab") as f:
            for chunk in response.iter_bytes(_GET_CHUNK):
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if not chunk:
                    continue
                if job.size is not None and f.tell() + len(chunk) > job.size:
                    raise DownloadError(f"{job.url}: size mismatch: the server sends more than the {job.size:,} bytes "
                                        f"of the hub's LFS metadata (X-Linked-Size); check HF_ENDPOINT, or "
                                        f"{job.by_hand}{_kept(job)}")
                f.write(chunk)
                bar.update(len(chunk))
    if job.size is not None and job.done() < job.size:
        raise _Retry(f"the server ended the response at byte {job.done():,} of {job.size:,}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# What a model file starts with: a .pth is a PyTorch zip archive (torch.save since 1.6); a
# .safetensors file an 8-byte little-endian header length, then its JSON header.
_ZIP_MAGIC = b"PK\x03\x04"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the reference reader's limit


def _format_problem(path: Path, name: str) -> str:
    """"" when the file starts like the model format its name says, else what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if name.lower().endswith(".safetensors"):
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if 2 <= n <= min(_SAFETENSORS_MAX_HEADER, size - 8) and head[8:9] == b"{":
            return ""
        return f"is not a safetensors file (it starts with {head!r})"
    if head.startswith(_ZIP_MAGIC):
        return ""
    return f"is not a PyTorch zip archive (it starts with {head!r}, not {_ZIP_MAGIC!r})"


def _verify(job: _Job, progress: bool) -> None:
    """Size, format and sha256 of the partial file; a bad one is deleted (it cannot be resumed)."""
    _say(progress, f"  verifying sha256 of {job.target.name}")
    done = job.done()
    if job.size is not None and done != job.size:
        problem = f"size mismatch: the downloaded file has {done:,} bytes, the hub's LFS metadata says {job.size:,}"
    elif wrong_format := _format_problem(job.partial, job.target.name):
        problem = f"the downloaded file {wrong_format}: the server sent something else (an error page?)"
    elif (got := _sha256(job.partial)) != job.sha256:
        problem = f"checksum mismatch: the downloaded file has sha256 {got}, {job.sha256_from} is {job.sha256}"
    else:
        return
    job.partial.unlink(missing_ok=True)
    raise DownloadError(f"{job.url}: {problem}; the download was deleted and {job.target} left as it was; run the "
                        f"command again, and if it fails the same way the server (HF_ENDPOINT) does not serve "
                        f"the published file")


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


def _describe(e: BaseException) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    return f"HTTP {status}" if status is not None else _one_line(str(e) or type(e).__name__)


def _network_hint() -> str:
    endpoint = os.environ.get(model_loader.HF_ENDPOINT_ENV)
    return f"HF_ENDPOINT={endpoint}" if endpoint else "your network connection"


def _raise_translated(job: _Job, e: Exception) -> None:
    error = _translate(job, e)
    if error is None:
        raise e  # not a failure this module knows how to explain: a bug, keep its traceback
    raise error from e


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
                             f"{job.fix('hf_repo')}")
    if isinstance(e, errs.RevisionNotFoundError):
        return DownloadError(f"{job.url}: revision {cfg.hf_revision!r} not found in {cfg.hf_repo}; check "
                             f"{job.fix('hf_revision')}")
    if isinstance(e, errs.EntryNotFoundError) or status == 404:
        return DownloadError(f"{job.url}: file {cfg.hf_filename} not found in {cfg.hf_repo} (HTTP 404); check "
                             f"{job.fix('hf_filename', 'hf_revision')}")
    if status in (401, 403):
        return DownloadError(f"{job.url}: access denied (HTTP {status}); set HF_TOKEN to a token that may read "
                             f"{cfg.hf_repo}, or {job.by_hand}")
    if status is not None:
        return DownloadError(f"{job.url}: the server answered HTTP {status}; try again later, or "
                             f"{job.by_hand}{_kept(job)}")
    if _is_transport_error(e):
        return DownloadError(f"cannot download {job.url} ({_describe(e)}); check {_network_hint()}, or "
                             f"{job.by_hand}{_kept(job)}")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return OutputError(f"{job.target.parent}: disk full while downloading {job.target.name}; free some space "
                           f"or choose another directory with --models-dir DIR or "
                           f"${model_loader.MODEL_DIR_ENV}{_kept(job)}")
    if isinstance(e, OSError) and e.errno is not None:
        return _unwritable(job.target.parent, e)
    return None
