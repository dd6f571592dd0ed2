"""Small shared helpers: atomic writes (a crash never leaves a half-written file behind), and the
one-line errors of failed reads and writes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

from rwkvtune.errors import CheckpointError, ConfigError, OutputError

# The temporary name of an atomic write: ".NAME.PID.HEX.tmp" next to the target, renamed over it
# when complete. A process killed mid-write leaves one behind; the pid tells whether its writer is
# still alive (see rwkvtune.train.run_dir.RunDir.stale_temp_files).
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def temp_path(path: Path) -> Path:
    """A fresh temporary name for ``path`` in the same directory, matching TEMP_NAME."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"

# Errors that mean "the device has no room": said with the space the write needed (in the
# system's words, strerror, when it gives them; these otherwise).
_SPACE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                 errno.EFBIG: "File too large"}
# torch.save reports a failed write as a RuntimeError from its zip writer, never an OSError (and
# without the errno): these are the words of those messages.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "unexpected pos", "file write failed")


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` says that writing a file failed: an OSError, or torch's writer's RuntimeError."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(w in str(e) for w in _TORCH_WRITE_FAILURES))


def human_bytes(n: int | float) -> str:
    """1_234_567_890 -> '1.2 GB' (decimal units, as df -H shows them)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _free_bytes(path: Path) -> int | None:
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None


def _space_note(path: Path, needed: int | None, written: int | None) -> str:
    """"; it needs about 1.2 GB (300 MB free there)": what a full device must make room for."""
    free = _free_bytes(path.parent)
    amount = f"about {human_bytes(needed)}" if needed else f"more than the {human_bytes(written or 0)} written"
    return f"; it needs {amount}" + (f" ({human_bytes(free)} free there)" if free is not None else "")


def output_error(path: str | os.PathLike, e: BaseException, needed: int | None = None,
                 written: int | None = None) -> OutputError:
    """A one-line OutputError for a failed write of ``path`` (an OSError, or torch's writer's
    RuntimeError). A full device is said as such, with the space the write needs (``needed``
    bytes, else more than the ``written`` ones) and what is free, since that is what to fix."""
    path = Path(path)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    space = ""
    if blocker is not None:
        why = f"{blocker} is a file, not a directory"
    elif isinstance(e, IsADirectoryError):
        why = "it is a directory; give a file path"
    elif isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
        why, space = e.strerror or _SPACE_ERRNOS[e.errno], _space_note(path, needed, written)
    elif isinstance(e, RuntimeError):  # torch's writer: no errno; the free space tells the likely cause
        free = _free_bytes(path.parent)  # measured after the temp file is gone
        short = needed is not None and free is not None and free < needed
        why = "not enough space on the device" if short else (
            f"the write failed ({str(e).strip().splitlines()[0][:120]}): the disk may be full, or a quota or "
            f"file-size limit reached")
        space = _space_note(path, needed, written)
    else:
        why = e.strerror or type(e).__name__
    advice = "free some space or choose another location; files written before are intact" if space else \
        "choose another location"
    return OutputError(f"{path}: cannot write: {why}{space}; {advice}")


def read_error(path: str | os.PathLike, e: OSError, error: type | None = None, what: str = "") -> Exception:
    """A one-line error (``error``, CheckpointError by default) for an OSError met while reading
    ``path``, so that an unreadable input is never reported as a corrupt one or a failing output."""
    error = error or CheckpointError
    if isinstance(e, PermissionError):
        why = "permission denied; make it readable (chmod/chown) or run as its owner"
    elif e.errno == errno.ELOOP:
        why = "it is a symlink loop (the link leads back to itself); point the link at a real file"
    elif isinstance(e, IsADirectoryError):
        why = "it is a directory, expected a file"
    else:
        why = f"{e.strerror or type(e).__name__}; check the file"
    return error(f"{path}: cannot read{' ' + what if what else ''}: {why}")


def not_found(path: str | os.PathLike, what: str, advice: str) -> str:
    """The message for ``path`` that does not open: "PATH: WHAT not found; ADVICE", unless it is a
    symlink loop or a broken link, which look missing to os.path.exists but are fixed otherwise."""
    reason = "not found"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path}: {what} is a symlink loop (the link leads back to itself); point the link at a real file"
        if os.path.islink(path):
            reason = f"not found: it is a broken symlink to {os.readlink(path)}"
    return f"{path}: {what} {reason}; {advice}"


def human_count(n: int) -> str:
    """1_527_668_736 -> '1.53B', 2_650_000 -> '2.6M' (parameter counts for people)."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None], needed: int | None = None) -> None:
    """Write via ``write(tmp_path)`` into a temp file in the same directory, fsync, then rename.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    Write failures (a file where a directory is needed, no permission, disk full: OSError, or
    torch.save's RuntimeError) become one OutputError naming the file and, for a full disk, the
    ``needed`` bytes (else the temp file's size when it failed); the previous file is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        # Like mkstemp, but with mode 0666 so that the umask decides, as for any other file.
        tmp = str(temp_path(path))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise output_error(path, e, needed) from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else None
        if written is not None:
            os.unlink(tmp)
        if is_write_failure(e) and not isinstance(e, OutputError):
            raise output_error(path, e, needed, written) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    _atomic_write(path, lambda tmp: torch.save(obj, tmp), needed=tensor_bytes(obj))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in a nest of dicts, lists and tuples: about what torch.save
    writes (it writes whole storages, each once)."""
    import torch

    seen: dict[int, int] = {}

    def visit(node):
        if isinstance(node, torch.Tensor):
            node = node.to_local() if hasattr(node, "to_local") else node  # a DTensor: this process's shard
            if node.layout == torch.strided and not node.is_meta:
                storage = node.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            else:
                seen[id(node)] = node.numel() * node.element_size()
        elif isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(obj)
    return sum(seen.values())


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if it is cpu, cuda or cuda:N and usable here; else a one-line ConfigError."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} {device!r}: unknown device; expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"{flag} {device}: CUDA is not available here ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) here "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def plural(n: int, noun: str, nouns: str | None = None, grouped: bool = False) -> str:
    """A count with its noun in the right number: '1 window', '2 windows', '0 windows' (``nouns``
    for an irregular plural; ``grouped``: thousands separators, '51,339 tokens')."""
    return (f"{n:,}" if grouped else f"{n}") + " " + (noun if n == 1 else nouns or noun + "s")


def read_json_records(path: Path, fmt: str, key: str, what: str, fix: str) -> list | None:
    """The ``key`` list of a records file written by rwkvtune (a JSON object with ``"format": fmt``),
    or None when the file does not exist. Unreadable, invalid or differently shaped: one ConfigError
    naming ``path`` (``what``: e.g. "the release records"; ``fix``: what to do). The entries are the
    caller's to check."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror or type(e).__name__}); {fix}") from e
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}); {fix}") from e
    if not isinstance(raw, dict) or raw.get("format") != fmt or not isinstance(raw.get(key), list):
        raise ConfigError(f"{path}: expected a JSON object with \"format\": {fmt!r} and a \"{key}\" list; {fix}")
    return raw[key]


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk, before a rename makes them visible."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_freed_memory() -> str | None:
    """Tell glibc's malloc to keep freed memory for the next allocation instead of returning it to
    the operating system (allocations up to 1 GiB from the heap, no trimming). Process-wide and
    not undone. Returns None when applied, else why not.

    Why: glibc unmaps every freed block above its mmap threshold (32 MiB at most), so each
    training step maps its large temporaries (logits chunks, the head's and the embedding's
    gradients, the optimizer's) again and faults them in page by page. On a virtual machine a
    fault is expensive: a small model trained 1.5-1.8x faster with this (docs/cpu-profile.md),
    at a higher peak RSS (+35% there), because freed memory is not given back."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return "this C library has no mallopt (glibc's malloc only)"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        return "mallopt refused the settings (not glibc's malloc?)"
    return None
