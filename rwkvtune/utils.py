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


def save_artifact(obj: dict, path) -> None:
    """Write a small rwkvtune file (adapter, state) atomically: ``.safetensors`` (the tensors, and
    the other values as JSON in the header; no pickle) or a torch file."""
    if not str(path).endswith(".safetensors"):
        atomic_torch_save(obj, path)
        return
    import json

    import torch

    from rwkvtune.convert.safetensors_io import save_safetensors

    tensors: dict = {}

    def skeleton(node, where: tuple):
        if isinstance(node, dict):
            return {k: skeleton(v, where + (k,)) for k, v in node.items()}
        if isinstance(node, torch.Tensor):
            name = "/".join(where)
            tensors[name] = node.detach().cpu().contiguous()
            return {TENSOR_MARK: name}
        return node

    save_safetensors(tensors, path, metadata={ARTIFACT_META: json.dumps(skeleton(obj, ()))})


TENSOR_MARK, ARTIFACT_META = "__tensor__", "rwkvtune"


def load_artifact(path, what: str, made_by: str):
    """Read a small rwkvtune file (adapter, state) written by :func:`save_artifact`, never
    unpickling anything but tensors, with one-line errors. A ``.safetensors`` file without
    rwkvtune's header entry (another tool's) comes back as its flat {name: tensor} dict.

    ``what`` names the file kind ("adapter", "state file") and ``made_by`` where it comes from
    ("adapter.pth from --mode lora"), so the message says what was expected.
    """
    import torch

    from rwkvtune.errors import CheckpointError

    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected the {made_by}")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: {what} not found")
    if str(path).endswith(".safetensors"):
        return _load_safetensors_artifact(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read {what} ({type(e).__name__}); expected "
                              f"{made_by} (another kind of file, or corrupt)") from None


def _load_safetensors_artifact(path):
    import json

    from rwkvtune.convert.safetensors_io import load_safetensors, read_header
    from rwkvtune.errors import CheckpointError

    _, metadata = read_header(path)
    tensors = load_safetensors(path, mmap_file=False)
    if ARTIFACT_META not in metadata:
        return tensors
    try:
        tree = json.loads(metadata[ARTIFACT_META])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its header entry {ARTIFACT_META!r} is not JSON; the file is damaged") from None

    def fill(node):
        if isinstance(node, dict) and set(node) == {TENSOR_MARK}:
            if node[TENSOR_MARK] not in tensors:
                raise CheckpointError(f"{path}: tensor {node[TENSOR_MARK]!r} is named in the header but missing; the "
                                      f"file is damaged")
            return tensors[node[TENSOR_MARK]]
        return {k: fill(v) for k, v in node.items()} if isinstance(node, dict) else node

    return fill(tree)
