"""Small shared helpers: atomic writes (a crash never leaves a half-written file behind)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable

from rwkvtune.errors import OutputError


def output_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """A one-line OutputError for an OSError met while writing ``path``."""
    blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        why = f"{blocker} is a file, not a directory"
    elif isinstance(e, IsADirectoryError):
        why = "it is a directory; give a file path"
    else:
        why = e.strerror or type(e).__name__
    return OutputError(f"{path}: cannot write: {why}; choose another location")


def human_count(n: int) -> str:
    """1_527_668_736 -> '1.53B', 2_650_000 -> '2.6M' (parameter counts for people)."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` into a temp file in the same directory, fsync, then rename.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    OS errors (a file where a directory is needed, no permission, disk full) become OutputError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        # Like mkstemp, but with mode 0666 so that the umask decides, as for any other file.
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise output_error(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise output_error(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if it is cpu, cuda or cuda:N and usable here; else a one-line ConfigError."""
    import torch

    from rwkvtune.errors import ConfigError

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
