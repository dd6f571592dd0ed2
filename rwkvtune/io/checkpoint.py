"""Reading and writing model state dicts: ``.pth`` (torch.save's zip), official-layout
``.safetensors`` and Hugging Face folders, every failure a one-line CheckpointError; and the
shapes of a checkpoint read without its tensor data (what :mod:`rwkvtune.configs.detect` turns
into a model's dimensions).

Tensor data is never read. :func:`read_shapes` parses only the pickle inside the
``torch.save`` zip archive (``*/data.pkl``: key names, shapes, dtypes) with a restricted
unpickler that knows the few torch rebuild functions, so it needs neither torch nor the
weights: inspecting a 13.3B bf16 file (26 GB) takes milliseconds and little memory. Files it
cannot parse that way (legacy pre-zip format, exotic tensor types) go through
``torch.load(mmap=True, weights_only=True)``, which maps the file instead of reading it.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

from rwkvtune.errors import CheckpointError
from rwkvtune.io.layout import DEFAULT_MODEL_DIR, MODEL_DIR_ENV, strip_prefix
from rwkvtune.utils import atomic_torch_save, human_bytes, not_found, read_error

_ZIP_MAGIC = b"PK\x03\x04"


def _first_line(e: BaseException, limit: int = 160) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch puts ANSI bold into some messages
    text = plain.splitlines()[0] if plain else type(e).__name__
    if ". " in text:  # the first sentence says it; torch's next ones are advice for its own API
        text = text[: text.index(". ") + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A state dict's pickle holds about 100 bytes per tensor (a 13.3B release's: ~100 KB), a resumable
# checkpoint's a little more (optimizer and sampler entries). A zip entry may be compressed: a few MB
# that declare gigabytes would all be inflated into memory before any other check. Refused first.
MAX_PICKLE_BYTES = 64 << 20


def check_pickle_size(path: str | os.PathLike, what: str = "") -> None:
    """Refuse a torch zip archive whose ``data.pkl`` declares more than MAX_PICKLE_BYTES when
    inflated, from the zip directory alone (nothing is inflated). Other files pass: their readers
    give the verdict. An unreadable file is a one-line CheckpointError (``what`` names its kind)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != _ZIP_MAGIC:
                return
        with zipfile.ZipFile(path) as zf:
            big = [i for i in zf.infolist() if i.filename.endswith("data.pkl") and i.file_size > MAX_PICKLE_BYTES]
    except OSError as e:
        raise read_error(path, e, CheckpointError, what) from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        return  # not a readable archive: torch.load says what is wrong with it
    if big:
        raise CheckpointError(f"{path}: its pickle {big[0].filename} declares {human_bytes(big[0].file_size)} when "
                              f"inflated ({human_bytes(big[0].compress_size)} stored), more than any model or "
                              f"checkpoint needs ({human_bytes(MAX_PICKLE_BYTES)} at most); the file was not written "
                              f"by torch.save of a model, or was crafted: it is not read")


def _torch_load(p: Path, mmap: bool) -> Any:
    """torch.load with every failure turned into a CheckpointError that says what to do."""
    import torch

    check_pickle_size(p)
    try:
        try:
            return torch.load(p, map_location="cpu", mmap=mmap, weights_only=True)
        except RuntimeError as e:
            # Legacy (pre-zip, torch < 1.6) files cannot be memory-mapped: read them whole.
            if mmap and "mmap can only be used" in str(e):
                with open(p, "rb") as f:
                    if f.read(4) != _ZIP_MAGIC:
                        return torch.load(p, map_location="cpu", weights_only=True)
            raise
    except OSError as e:  # unreadable (permission denied): not a corrupt file
        raise read_error(p, e) from e
    except Exception as e:  # RuntimeError (zip reader), pickle errors, EOF, weights_only refusals
        with open(p, "rb") as f:
            head = f.read(4)
        is_zip, is_pickle = head == _ZIP_MAGIC, head[:1] == b"\x80"  # zip archive / legacy pickle
        refused = ("weights only" in str(e).lower() or "weights_only" in str(e)) and "Unsupported operand" not in str(e)
        if refused and (is_zip or is_pickle):
            why = ("it holds Python objects besides tensors, which rwkvtune never unpickles (loading them could "
                   "run code); a model file is a plain state dict: from code you trust, save one with "
                   "torch.save(model.state_dict(), path)")
        elif is_zip:
            why = ("it is a torch zip archive but cannot be read, so it is probably truncated or corrupt "
                   "(an incomplete download or an interrupted save): download or save it again")
        else:
            why = "it is not a file written by torch.save, or it is truncated or corrupt"
        raise CheckpointError(f"{p}: cannot read as a torch checkpoint ({type(e).__name__}: {_first_line(e)}); "
                              f"{why}") from e


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(not_found(p, "checkpoint", f"check the path (a relative model_file in a config "
                                                         f"resolves against ${MODEL_DIR_ENV}, default "
                                                         f"{DEFAULT_MODEL_DIR})"))
    if p.is_dir():
        if (p / "config.json").is_file():
            return p  # a Hugging Face model folder: read_hf_config says whether it is RWKV-7
        raise CheckpointError(f"{p}: is a directory without config.json; expected a .pth or .safetensors file (an "
                              f"official-layout state dict) or a Hugging Face RWKV-7 folder (config.json + "
                              f"model.safetensors)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: file is empty (0 bytes); download or save it again")
    return p


def _check_state_dict(p: Path, obj: Any, is_tensor) -> dict[str, Any]:
    """``obj`` must be a flat {str: tensor} mapping; returns it as a dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: found a {type(obj).__name__}, expected a state dict (key -> tensor) "
                              f"saved with torch.save(model.state_dict(), path)")
    bad_key = next((k for k in obj if not isinstance(k, str)), None)
    if bad_key is not None:
        raise CheckpointError(f"{p}: key {bad_key!r} is of type {type(bad_key).__name__}, expected str keys "
                              f"(parameter names) in a state dict")
    kind = {"rwkvtune-lora-v1": "a LoRA adapter (use it with --adapter, or merge it: rwkvtune merge-lora BASE "
                                "ADAPTER OUT)",
            "rwkvtune-state-v1": "a state-tuning file (use it with --state)"}.get(obj.get("format"))
    if kind is None and {"step", "trainable", "optimizer"} <= set(obj):
        kind = "a resumable checkpoint of `rwkvtune train` (the run's model is its final.pth)"
    if kind:
        raise CheckpointError(f"{p}: this is {kind}, not a model checkpoint; pass the model's .pth")
    bad = next((k for k, v in obj.items() if not is_tensor(v)), None)
    if bad is not None:
        raise CheckpointError(f"{p}: key {bad!r} holds a {type(obj[bad]).__name__}, not a tensor; expected a "
                              f"plain state dict (is this a training-state file? save its model weights with "
                              f"torch.save(ckpt[{bad!r}], 'model.pth') if that entry is the state dict)")
    return dict(obj)


def load_state_dict(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, Any], str]:
    """Open a model as an official-layout state dict (memory-mapped by default), prefix stripped:
    a ``.pth`` (torch.save), an official-layout ``.safetensors`` or a Hugging Face RWKV-7 folder.

    Raises CheckpointError for a missing path, a directory that is no model folder, an empty,
    truncated or corrupt file, or a payload that is not a flat ``{str: Tensor}`` dict.
    """
    p = _check_path(path)
    import torch

    if p.is_dir():
        from rwkvtune.io.hf_layout import load_hf_state_dict

        return load_hf_state_dict(p), ""
    if p.suffix == ".safetensors":
        from rwkvtune.io.safetensors_io import load_safetensors

        _refuse_artifact(p)
        return strip_prefix(load_safetensors(p, mmap_file=mmap))
    obj = _torch_load(p, mmap)
    return strip_prefix(_check_state_dict(p, obj, lambda v: isinstance(v, torch.Tensor)))


def _refuse_artifact(p: Path) -> None:
    """A ``.safetensors`` adapter or state written by rwkvtune is not a model: say which it is."""
    from rwkvtune.io.safetensors_io import ARTIFACT_META, artifact_tree, read_header

    meta = read_header(p)[1].get(ARTIFACT_META)
    if meta is not None:
        try:
            fmt = artifact_tree(p, meta).get("format")
        except (CheckpointError, AttributeError):
            fmt = None
        _check_state_dict(p, {"format": fmt}, lambda v: True)  # raises naming the kind


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a flat {key: tensor} state dict atomically, in the format its suffix names:
    ``.safetensors`` (no pickle; memory-mapped when read) or else torch.save's zip format, which
    every RWKV tool reads. A crash leaves the previous file or none, never a torn one."""
    if str(path).endswith(".safetensors"):
        from rwkvtune.io.safetensors_io import save_safetensors

        save_safetensors(dict(state_dict), path, metadata={"format": "pt"})
        return
    atomic_torch_save(dict(state_dict), path)


# ---- shapes without torch ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor in a checkpoint, read without its data, and where its data is:
    the archive record ``data/KEY`` of its storage, an element offset into it, and its strides."""

    shape: tuple[int, ...]
    dtype: str
    key: str = ""
    offset: int = 0
    stride: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str


class _Unsupported(Exception):
    """The fast reader does not know this pickle content; use torch.load instead."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str  # e.g. "BFloat16Storage"

    @property
    def dtype(self) -> str:
        special = {"Float": "float32", "Double": "float64", "Half": "float16", "Long": "int64", "Int": "int32",
                   "Short": "int16", "Char": "int8", "Byte": "uint8", "ComplexFloat": "complex64",
                   "ComplexDouble": "complex128"}
        base = self.name[: -len("Storage")]
        return special.get(base, base.lower())


def _rebuild_tensor(storage, storage_offset, size, stride, *rest) -> TensorMeta:
    return TensorMeta(tuple(int(d) for d in size), storage.dtype, storage.key, int(storage_offset),
                      tuple(int(x) for x in stride))


def _rebuild_parameter(data, *rest):
    return data


class _ShapeUnpickler(pickle.Unpickler):
    """Unpickles a torch.save ``data.pkl`` into {key: TensorMeta}, touching no tensor data and
    allowing no globals but the handful a state dict uses (so it is safe on untrusted files)."""

    def __init__(self, data: bytes, records: set[str], prefix: str):
        super().__init__(io.BytesIO(data))
        self._records, self._prefix = records, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage") and name != "UntypedStorage":
            return _StorageType(name)
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _Unsupported(f"persistent id {pid!r:.60}")
        if f"{self._prefix}data/{pid[2]}" not in self._records:
            raise CheckpointError(f"tensor data record {pid[2]!r} is missing from the archive")
        return _StorageRef(str(pid[2]), pid[1].dtype)


def read_archive(p: Path) -> tuple[Any, str] | None:
    """(the unpickled payload with TensorMeta for tensors, the archive's record prefix) of a
    ``torch.save`` zip, or None where torch.load must decide (legacy format, unknown content)."""
    check_pickle_size(p)  # also: an unreadable file is one line here
    with open(p, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            return None  # legacy format or not a torch file: torch.load gives the verdict
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                return None
            data = zf.read(pkls[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read as a torch checkpoint ({type(e).__name__}: {_first_line(e)}); "
                              f"it is a torch zip archive but cannot be read, so it is probably truncated or "
                              f"corrupt (an incomplete download or an interrupted save): download or save it "
                              f"again") from e
    prefix = pkls[0][: -len("data.pkl")]
    try:
        return _ShapeUnpickler(data, set(names), prefix).load(), prefix
    except CheckpointError as e:
        raise CheckpointError(f"{p}: corrupt torch archive: {e}; download or save it again") from e
    except _Unsupported:
        return None
    except Exception:  # malformed pickle: let torch.load produce its verdict
        return None


def read_shapes(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str], str]:
    """({key: shape}, {key: dtype name}, stripped prefix) of a checkpoint, without reading tensor data.

    Needs no torch for files written by ``torch.save`` (zip format); falls back to a
    memory-mapped ``torch.load`` for anything else. ``.safetensors`` files and Hugging Face
    folders are read from their headers.
    """
    p = _check_path(path)
    if p.is_dir() or p.suffix == ".safetensors":  # headers only; these readers need torch
        from rwkvtune.io.hf_layout import tensor_specs

        if p.suffix == ".safetensors":
            _refuse_artifact(p)

        shapes, dtypes = tensor_specs(p)
        shapes, prefix = strip_prefix(shapes)
        return shapes, strip_prefix(dtypes)[0], prefix
    parsed = read_archive(p)
    obj = parsed[0] if parsed is not None else None
    if parsed is None:
        sd, prefix = load_state_dict(p, mmap=True)
        return ({k: tuple(v.shape) for k, v in sd.items()},
                {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()}, prefix)
    sd, prefix = strip_prefix(_check_state_dict(p, obj, lambda v: isinstance(v, TensorMeta)))
    return {k: v.shape for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()}, prefix
