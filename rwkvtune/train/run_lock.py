"""One run at a time per run directory: an OS lock held for the whole run.

Two runs with the same ``--out`` (or a resume of a directory that is still training) would write
each other's checkpoints and logs. A run takes ``fcntl.flock`` on the run's lock file
(:attr:`rwkvtune.train.run_dir.RunDir.lock`) before it writes anything there. The kernel drops the
lock when the process ends, however it ends (``kill -9`` included), so a lock is never stale and
nothing needs cleaning by hand. The file names its holder (pid, host, command, start time) for the
one-line error a second run gets. Under torchrun only the main process takes it.

On release the file is removed while still locked; a run that opened it just before then holds a
lock on a removed file, so after locking each run checks that its file is still the one at the
path (else it opens the path again).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from rwkvtune import log
from rwkvtune.errors import ConfigError, OutputError
from rwkvtune.train.run_dir import RunDir
from rwkvtune.utils import output_error

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock; one run per directory is then up to the user
    fcntl = None


class RunDirLocked(ConfigError):
    """Another process is training in the run directory."""


def _command() -> str:
    argv = list(sys.argv)
    if argv and (argv[0].endswith(os.path.join("rwkvtune", "__main__.py")) or os.path.basename(argv[0]) == "rwkvtune"):
        argv[0] = "rwkvtune"  # `python -m rwkvtune` shows its script path
    return shlex.join(argv)


def _holder_text(fd: int) -> str:
    """Who holds the lock, from the lock file, for the error message."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
        return f"pid {int(info['pid'])} on host {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # it is just starting and has not written it yet
        return "a process that is just starting"


def _lock_path_fd(path: Path) -> int | None:
    """An fd of ``path`` holding an exclusive flock, or None where the filesystem has no locks;
    RunDirLocked (with the holder's text as its message) when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = _holder_text(fd)
            os.close(fd)
            raise RunDirLocked(holder) from e
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was released and removed while we opened it: lock the new one


def _created_dirs(path: Path) -> list[Path]:
    """The directories that ``mkdir(parents=True)`` of ``path`` creates, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def hold(run: RunDir, flag: str = "--out") -> Iterator[None]:
    """Hold the run directory's lock while the block runs (``flag`` names the option that chose
    the directory, for the error), after marking the directory as a run's (RunDir.mark) unless it
    is. Directories created only for the lock, and a marker written only for it, are removed again
    when the block leaves nothing else there (a run that failed at setup leaves nothing behind)."""
    if fcntl is None:
        yield
        return
    created = _created_dirs(run.path)
    marked = False
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.is_marked():  # the marker first: a directory a run writes in is always recognisably one
            if run.ownership() == "foreign":  # filled since the caller's check: never mark someone's files
                raise ConfigError(run.foreign_problem(flag))
            run.mark()
            marked = True
        fd = _lock_path_fd(run.lock)
    except RunDirLocked as e:
        raise RunDirLocked(f"{flag} {run.path}: another run is using this directory ({e}); wait for it to "
                           f"finish or stop it, or choose another --out") from e
    except OutputError:  # the marker's write, already naming its file
        raise
    except OSError as e:
        raise output_error(run.lock, e) from e
    if fd is None:
        log.warn(f"{run.lock}: this filesystem does not support file locks, so a second run in "
                 f"{run.path} would not be refused; start one run per directory")
    else:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(run.lock)  # while still locked (see the module docstring)
            os.close(fd)
        if marked and run.entries() == [run.marker.name]:  # a run that failed at setup leaves nothing
            with contextlib.suppress(OSError):
                run.marker.unlink()
        for d in created:
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
