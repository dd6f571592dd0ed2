"""Official-layout checkpoints read one tensor at a time: bounded memory, no code run.

A :class:`TensorSource` knows every key's shape and dtype up front (headers only) and reads
one tensor on request into fresh memory, so a conversion holds one tensor at a time.

Why not ``torch.load(mmap=True)``: mapped pages count in the process's resident memory once
touched, so streaming through a mapped 26 GB file shows 26 GB RSS at the end (measured: a
436 MB checkpoint left 507 MB of file pages resident). Reading each tensor's bytes with
``readinto`` keeps resident memory at the largest tensor.

``.pth`` files are ``torch.save`` zip archives: ``<dir>/data.pkl`` (the pickled dict, whose
tensors refer to storages by key) plus one uncompressed record ``<dir>/data/<key>`` per storage.
The pickle is read by a restricted unpickler that knows only the handful of globals a state
dict uses and builds references (storage key, offset, size, stride), never objects; so an
untrusted file cannot run code. Anything else (legacy pre-zip files, unknown pickle content,
big-endian archives) goes through ``rwkvtune.configs.checkpoint.load_state_dict``
(``torch.load(weights_only=True, mmap=True)``), which also words the errors for files that
are not state dicts.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from rwkvtune.configs.checkpoint import check_pickle_size, load_state_dict, strip_prefix
from rwkvtune.convert.safetensors_io import SafetensorsReader, read_bytes_into, read_error
from rwkvtune.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class TensorSource:
    """Keys, shapes and dtypes up front; ``read(key)`` gives one tensor (fresh memory)."""

    path: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    key_prefix: str = ""  # wrapper prefix stripped from every key (``_forward_module.``)

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MappingSource(TensorSource):
    """A state dict already at hand (loaded, or memory-mapped by torch.load)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<state dict>", key_prefix: str = ""):
        self.path, self._t, self.key_prefix = path, dict(tensors), key_prefix
        self.shapes = {k: tuple(v.shape) for k, v in self._t.items()}
        self.dtypes = {k: v.dtype for k, v in self._t.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._t[key]


class SafetensorsSource(TensorSource):
    """An official-layout ``.safetensors`` file (a wrapper prefix on every key is stripped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._r = SafetensorsReader(path)
        names, self.key_prefix = strip_prefix(dict.fromkeys(self._r.entries))
        specs = self._r.specs
        self.shapes = {k: specs[self.key_prefix + k].shape for k in names}
        self.dtypes = {k: specs[self.key_prefix + k].dtype for k in names}

    def read(self, key: str) -> torch.Tensor:
        return self._r.read(self.key_prefix + key)

    def close(self) -> None:
        self._r.close()


# ---- torch.save zip archives --------------------------------------------------------------------

class _Unsupported(Exception):
    """Pickle content this reader does not know: torch.load decides."""


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *rest) -> _TensorRef:
    return _TensorRef(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *rest):
    return data


class _RefUnpickler(pickle.Unpickler):
    """data.pkl -> {key: _TensorRef}; only the globals a plain state dict uses are known."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise _Unsupported("persistent id")
        return _StorageRef(pid[2], pid[1].dtype)


def _record_offsets(zf: zipfile.ZipFile, path: Path) -> dict[str, tuple[int, int]]:
    """{record name: (absolute data offset, size)} for every uncompressed record."""
    out = {}
    with open(path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: corrupt torch archive (bad local header for {info.filename}); "
                                      f"download or save it again")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _parse_archive(path: Path) -> tuple[dict[str, _TensorRef], str, dict[str, tuple[int, int]]] | None:
    """(refs, record prefix, record offsets), or None where torch.load must decide."""
    check_pickle_size(path)  # before zf.read() inflates it
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
    except OSError as e:
        raise read_error(path, e) from None
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                return None
            prefix = pkls[0][: -len("data.pkl")]
            if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
                return None
            obj = _RefUnpickler(io.BytesIO(zf.read(pkls[0]))).load()
            records = _record_offsets(zf, path)
    except (_Unsupported, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, _TensorRef)
                                               for k, v in obj.items()):
        return None  # not a flat state dict: load_state_dict says what it is instead
    return dict(obj), prefix, records


class PthSource(TensorSource):
    """A ``torch.save`` zip archive, each tensor read from its record with ``readinto``."""

    def __init__(self, path: Path, refs: dict[str, _TensorRef], prefix: str, records: dict[str, tuple[int, int]]):
        self.path = str(path)
        refs, self.key_prefix = strip_prefix(refs)
        self._refs, self._records, self._rec_prefix = refs, records, prefix
        self.shapes = {k: r.size for k, r in refs.items()}
        self.dtypes = {k: r.storage.dtype for k, r in refs.items()}
        self._f = open(path, "rb")

    def read(self, key: str) -> torch.Tensor:
        ref = self._refs[key]
        dtype, isz = ref.storage.dtype, torch.empty((), dtype=ref.storage.dtype).element_size()
        if 0 in ref.size:
            return torch.empty(ref.size, dtype=dtype)
        record = f"{self._rec_prefix}data/{ref.storage.key}"
        if record not in self._records:
            raise CheckpointError(f"{self.path}: tensor {key!r}: data record {record!r} is missing or compressed; "
                                  f"the archive is corrupt: download or save it again")
        start, size = self._records[record]
        # Elements this view reaches, from its first one: 1 + sum((size - 1) * stride).
        extent = 1 + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if ref.offset < 0 or min(ref.stride, default=0) < 0 or (ref.offset + extent) * isz > size:
            raise CheckpointError(f"{self.path}: tensor {key!r} reaches past its data record ({size} bytes); the "
                                  f"archive is corrupt: download or save it again")
        raw = read_bytes_into(self._f, start + ref.offset * isz, extent * isz, self.path)
        flat = raw.view(dtype)
        t = torch.as_strided(flat, ref.size, ref.stride)
        return t if t.is_contiguous() and t.numel() == flat.numel() else t.contiguous()

    def close(self) -> None:
        self._f.close()


def open_official(path: str | os.PathLike) -> TensorSource:
    """A TensorSource for an official-layout ``.pth`` or ``.safetensors`` file."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return SafetensorsSource(p)
    if p.is_file() and p.stat().st_size > 0:
        parsed = _parse_archive(p)
        if parsed is not None:
            return PthSource(p, *parsed)
    sd, prefix = load_state_dict(p, mmap=True)  # words every error: missing, directory, not a state dict
    return MappingSource(sd, str(p), prefix)
