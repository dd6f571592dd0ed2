"""binidx reader/writer against an independent writer that follows the documented layout."""

import os
import pickle
import struct

import numpy as np
import pytest

from rwkvtune.data.binidx import BinIdxDataset, BinIdxWriter
from rwkvtune.errors import DataError

DOCS = [[5, 6, 7, 0], [1, 0], [65535, 3, 2, 1, 0], [0]]


def ref_write(prefix, docs, code=8, dtype="<u2", version=1, magic=b"MMIDIDX\x00\x00"):
    """Minimal independent writer: one item per document, layout from the reference notes."""
    sizes = [len(d) for d in docs]
    item = np.dtype(dtype).itemsize
    pointers = [sum(sizes[:i]) * item for i in range(len(docs))]
    idx = magic + struct.pack("<Q", version) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1)
    idx += struct.pack(f"<{len(docs)}i", *sizes)
    idx += struct.pack(f"<{len(docs)}q", *pointers)
    idx += struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1))
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    return idx


@pytest.fixture
def prefix(tmp_path):
    return str(tmp_path / "data")


def test_writer_bytes_equal_reference_layout(prefix, tmp_path):
    with BinIdxWriter(prefix) as w:
        for d in DOCS:
            w.add_document(d)
    expect = ref_write(str(tmp_path / "ref"), DOCS)
    with open(prefix + ".idx", "rb") as f:
        got = f.read()
    assert got == expect
    assert got[:9] == b"MMIDIDX\x00\x00" and got[9:17] == struct.pack("<Q", 1) and got[17] == 8
    with open(prefix + ".bin", "rb") as f, open(str(tmp_path / "ref.bin"), "rb") as g:
        assert f.read() == g.read()
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx", "ref.bin", "ref.idx"]


def test_read_reference_file(prefix):
    ref_write(prefix, DOCS)
    ds = BinIdxDataset(prefix)
    assert len(ds) == 4 and ds.num_docs == 4 and ds.num_tokens == 12
    assert ds.dtype == np.uint16
    for i, d in enumerate(DOCS):
        assert ds[i].tolist() == d
    assert ds[-1].tolist() == [0]
    assert ds.get(2, 1, 2).tolist() == [3, 2]
    assert ds.get(2, 3).tolist() == [1, 0]
    assert ds.tokens.tolist() == sum(DOCS, [])
    assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert ds.item_of_token(0) == 0 and ds.item_of_token(5) == 1 and ds.item_of_token(11) == 3
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds.get(1, 1, 5)
    # ".bin" / ".idx" suffixes are accepted for the prefix
    assert len(BinIdxDataset(prefix + ".bin")) == 4


@pytest.mark.parametrize("code,dtype", [(1, "u1"), (2, "i1"), (3, "<i2"), (4, "<i4"), (5, "<i8"),
                                        (8, "<u2")])
def test_all_integer_dtypes(prefix, code, dtype):
    docs = [[1, 2, 3], [4, 0], [7]]
    ref_write(prefix, docs, code=code, dtype=dtype)
    ds = BinIdxDataset(prefix)
    assert ds.dtype == np.dtype(dtype) and [ds[i].tolist() for i in range(3)] == docs


def test_writer_round_trip_int32_and_pickle(prefix):
    docs = [np.arange(100_000, 100_010), np.array([0])]
    with BinIdxWriter(prefix, dtype=np.int32) as w:
        for d in docs:
            w.add_document(d)
    ds = BinIdxDataset(prefix)
    assert ds.dtype == np.int32 and ds[0].tolist() == docs[0].tolist()
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2[1].tolist() == [0] and ds2.num_tokens == 11


def test_empty_dataset(prefix):
    stats = BinIdxWriter(prefix).finalize()
    assert stats == {"docs": 0, "tokens": 0}
    ds = BinIdxDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.doc_idx.tolist() == [0]


def test_writer_rejects_ids_that_do_not_fit(prefix):
    w = BinIdxWriter(prefix)
    w.add_document([1, 0])
    with pytest.raises(DataError) as e:
        w.add_document([3, 65536, 0])
    msg = str(e.value)
    assert "document 1" in msg and "token 1" in msg and "65536" in msg and "uint16" in msg
    with pytest.raises(DataError):
        w.add_document([-1])
    with pytest.raises(DataError):
        w.add_document([[1, 2]])
    w.abort()
    assert not any(p.startswith("data") for p in os.listdir(os.path.dirname(prefix)))


def test_writer_exception_keeps_old_files(prefix):
    ref_write(prefix, DOCS)
    with pytest.raises(RuntimeError):
        with BinIdxWriter(prefix) as w:
            w.add_document([9, 9, 0])
            raise RuntimeError("boom")
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["data.bin", "data.idx"]
    assert BinIdxDataset(prefix)[0].tolist() == DOCS[0]  # untouched


def test_check_vocab_names_item(prefix):
    ref_write(prefix, [[1, 2, 0], [3, 900, 0]], code=4, dtype="<i4")
    ds = BinIdxDataset(prefix)
    ds.check_vocab(901)
    with pytest.raises(DataError) as e:
        ds.check_vocab(900)
    assert "item 1" in str(e.value) and "900" in str(e.value) and "data.bin" in str(e.value)


# --- validation errors --------------------------------------------------------------------------
def _err(prefix):
    with pytest.raises(DataError) as e:
        BinIdxDataset(prefix)
    return str(e.value)


def test_missing_files(prefix):
    msg = _err(prefix)
    assert "data.idx" in msg and "data.bin" in msg and "missing" in msg
    ref_write(prefix, DOCS)
    os.remove(prefix + ".bin")
    msg = _err(prefix)
    assert "missing" in msg and msg.count("data.bin") >= 2 and "\n" not in msg


def test_bad_magic(prefix):
    ref_write(prefix, DOCS, magic=b"NOTMAGIC!")
    msg = _err(prefix)
    assert "data.idx" in msg and "MMIDIDX" in msg and "NOTMAGIC" in msg


def test_bad_version(prefix):
    ref_write(prefix, DOCS, version=2)
    msg = _err(prefix)
    assert "version 1" in msg and "found 2" in msg


@pytest.mark.parametrize("code,word", [(6, "float"), (7, "float"), (9, "unknown dtype code 9")])
def test_bad_dtype_code(prefix, code, word):
    ref_write(prefix, DOCS, code=code)
    assert word in _err(prefix)


@pytest.mark.parametrize("keep", [0, 5, 20, 40, 60])
def test_truncated_index(prefix, keep):
    idx = ref_write(prefix, DOCS)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx[:keep])
    msg = _err(prefix)
    assert "truncated" in msg and "data.idx" in msg


def test_mismatched_pair(prefix, tmp_path):
    ref_write(prefix, DOCS)
    ref_write(str(tmp_path / "other"), [[1, 2, 3, 0]])
    os.replace(str(tmp_path / "other.bin"), prefix + ".bin")
    msg = _err(prefix)
    assert "data.bin" in msg and "expected 24 bytes" in msg and "found 8" in msg


def test_truncated_bin(prefix):
    ref_write(prefix, DOCS)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    assert "expected 24 bytes" in _err(prefix)


def test_non_contiguous_pointers(prefix):
    idx = bytearray(ref_write(prefix, DOCS))
    off = 34 + 4 * 4 + 8  # pointer of item 1
    idx[off : off + 8] = struct.pack("<q", 2)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    msg = _err(prefix)
    assert "item 1" in msg and "pointer" in msg


def test_bad_doc_idx(prefix):
    idx = bytearray(ref_write(prefix, DOCS))
    idx[-8:] = struct.pack("<q", 99)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    assert "doc_idx" in _err(prefix)
