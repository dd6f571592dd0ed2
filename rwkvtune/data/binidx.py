"""Megatron ``MMapIndexedDataset`` ("binidx") files, as read and written by RWKV-LM.

Layout of ``PREFIX.idx`` (all little endian)::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version, always 1
    u8        dtype code of the tokens in .bin (see DTYPE_CODES; RWKV uses 8 = uint16)
    u64       n  = item count
    u64       d  = doc_idx entry count
    int32[n]  sizes:    tokens per item
    int64[n]  pointers: byte offset of each item in .bin
    int64[d]  doc_idx:  item index at which each document starts, plus a final n

``PREFIX.bin`` is the items' tokens back to back. RWKV-LM's writers (make_data.py,
json2binidx) store one item per document, each ending with token 0 (end of text), so
doc_idx = [0, 1, ..., n] and d = n + 1. RWKV-LM's trainer ignores item boundaries and reads the
.bin as one token stream; so does :class:`rwkvtune.data.dataset.BinIdxWindows`.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from rwkvtune.errors import DataError
from rwkvtune.utils import output_error, read_error

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n items, n doc_idx: 34 bytes

# Megatron's dtype table. Codes 6 and 7 are floating point (their meaning differs between
# Megatron versions) and can never hold token ids, so the reader rejects them.
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
_FLOAT_CODES = {6: "float64", 7: "float32/float64"}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def strip_suffix(path: str) -> str:
    """Accept "data/x", "data/x.bin" or "data/x.idx" for the prefix "data/x"."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class BinIdxDataset:
    """Memory-mapped reader. ``ds[i]`` is item i (a read-only numpy array in the file's dtype).

    Everything is validated on open (header, sizes vs. pointers vs. .bin size, doc_idx), so a
    truncated or mismatched pair fails here with a clear message rather than mid-training.
    Picklable (re-opens the files), so it can be used from DataLoader worker processes.
    """

    def __init__(self, prefix: str):
        self.prefix = strip_suffix(os.fspath(prefix))
        self._open()

    # --- opening and validation -----------------------------------------------------------------
    def _open(self) -> None:
        ip, bp = idx_path(self.prefix), bin_path(self.prefix)
        missing = [p for p in (ip, bp) if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"{self.prefix}: binidx data needs both {ip} and {bp}; missing "
                f"{' and '.join(missing)}; check the prefix or rerun `rwkvtune data prepare`"
            )
        try:
            self._open_pair(ip, bp)
        except OSError as e:  # permission denied on either file: one line naming it
            raise read_error(e.filename or ip, e, DataError) from e

    def _open_pair(self, ip: str, bp: str) -> None:
        idx_size = os.path.getsize(ip)
        with open(ip, "rb") as f:
            head = f.read(HEADER.size)
        if not MAGIC.startswith(head[: len(MAGIC)]):  # a short prefix of MAGIC is "truncated"
            raise DataError(
                f"{ip}: expected a Megatron MMapIndexedDataset index starting with {MAGIC!r}, "
                f"found {head[:9]!r}; pass the .idx written by make_data.py/json2binidx"
            )
        if len(head) < HEADER.size:
            raise DataError(
                f"{ip}: truncated index: expected a {HEADER.size}-byte header, found "
                f"{idx_size} bytes; regenerate the .idx/.bin pair"
            )
        self._read_index(ip, head, idx_size)
        self._check_items(ip, bp)

    def _read_index(self, ip: str, head: bytes, idx_size: int) -> None:
        """Header fields, then sizes/pointers/doc_idx as views of a memory map of the .idx."""
        _, version, code, n, d = HEADER.unpack(head)
        if version != VERSION:
            raise DataError(
                f"{ip}: expected index version {VERSION}, found {version}; "
                "only Megatron MMapIndexedDataset version 1 is supported"
            )
        if code in _FLOAT_CODES:
            raise DataError(
                f"{ip}: dtype code {code} means {_FLOAT_CODES[code]}, but token files must use an "
                "integer dtype (1-5 or 8); regenerate the data with integer tokens"
            )
        if code not in DTYPE_CODES:
            raise DataError(
                f"{ip}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)} "
                "(8 = uint16 for RWKV); the file is corrupt or not a token index"
            )
        self.dtype = DTYPE_CODES[code]
        need = HEADER.size + 4 * n + 8 * n + 8 * d
        if idx_size < need:
            raise DataError(
                f"{ip}: truncated index: header declares {n} items and {d} doc_idx entries "
                f"({need} bytes), file has {idx_size} bytes; regenerate the .idx/.bin pair"
            )
        # Extra trailing bytes are tolerated, as Megatron's reader does.
        idx = np.memmap(ip, dtype=np.uint8, mode="r", shape=(need,))
        off = HEADER.size
        self.sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=off)
        self.pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=off + 4 * n)
        self.doc_idx = np.frombuffer(idx, dtype="<i8", count=d, offset=off + 12 * n)
        self._idx_mmap = idx

    def _check_items(self, ip: str, bp: str) -> None:
        """Items back to back, the .bin exactly their size, doc_idx rising: then map the tokens."""
        n, d = len(self.sizes), len(self.doc_idx)
        item = self.dtype.itemsize
        if n and int(self.sizes.min()) < 0:
            bad = int(np.argmax(self.sizes < 0))
            raise DataError(
                f"{ip}: item {bad} has negative size {int(self.sizes[bad])}; the index is corrupt; "
                "regenerate the .idx/.bin pair"
            )
        # Items must be back to back (every known writer does this); the token-stream view
        # and the .bin size check below rely on it.
        starts = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(self.sizes[:-1].astype(np.int64) * item, out=starts[1:])
        if n and not np.array_equal(starts, self.pointers):
            bad = int(np.argmax(starts != self.pointers))
            raise DataError(
                f"{ip}: item {bad} has byte pointer {int(self.pointers[bad])}, expected "
                f"{int(starts[bad])} (items back to back); the index is corrupt; regenerate it"
            )
        self.num_tokens = int(self.sizes.astype(np.int64).sum()) if n else 0
        bin_size = os.path.getsize(bp)
        if bin_size != self.num_tokens * item:
            raise DataError(
                f"{bp}: expected {self.num_tokens * item} bytes ({self.num_tokens} tokens of "
                f"{self.dtype.name} per {ip}), found {bin_size} bytes; the .bin and .idx are "
                "from different runs or truncated; regenerate both together"
            )
        if d:
            di = self.doc_idx
            if di[0] != 0 or di[-1] > n or (d > 1 and np.any(np.diff(di) < 0)):
                raise DataError(
                    f"{ip}: doc_idx must rise from 0 to at most the item count {n}, found "
                    f"first {int(di[0])}, last {int(di[-1])}; the index is corrupt; regenerate it"
                )
        # np.memmap refuses empty files: an empty dataset gets an empty array instead.
        if self.num_tokens:
            self.tokens = np.memmap(bp, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        else:
            self.tokens = np.empty(0, dtype=self.dtype)
        # Token offset of each item in the stream (pointers are in bytes).
        self.offsets = self.pointers // item

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    # --- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    def _check_index(self, i: int) -> int:
        n = len(self.sizes)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range for {n} items in {self.prefix}")
        return i

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        o = int(self.offsets[i])
        return self.tokens[o : o + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of item i (to the item's end if length is None)."""
        i = self._check_index(i)
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"get({i}, offset={offset}, length={length}) is outside item {i} of size {size}"
            )
        o = int(self.offsets[i]) + offset
        return self.tokens[o : o + length]

    @property
    def num_docs(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def item_of_token(self, pos: int) -> int:
        """Index of the item that holds stream position ``pos``."""
        return int(np.searchsorted(self.offsets, pos, side="right")) - 1

    def check_vocab(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """Raise DataError naming the first item that holds a token id outside [0, vocab_size).

        Scans the whole stream in chunks of ``chunk`` tokens (32 MiB of uint16 each), unless the
        dtype cannot hold an out-of-range id at all (uint16 and vocab_size >= 65536: no scan).
        """
        info = np.iinfo(self.dtype)
        if info.min >= 0 and info.max < vocab_size:
            return
        for start in range(0, self.num_tokens, chunk):
            part = self.tokens[start : start + chunk]
            bad = (part < 0) | (part >= vocab_size)
            if bad.any():
                pos = start + int(np.argmax(bad))
                item = self.item_of_token(pos)
                raise DataError(
                    f"{bin_path(self.prefix)}: item {item} (token {pos - int(self.offsets[item])}) "
                    f"has token id {int(self.tokens[pos])}, expected ids in [0, {vocab_size}); "
                    "the data was tokenized with another vocab; re-tokenize or fix vocab_size"
                )


class BinIdxWriter:
    """Write a binidx pair that RWKV-LM's reader accepts: one item per document.

    The caller appends the end-of-text 0 to each document (this writer stores tokens as given).
    Tokens go to ``PREFIX.bin.tmp`` as they arrive; ``finalize()`` writes the index to a
    temporary file and then renames both into place, so readers never see a half-written pair.
    Use as a context manager to have the temporary files removed when an exception escapes.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = strip_suffix(os.fspath(prefix))
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(
                f"{self.prefix}: cannot write dtype {self.dtype.name}; expected one of "
                f"{', '.join(sorted(d.name for d in _CODE_OF))}"
            )
        self._info = np.iinfo(self.dtype)
        parent = os.path.dirname(self.prefix)
        self._tmp_bin = bin_path(self.prefix) + f".tmp{os.getpid()}"
        self._tmp_idx = idx_path(self.prefix) + f".tmp{os.getpid()}"
        try:
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._bin = open(self._tmp_bin, "wb")
        except OSError as e:
            raise output_error(bin_path(self.prefix), e) from e
        self._sizes: list[int] = []
        self.num_tokens = 0
        self._done = False

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(
                f"{self.prefix}: document {len(self._sizes)} must be a 1-D token list, "
                f"found shape {arr.shape}"
            )
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(
                f"{self.prefix}: document {len(self._sizes)} must hold integer token ids, "
                f"found {arr.dtype}"
            )
        if arr.size and (arr.min() < self._info.min or arr.max() > self._info.max):
            bad = int(np.argmax((arr < self._info.min) | (arr > self._info.max)))
            raise DataError(
                f"{self.prefix}: document {len(self._sizes)} token {bad} has id {int(arr[bad])}, "
                f"which does not fit {self.dtype.name} [{self._info.min}, {self._info.max}]; "
                "write with a wider dtype (e.g. dtype=np.int32)"
            )
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(
                f"{self.prefix}: document {len(self._sizes)} has {arr.size} tokens; "
                "binidx sizes are int32; split the document"
            )
        try:
            self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        except OSError as e:  # disk full: one line with what was written so far (the target is untouched)
            raise self._write_error(bin_path(self.prefix), e) from e
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def __len__(self) -> int:
        return len(self._sizes)

    def finalize(self) -> dict:
        """Write the index and move both files into place. Returns {"docs", "tokens"}."""
        if self._done:
            raise RuntimeError("BinIdxWriter.finalize() called twice")
        try:
            self._bin.close()  # flushes the last buffered tokens: may meet a full disk too
        except OSError as e:
            raise self._write_error(bin_path(self.prefix), e) from e
        n = len(self._sizes)
        sizes = np.asarray(self._sizes, dtype="<i4")
        pointers = np.zeros(n, dtype="<i8")
        if n:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(n + 1, dtype="<i8")  # one item per document
        try:
            with open(self._tmp_idx, "wb") as f:
                f.write(HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], n, n + 1))
                f.write(sizes.tobytes())
                f.write(pointers.tobytes())
                f.write(doc_idx.tobytes())
                f.flush()
                os.fsync(f.fileno())
            # .bin first: if we die between the two renames, the old .idx no longer matches the new
            # .bin size and the reader says so, instead of silently pairing mismatched files.
            os.replace(self._tmp_bin, bin_path(self.prefix))
            os.replace(self._tmp_idx, idx_path(self.prefix))
        except OSError as e:
            raise self._write_error(idx_path(self.prefix), e,
                                    needed=HEADER.size + 4 * n + 8 * n + 8 * (n + 1)) from e
        self._done = True
        return {"docs": n, "tokens": self.num_tokens}

    def _write_error(self, path: str, e: OSError, needed: int | None = None):
        written = os.path.getsize(self._tmp_bin) if os.path.exists(self._tmp_bin) else None
        return output_error(path, e, needed, written)

    def abort(self) -> None:
        """Drop everything written so far (the temporary files); the target files are untouched."""
        if self._done:
            return
        try:
            self._bin.close()
        except OSError:  # the buffered rest cannot be written (disk full): it is dropped anyway
            pass
        for p in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if not self._done:
                self.finalize()
        else:
            self.abort()
        return False
