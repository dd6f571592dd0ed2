"""Official-layout checkpoints read one tensor at a time: bounded memory, no code run.

A :class:`TensorSource` knows every key's shape and dtype up front (headers only) and reads
one tensor on request into fresh memory, so a conversion holds one tensor at a time.

Why not ``torch.load(mmap=True)``: mapped pages count in the process's resident memory once
touched, so streaming through a mapped 26 GB file shows 26 GB RSS at the end (measured: a
436 MB checkpoint left 507 MB of file pages resident). Reading each tensor's bytes with
``readinto`` keeps resident memory at the largest tensor.

``.pth`` files are ``torch.save`` zip archives: ``<dir>/data.pkl`` (the pickled dict, whose
tensors refer to storages by key) plus one uncompressed record ``<dir>/data/<key>`` per storage.
The pickle is read by the checkpoint reader's restricted unpickler (``read_archive`` in
``rwkvtune.io.checkpoint``), which builds references (storage key, offset, shape, stride), never objects; so an
untrusted file cannot run code. Anything else (legacy pre-zip files, unknown pickle content,
big-endian archives) goes through ``rwkvtune.io.checkpoint.load_state_dict``
(``torch.load(weights_only=True, mmap=True)``), which also words the errors for files that
are not state dicts.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from rwkvtune.io.checkpoint import TensorMeta, load_state_dict, read_archive
from rwkvtune.io.layout import strip_prefix
from rwkvtune.io.safetensors_io import SafetensorsReader, read_bytes_into
from rwkvtune.errors import CheckpointError

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


def _torch_dtype(name: str, path) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{path}: a tensor of storage type {name!r}, which rwkvtune does not read; save the "
                              f"model with floating-point weights")
    return dtype


def _parse_archive(path: Path) -> tuple[dict[str, TensorMeta], str, dict[str, tuple[int, int]]] | None:
    """(tensor metadata, record prefix, record offsets) of a ``torch.save`` zip, read with the
    checkpoint reader's restricted unpickler; None where torch.load must decide."""
    parsed = read_archive(path)
    if parsed is None:
        return None
    obj, prefix = parsed
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, TensorMeta) and v.key
                                               for k, v in obj.items()):
        return None  # not a flat state dict: load_state_dict says what it is instead
    try:
        with zipfile.ZipFile(path) as zf:
            if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
                return None
            records = _record_offsets(zf, path)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError):
        return None
    return dict(obj), prefix, records


class PthSource(TensorSource):
    """A ``torch.save`` zip archive, each tensor read from its record with ``readinto``."""

    def __init__(self, path: Path, refs: dict[str, TensorMeta], prefix: str, records: dict[str, tuple[int, int]]):
        self.path = str(path)
        refs, self.key_prefix = strip_prefix(refs)
        self._refs, self._records, self._rec_prefix = refs, records, prefix
        self.shapes = {k: r.shape for k, r in refs.items()}
        self.dtypes = {k: _torch_dtype(r.dtype, path) for k, r in refs.items()}
        self._f = open(path, "rb")

    def read(self, key: str) -> torch.Tensor:
        ref, dtype = self._refs[key], self.dtypes[key]
        isz = torch.empty((), dtype=dtype).element_size()
        if 0 in ref.shape:
            return torch.empty(ref.shape, dtype=dtype)
        record = f"{self._rec_prefix}data/{ref.key}"
        if record not in self._records:
            raise CheckpointError(f"{self.path}: tensor {key!r}: data record {record!r} is missing or compressed; "
                                  f"the archive is corrupt: download or save it again")
        start, size = self._records[record]
        # Elements this view reaches, from its first one: 1 + sum((size - 1) * stride).
        extent = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        if ref.offset < 0 or min(ref.stride, default=0) < 0 or (ref.offset + extent) * isz > size:
            raise CheckpointError(f"{self.path}: tensor {key!r} reaches past its data record ({size} bytes); the "
                                  f"archive is corrupt: download or save it again")
        raw = read_bytes_into(self._f, start + ref.offset * isz, extent * isz, self.path)
        flat = raw.view(dtype)
        t = torch.as_strided(flat, ref.shape, ref.stride)
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
