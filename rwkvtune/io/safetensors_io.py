"""safetensors files written and read here, without pickle and without the safetensors library.

The format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length n,
then n bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the raw little-endian tensor bytes, back to back. Offsets are relative to
the end of the header and must tile the data exactly (no gaps, no overlap): the reference
reader refuses anything else, and so do we.

Why our own writer: the header needs every shape up front, and the data can then be streamed
one tensor at a time, so writing a 13.3B model never holds more than one tensor in memory. The
safetensors library (used in the tests to check our files) wants the whole dict at once.

Readers:
* :func:`read_header` / :func:`safetensors_specs`: names, shapes, dtypes (no tensor data read);
* :func:`load_safetensors`: every tensor, memory-mapped copy-on-write (the file is never
  modified; writes to a tensor stay private to the process);
* :class:`SafetensorsReader`: one tensor at a time into fresh memory (``pread``, no mmap), so
  a streaming conversion's resident memory stays at one tensor instead of growing to the file
  size as mapped pages would.

Sharding follows Hugging Face: ``model.safetensors`` when everything fits one shard, else
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import mmap
import os
import re
import struct
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from rwkvtune.errors import CheckpointError
from rwkvtune.utils import _atomic_write, read_error as _read_error

# rwkvtune's small files in safetensors (adapters, states; rwkvtune.io.artifacts): the header
# entry that holds their non-tensor values as JSON, and how that JSON marks a tensor's place.
ARTIFACT_META, TENSOR_MARK = "rwkvtune", "__tensor__"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# The reference reader's limit: a larger header is a corrupt or hostile file, not a model.
MAX_HEADER_BYTES = 100_000_000
# A header is {name: {"shape": [...]}}: 3 levels deep. Deeper is not safetensors, and json would
# recurse once per level (a header of "[[[[..." 200k deep is a RecursionError), so it is refused
# before parsing. Loose enough that a slightly wrong entry still gets its own, precise message.
MAX_HEADER_DEPTH = 16
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Hugging Face's default shard size for save_pretrained ("5GB").
DEFAULT_SHARD_BYTES = 5 * 10**9
_CHUNK = 64 << 20  # bytes per write/read call: large copies in slices keep temporaries small


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor: what a header needs before any data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class _Entry:
    spec: TensorSpec
    begin: int  # absolute file offset of the first byte
    end: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("safetensors stores little-endian data; this big-endian machine is not supported")


# ---- writing ----------------------------------------------------------------------------------

def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        if s.dtype not in DTYPE_NAMES:
            raise ValueError(f"{s.name}: dtype {s.dtype} has no safetensors name")
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as Hugging Face writes it
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, t: torch.Tensor) -> None:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    for start in range(0, raw.numel(), _CHUNK):
        f.write(raw[start:start + _CHUNK].numpy().data)


def write_safetensors_to(f, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors stream to the open binary file ``f``: the header from ``specs``, then
    ``produce(name)`` for each spec in order (each must match its spec; it is dropped at once).

    Tensors are laid out largest element size first so every tensor stays aligned to its
    element size (a reader can then map them without copying).
    """
    _check_little_endian()
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or "__metadata__" in names:
        raise ValueError("tensor names must be unique and not '__metadata__'")
    ordered = sorted(specs, key=lambda s: -_itemsize(s.dtype))
    f.write(_header_bytes(ordered, metadata))
    for s in ordered:
        t = produce(s.name)
        if tuple(t.shape) != tuple(s.shape) or t.dtype != s.dtype:
            raise ValueError(f"{s.name}: produced {t.dtype} {list(t.shape)}, header says {s.dtype} {list(s.shape)}")
        _write_tensor(f, t)
        del t


def write_safetensors(path: str | os.PathLike, specs: Sequence[TensorSpec],
                      produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """:func:`write_safetensors_to` into ``path`` atomically (temp file, fsync, rename); a failed
    write (disk full) is one OutputError saying the space the file needs."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write_safetensors_to(f, specs, produce, metadata)

    _atomic_write(path, write, needed=sum(s.nbytes for s in specs))


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict (e.g. the official layout) to one ``.safetensors`` file, atomically."""
    write_safetensors(path, specs_of(tensors), tensors.__getitem__, metadata)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order: a shard is closed when the next tensor would pass the limit (a
    tensor larger than the limit gets a shard of its own, as Hugging Face does)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shards(folder: str | os.PathLike, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Mapping[str, str] | None = None,
                 fsync: bool = True) -> list[str]:
    """Write ``specs`` as Hugging Face shards (plus the index when more than one) into an
    existing ``folder``; returns the file names. Not atomic by itself: callers write into a
    temporary folder and rename it (see :func:`rwkvtune.convert.hf.export_hf`)."""
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    folder = Path(folder)
    for name, shard in zip(names, shards):
        with open(folder / name, "wb") as f:
            write_safetensors_to(f, shard, produce, metadata)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        names.append(INDEX_NAME)
    return names


# ---- reading ----------------------------------------------------------------------------------

def _bad(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed safetensors file: {what}; the file is truncated, corrupt or not "
                           f"safetensors: download or write it again")


_ESCAPE = re.compile(r"\\.", re.S)  # a backslash and the character it escapes (maybe a quote)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__


def json_depth(text: str) -> int:
    """How deep ``text`` nests JSON arrays/objects, found without recursion (json.loads recurses
    once per level): escapes dropped, then every other piece between quotes is outside strings,
    and its brackets are counted. Linear, C-speed steps: about 1 s for 100 MB of brackets."""
    outside = "".join(_ESCAPE.sub("", text).split('"')[::2])
    return max(itertools.accumulate(map(_STEP, _NOT_BRACKET.sub("", outside))), default=0)


# An adapter's or state's non-tensor values (ARTIFACT_META) nest a few levels (config dicts);
# far deeper is a damaged or hostile file, and json.loads would recurse once per level.
MAX_ARTIFACT_DEPTH = 64


def artifact_tree(path, text: str):
    """The parsed JSON of a file's ARTIFACT_META header entry; CheckpointError (one line) when it
    nests deeper than MAX_ARTIFACT_DEPTH or is not JSON."""
    if json_depth(text) > MAX_ARTIFACT_DEPTH:
        raise CheckpointError(f"{path}: its header entry {ARTIFACT_META!r} nests more than {MAX_ARTIFACT_DEPTH} "
                              f"levels deep; the file is damaged or not written by rwkvtune")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its header entry {ARTIFACT_META!r} is not JSON; the file is damaged") from e


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path, name: str, raw, data_start: int) -> _Entry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPES:
        raise _bad(path, f"entry {name!r} has dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(path, f"entry {name!r} has shape {shape!r}, expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"entry {name!r} has data_offsets {offsets!r}, expected [begin, end] with begin <= end")
    spec = TensorSpec(name, tuple(shape), DTYPES[dtype])
    if offsets[1] - offsets[0] != spec.nbytes:
        raise _bad(path, f"entry {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs "
                         f"{spec.nbytes}")
    return _Entry(spec, data_start + offsets[0], data_start + offsets[1])


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)  # plain json.loads would keep the last one silently
        out[k] = v
    return out


def read_error(path, e: OSError) -> CheckpointError:
    """A one-line CheckpointError for an OSError met while reading ``path`` (so that a failing
    source is never reported as a failing output)."""
    return _read_error(path, e, CheckpointError)


def _read_header_raw(path: Path) -> tuple[bytes, int, int]:
    """(header JSON bytes, data start offset, file size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} exceeds the file ({size} bytes) or the "
                                 f"{MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise read_error(path, e) from e
    return raw, 8 + n, size


def read_header(path: str | os.PathLike) -> tuple[dict[str, _Entry], dict[str, str]]:
    """({name: entry}, metadata) of a safetensors file, every rule of the format checked."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: safetensors file not found; check the path")
    raw, data_start, size = _read_header_raw(p)
    try:
        text = raw.decode("utf-8")
        if json_depth(text) > MAX_HEADER_DEPTH:
            raise _bad(p, f"header nests arrays/objects more than {MAX_HEADER_DEPTH} levels deep, expected 3 "
                          f"({{name: {{\"shape\": [...]}}}})")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(p, f"header is not UTF-8 JSON ({type(e).__name__})") from e
    except _Duplicate as e:
        raise _bad(p, f"header names tensor {e.args[0]!r} twice") from e
    if not isinstance(header, dict):
        raise _bad(p, f"header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(p, "__metadata__ must map strings to strings")
    entries = {name: _parse_entry(p, name, e, data_start) for name, e in header.items()}
    end = data_start
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != end:
            raise _bad(p, f"tensor {e.spec.name!r} starts at data offset {e.begin - data_start}, expected "
                          f"{end - data_start} (tensors must tile the data without gaps or overlap)")
        end = e.end
    if end != size:
        raise _bad(p, f"tensor data ends at byte {end} but the file has {size} bytes")
    return entries, metadata


def safetensors_specs(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """{name: TensorSpec} of a safetensors file, read from its header only."""
    return {k: e.spec for k, e in read_header(path)[0].items()}


def _from_bytes(buf, e: _Entry, offset: int) -> torch.Tensor:
    if e.spec.nbytes == 0:
        return torch.empty(e.spec.shape, dtype=e.spec.dtype)
    t = torch.frombuffer(buf, dtype=torch.uint8, count=e.spec.nbytes, offset=offset)
    if offset % _itemsize(e.spec.dtype):
        t = t.clone()  # misaligned in the file (another writer): copy rather than compute on it
    return t.view(e.spec.dtype).reshape(e.spec.shape)


def load_safetensors(path: str | os.PathLike, mmap_file: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file: memory-mapped copy-on-write by default (only the
    pages a caller touches are read), or read into memory with ``mmap_file=False``."""
    entries, _ = read_header(path)
    if not mmap_file:
        with SafetensorsReader(path) as r:
            return {k: r.read(k) for k in entries}
    _check_little_endian()
    with open(path, "rb") as f:
        # ACCESS_COPY: writable private pages, so torch never sees a read-only buffer and a write
        # to a tensor can never reach the file.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return {k: _from_bytes(mm, e, e.begin) for k, e in entries.items()}


class SafetensorsReader:
    """One tensor at a time into fresh memory (no mmap): resident memory stays at one tensor."""

    def __init__(self, path: str | os.PathLike):
        _check_little_endian()
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._f = open(self.path, "rb")

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {k: e.spec for k, e in self.entries.items()}

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return read_bytes_into(self._f, e.begin, e.spec.nbytes, self.path).view(e.spec.dtype).reshape(e.spec.shape)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_bytes_into(f, offset: int, nbytes: int, path) -> torch.Tensor:
    """``nbytes`` bytes of open file ``f`` from ``offset`` into a new uint8 tensor."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy()) if nbytes else memoryview(b"")
    done = 0
    try:
        f.seek(offset)
        while done < nbytes:
            got = f.readinto(view[done:done + _CHUNK])
            if not got:
                break
            done += got
    except OSError as e:
        raise read_error(path, e) from e
    if done < nbytes:
        raise CheckpointError(f"{path}: file ends inside tensor data (offset {offset + done}); the file is "
                              f"truncated: download or write it again")
    return out


# ---- sharded folders --------------------------------------------------------------------------

def _plain_file(folder: Path, name, index: Path) -> Path:
    """A weight_map file name must be a plain file in the folder (never a path out of it)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"{index}: weight_map names file {name!r}, expected a plain file name in the same "
                              f"folder; the index is corrupt: download or write it again")
    return folder / name


def read_index(folder: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: shard path} from ``model.safetensors.index.json`` in ``folder``."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read the shard index ({type(e).__name__}); expected JSON with a "
                              f"weight_map: download or write it again") from e
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{index}: expected a JSON object with a non-empty 'weight_map' {{tensor: file}}; "
                              f"the index is corrupt: download or write it again")
    return {str(k): _plain_file(folder, v, index) for k, v in wmap.items()}


def folder_entries(folder: str | os.PathLike) -> dict[str, tuple[Path, TensorSpec]]:
    """{tensor name: (file, spec)} of a Hugging Face weights folder (one file or index + shards),
    from headers only. Every tensor the index names must be in its shard."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        wmap = read_index(folder)
        specs = {f: safetensors_specs(f) for f in sorted(set(wmap.values()))}
        out = {}
        for name, f in wmap.items():
            if name not in specs[f]:
                raise CheckpointError(f"{folder / INDEX_NAME}: lists {name!r} in {f.name}, which has no such tensor; "
                                      f"the folder is incomplete or mixed: download or write it again")
            out[name] = (f, specs[f][name])
        return out
    single = folder / SINGLE_NAME
    if not single.is_file():
        raise CheckpointError(f"{folder}: no {SINGLE_NAME} and no {INDEX_NAME}; expected Hugging Face safetensors "
                              f"weights in this folder")
    return {k: (single, s) for k, s in safetensors_specs(single).items()}


def load_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face weights folder, memory-mapped, each from the shard the
    index names."""
    per_file: dict[Path, list[str]] = {}
    for name, (f, _) in folder_entries(folder).items():
        per_file.setdefault(f, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for f, names in per_file.items():
        tensors = load_safetensors(f)
        out.update({n: tensors[n] for n in names})
    return out
