"""Tokenize a jsonl file into a binidx pair (``rwkvtune data prepare IN.jsonl --out PREFIX``).

Each record (text, chat or prompt/response, see formats.py) is rendered to its tokens, which end
with 0, and stored as one binidx document; loss masks are not stored (binidx has no place for
them), so chat data trained from binidx gets loss on every token. Train chat data from the jsonl
itself when the prompt must carry no loss.

Records are read in chunks of lines by the parent and tokenized by a pool of ``workers``
processes (``imap`` keeps the input order); the output is written through BinIdxWriter, so the
target files appear only when everything succeeded.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import time

import numpy as np
import tqdm

from rwkvtune.data.binidx import BinIdxWriter
from rwkvtune.data.formats import (
    BadRecordError,
    ReadStats,
    check_on_error,
    encode_raw,
    finish_stats,
    iter_raw_records,
    normalize_fmt,
)
from rwkvtune.errors import DataError
from rwkvtune.tokenizer import get_tokenizer
from rwkvtune.utils import not_found

CHUNK_RECORDS = 256  # records per task: large enough to amortise pickling, small for a smooth bar
SMALL_FILE = 4 << 20  # bytes; below this, workers=None means 1 (process start-up ~1 s costs more)


# --- worker side --------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(tokenizer, fmt, vocab_size, on_error):
    _worker.update(tokenizer=tokenizer, fmt=fmt, vocab_size=vocab_size, on_error=on_error)


def _encode_chunk(chunk):
    """Returns (list of int32 token arrays, list of bad records, bytes of input consumed).

    Errors are returned, not raised, so the parent decides (raise vs. skip) in input order.
    """
    docs, errors, nbytes = [], [], 0
    w = _worker
    for rec in chunk:
        if rec[2] == "json":
            # For the progress bar, whose total is the file size: the line as read, "\n" included
            nbytes += len(rec[1].encode("utf-8"))
        try:
            docs.append(encode_raw(rec, w["tokenizer"], w["fmt"], w["vocab_size"]).tokens)
        except BadRecordError as e:
            errors.append(e)
            if w["on_error"] == "raise":
                break
    return docs, errors, nbytes


def _context():
    """fork where available: workers start in milliseconds and need no importable __main__
    (spawn fails for scripts fed on stdin and re-runs unguarded scripts). fork is safe here
    because workers only call the tokenizer's single-text ``encode``, which runs on the calling
    thread; the Rust batch call uses a thread pool that a forked child cannot use (it hangs)."""
    if "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


# --- parent side --------------------------------------------------------------------------------
def _chunks(path):
    it = iter_raw_records(path)
    while True:
        chunk = list(itertools.islice(it, CHUNK_RECORDS))
        if not chunk:
            return
        yield chunk


def _ordered_bounded(pool, chunks, in_flight: int):
    """Like ``pool.imap`` (results in input order) but with at most ``in_flight`` chunks
    submitted and not yet consumed: ``imap`` reads its whole input ahead, which for a large
    file means holding all of it in memory."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare_binidx(
    in_jsonl: str,
    out_prefix: str,
    tokenizer=None,
    workers: int | None = None,
    fmt: str = "auto",
    on_error: str = "raise",
    vocab_size: int | None = None,
    progress: bool = True,
) -> ReadStats:
    """Tokenize ``in_jsonl`` into ``out_prefix.bin`` / ``out_prefix.idx`` (uint16 tokens).

    ``workers=None`` uses up to 8 processes (1 for files under 4 MiB). Returns the ReadStats
    (samples = documents written, tokens, skipped records, seconds);
    with ``on_error="skip"`` bad records are counted there and logged in a one-line summary.
    """
    if tokenizer is None:
        tokenizer = get_tokenizer()
    fmt = normalize_fmt(fmt)
    check_on_error(on_error)
    in_jsonl = os.fspath(in_jsonl)
    if not os.path.isfile(in_jsonl):
        raise DataError(not_found(in_jsonl, "input file", "expected a .jsonl file"))
    size = os.path.getsize(in_jsonl)
    if workers is None:
        workers = 1 if size < SMALL_FILE else min(8, os.cpu_count() or 1)
    workers = max(1, int(workers))

    t0 = time.perf_counter()
    rstats = ReadStats(path=in_jsonl)
    init = (tokenizer, fmt, vocab_size, on_error)
    pool = None
    if workers > 1:
        pool = _context().Pool(workers, initializer=_init_worker, initargs=init)
        results = _ordered_bounded(pool, _chunks(in_jsonl), in_flight=4 * workers)
    else:
        _init_worker(*init)
        results = map(_encode_chunk, _chunks(in_jsonl))
    bar = tqdm.tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    writer = BinIdxWriter(out_prefix, dtype=np.uint16)
    try:
        with writer:
            for docs, errors, nbytes in results:
                if errors and on_error == "raise":
                    raise errors[0]
                for doc in docs:
                    writer.add_document(doc)
                rstats.records += len(docs) + len(errors)
                rstats.samples += len(docs)
                for e in errors:
                    rstats.note_skip(e.located)
                bar.update(nbytes)
            bar.update(size - bar.n)  # blank lines are not counted per chunk
            rstats.tokens = writer.num_tokens
            finish_stats(rstats)  # raises on an empty file: the writer then removes its temp files
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    rstats.seconds = time.perf_counter() - t0
    return rstats
