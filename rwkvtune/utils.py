"""Small shared helpers: atomic writes (a crash never leaves a half-written file behind)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` into a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    _atomic_write(path, lambda tmp: torch.save(obj, tmp))
