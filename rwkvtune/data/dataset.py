"""Training windows of ctx_len tokens, and a deterministic, resumable, DDP-aware sampler.

A window is ``ctx_len + 1`` consecutive tokens w; the model input is ``w[:-1]`` and the targets
are ``w[1:]``. Each item is a dict of torch tensors::

    input_ids    LongTensor[T]  (padded with 0 past the end of a partial window; T = ctx_len, or
                                the longest window when the data holds no window that long)
    labels       LongTensor[T]  labels[t] = w[t+1] if that token is a target, else -100
    doc_id       int            document that the window's first input token belongs to
    piece_index  int            0 for a window that starts a document, k for its k-th piece
    starts_doc   bool           False: this window continues window i-1 exactly, so carrying
                                the final RNN state of window i-1 into window i equals
                                processing the whole document at once
    num_targets  int            labels that are not -100
    doc_start    BoolTensor[T]  (packing only) True where a document's first input token lies:
                                the model restarts there from the initial state

Document boundaries (:class:`PackedDataset`, from jsonl): every document ends with token 0
(end of text) and a fresh window starts with an inserted 0, so every document is preceded by a 0
that acts as beginning-of-text. The first token of a document is predicted from that 0 when the
document's mask says it is a target (plain text: yes; chat: no, its first token is "User" or
"System"). This is what RWKV-LM does over binidx data, where each document's first token is
predicted from the previous document's trailing 0. No target is ever taken from padding.

Packing (``packing=True``, the default): short documents share a window, and ``doc_start``
marks where each begins, so the model resets its state there and every document is trained
exactly as if it ran alone from a fresh window. A document packed after another starts at that
document's trailing 0, which is its beginning-of-text token (a document that does not end with 0
gets an inserted one). ``packing=False``: every document starts a fresh window and the rest of
the window is padding.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from rwkvtune.constants import IGNORE_INDEX
from rwkvtune.data.binidx import BinIdxDataset, bin_path, idx_path, strip_suffix
from rwkvtune.data.formats import Sample, read_samples
from rwkvtune.errors import ConfigError, DataError
from rwkvtune.tokenizer import get_tokenizer



def _check_ctx_len(ctx_len) -> int:
    if not isinstance(ctx_len, (int, np.integer)) or isinstance(ctx_len, bool) or ctx_len < 1:
        raise ConfigError(f"ctx_len must be a positive integer, found {ctx_len!r}")
    return int(ctx_len)


def _make_item(w: np.ndarray, targets: np.ndarray | None, T: int, meta: dict) -> dict:
    """w: up to T+1 tokens; targets: bool per w[1:] (None = all)."""
    import torch

    n = len(w) - 1
    inp = np.zeros(T, dtype=np.int64)
    lab = np.full(T, IGNORE_INDEX, dtype=np.int64)
    inp[:n] = w[:n]
    lab[:n] = w[1:] if targets is None else np.where(targets, w[1:], IGNORE_INDEX)
    item = {"input_ids": torch.from_numpy(inp), "labels": torch.from_numpy(lab)}
    item.update(meta)
    item["num_targets"] = int(n if targets is None else targets.sum())
    return item


class PackedDataset:
    """Pack documents into windows of ``ctx_len`` targets, in order.

    - With ``packing``, documents that fit are packed back to back into the current window and
      are never cut: a document that does not fit the space left starts a new window and the rest
      of the current window is padding (labels -100). This keeps every short chat sample whole in
      one window, at the cost of some padding (see ``efficiency``). Without ``packing`` every
      document starts a new window.
    - A document longer than ctx_len is cut into consecutive windows (pieces 0, 1, ...), one
      after another in index order; following documents may fill the space after its last
      piece. Window i with ``starts_doc == False`` continues window i-1 token for token.

    For zero-padding pretraining on long text, prepare a binidx file and use BinIdxWindows.
    """

    def __init__(self, samples: Sequence[Sample], ctx_len: int, packing: bool = True):
        T = self.ctx_len = _check_ctx_len(ctx_len)
        self.packing = bool(packing)
        tok_parts: list[np.ndarray] = []
        tgt_parts: list[np.ndarray] = []
        starts: list[int] = []  # layout positions of each document's first input token
        pos = 0  # length of the layout so far
        windows: list[tuple[int, int, int, int]] = []  # (start, targets, doc_id, piece_index)
        cur = None  # open window: [start, targets used, doc_id, piece_index]
        bos_t, bos_m = np.zeros(1, np.int32), np.zeros(1, bool)
        for d, s in enumerate(samples):
            n = len(s.tokens)
            if n == 0:
                continue
            if len(s.mask) != n:
                raise DataError(f"sample {d}: {n} tokens but {len(s.mask)} mask entries")
            t = np.asarray(s.tokens, dtype=np.int32)
            m = np.asarray(s.mask, dtype=bool)
            # The previous document's trailing 0 is this one's beginning of text; else insert one.
            bos = int(tok_parts[-1][-1] != 0) if tok_parts else 1
            if self.packing and cur is not None and cur[1] + bos + n <= T:
                if bos:
                    tok_parts.append(bos_t)
                    tgt_parts.append(bos_m)
                starts.append(pos - 1 + bos)
                tok_parts.append(t)
                tgt_parts.append(m)
                pos += bos + n
                cur[1] += bos + n
                continue
            if cur is not None:
                windows.append(tuple(cur))
            # A fresh window: the inserted 0 is input only (mask False), then the document.
            s0 = pos
            starts.append(s0)
            tok_parts += [bos_t, t]
            tgt_parts += [bos_m, m]
            pos += 1 + n
            done, k = 0, 0
            while n - done > T:
                windows.append((s0 + done, T, d, k))
                done += T
                k += 1
            cur = [s0 + done, n - done, d, k]
        if cur is not None:
            windows.append(tuple(cur))
        if not windows:
            raise DataError("no samples to pack: the dataset is empty")
        self._tok = np.concatenate(tok_parts)
        self._tgt = np.concatenate(tgt_parts)
        self._start = np.zeros(len(self._tok), dtype=bool)
        self._start[starts] = True
        table = np.asarray(windows, dtype=np.int64)
        self.starts, self.counts, self.doc_ids, self.piece_index = table.T.copy()
        self.num_docs = len(samples)
        self.num_targets = int(sum(int(m.sum()) for m in tgt_parts))
        # Items are as long as the longest window, not ctx_len: a ctx_len far beyond the data would
        # otherwise allocate two int64 arrays of ctx_len per item (1e9 -> 16 GB) to hold padding.
        self.item_len = min(T, int(self.counts.max()))

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def efficiency(self) -> float:
        """Fraction of the T target slots of all windows that carry loss (1.0 = no waste)."""
        return self.num_targets / (len(self) * self.ctx_len)

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw window i: tokens (targets + 1 of them) and the target flags of tokens[1:]."""
        s, n = int(self.starts[i]), int(self.counts[i])
        return self._tok[s : s + n + 1], self._tgt[s + 1 : s + n + 1]

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i = int(i) % len(self)
        w, targets = self.window(i)
        k = int(self.piece_index[i])
        meta = {"doc_id": int(self.doc_ids[i]), "piece_index": k, "starts_doc": k == 0}
        item = _make_item(w, targets, self.item_len, meta)
        if self.packing:
            import torch

            s, n = int(self.starts[i]), int(self.counts[i])
            doc_start = np.zeros(self.item_len, dtype=bool)
            doc_start[:n] = self._start[s: s + n]
            item["doc_start"] = torch.from_numpy(doc_start)
        return item


class BinIdxWindows:
    """Sequential windows over the concatenated token stream of a binidx pair, like RWKV-LM.

    Window i holds stream tokens ``[i*T, i*T + T]`` (consecutive windows share one token, so
    every token but the very first is a target exactly once); the last window may be partial
    and is padded. binidx has no masks: every token is a target. ``doc_id`` is the item
    (document) holding the window's first input token; ``starts_doc`` is True when that token is
    the item's first. Every window continues window i-1, so state can always be carried when
    windows are visited in order.
    """

    def __init__(self, prefix: str, ctx_len: int, vocab_size: int | None = None):
        self.ctx_len = _check_ctx_len(ctx_len)
        self.data = BinIdxDataset(prefix)
        if vocab_size is not None:
            self.data.check_vocab(vocab_size)
        if self.data.num_tokens < 2:
            raise DataError(
                f"{bin_path(self.data.prefix)}: expected at least 2 tokens for one training "
                f"window, found {self.data.num_tokens}; add data"
            )
        self._n = math.ceil((self.data.num_tokens - 1) / self.ctx_len)
        self.num_targets = self.data.num_tokens - 1
        self.item_len = min(self.ctx_len, self.num_targets)  # see PackedDataset.item_len

    def __len__(self) -> int:
        return self._n

    @property
    def efficiency(self) -> float:
        return self.num_targets / (len(self) * self.ctx_len)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i = int(i) % len(self)
        T = self.ctx_len
        s = i * T
        w = np.asarray(self.data.tokens[s : s + T + 1])
        item = self.data.item_of_token(s)
        first = int(self.data.offsets[item])  # stream position where the item starts
        meta = {
            "doc_id": item,
            "piece_index": i - (first + T - 1) // T,  # windows starting earlier in this item
            "starts_doc": s == first,
        }
        return _make_item(w, None, self.item_len, meta)


class WindowSampler:
    """Deterministic, resumable, sharded order of window indices.

    Epoch e visits ``permutation(seed, e)`` of range(n) (or range(n) with shuffle=False),
    wrapped around at the end so that its length is a multiple of the global batch
    ``batch_size * world_size`` (no rank ever waits for a missing batch). Each global batch is a
    consecutive slice of that order; rank r takes its r-th sub-slice of ``batch_size`` indices, so
    the ranks' indices are disjoint within a batch and together cover it.

    Use with ``DataLoader(ds, batch_size=batch_size, sampler=sampler)``. Iteration starts at
    the current (epoch, position) and does not move it: the training loop calls
    ``advance()`` once per consumed batch (a DataLoader prefetches ahead, so only the loop knows
    what was really consumed). ``advance`` rolls over to the next epoch at the end.
    ``state_dict()`` saved with a checkpoint resumes at exactly the next batch, also with another
    global batch (a run resumed on another number of processes): the rest of that epoch is cut into
    the new global batches from the saved position on (``offset``), so no window is skipped or
    repeated; later epochs start at 0 as usual.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1):
        if n < 1:
            raise DataError("WindowSampler: the dataset has no windows; add data")
        if not 0 <= rank < world_size or batch_size < 1:
            raise ConfigError(
                f"WindowSampler: need 0 <= rank < world_size and batch_size >= 1, found "
                f"rank={rank}, world_size={world_size}, batch_size={batch_size}"
            )
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        self.epoch = 0
        self.position = 0  # global samples (all ranks) of this epoch already consumed
        # Where this epoch's global batches start: 0, except in an epoch resumed with another global
        # batch, whose batches start at the saved position (position - offset: whole global batches)
        self.offset = 0
        self._cache_key, self._cache = None, None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch_len(self) -> int:
        """Global samples per epoch (n rounded up to whole global batches after ``offset``)."""
        return self.offset + math.ceil((self.n - self.offset) / self.global_batch) * self.global_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_len // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """The global visiting order of one epoch (length epoch_len). Cached for the last epoch
        asked, since a loop that calls ``current_batch`` every step stays in one epoch."""
        key = (epoch, self.epoch_len)
        if self._cache_key != key:
            if self.shuffle:
                base = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                base = np.arange(self.n)
            self._cache = np.resize(base, self.epoch_len)  # wrap around to fill the last batch
            self._cache_key = key
        return self._cache

    def current_batch(self) -> list[int]:
        """This rank's indices of the next (not yet consumed) global batch; O(batch_size)."""
        start = self.position + self.rank * self.batch_size
        return self.order(self.epoch)[start : start + self.batch_size].tolist()

    def _indices(self) -> np.ndarray:
        rest = self.order(self.epoch)[self.position :]
        nb = len(rest) // self.global_batch
        rest = rest[: nb * self.global_batch].reshape(nb, self.world_size, self.batch_size)
        return rest[:, self.rank, :].reshape(-1)

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        """Indices this rank yields from the current position to the end of the epoch."""
        return (self.epoch_len - self.position) // self.global_batch * self.batch_size

    def advance(self, batches: int = 1) -> None:
        """Mark ``batches`` global batches as consumed (rolls to the next epoch at the end)."""
        self.position += batches * self.global_batch
        while self.position >= self.epoch_len:
            self.position -= self.epoch_len
            self.epoch += 1
            self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self.offset = int(epoch), 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed,
                "shuffle": self.shuffle, "global_batch": self.global_batch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        """Resume. The dataset size, seed and shuffle must match (else the order differs);
        world_size and batch_size may change: position counts samples, not batches, and the rest of
        the epoch is cut into this run's global batches from there on (nothing skipped or repeated)."""
        for key in ("n", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"sampler state: saved {key}={state[key]!r} but this run has "
                    f"{key}={getattr(self, key)!r}; resume with the same data and seed"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and isinstance(position, int) and epoch >= 0 and 0 <= position < self.n):
            raise DataError(f"sampler state: epoch {epoch!r}, position {position!r} is not a place in an epoch of "
                            f"{self.n} windows; the checkpoint is damaged: resume from the one before it")
        self.epoch, self.position = epoch, position
        # position < n: a saved position is never inside the wrapped tail (see advance), so the
        # windows still due this epoch are order[position:n], whatever the global batch
        self.offset = position % self.global_batch


def load_dataset(path: str, tokenizer, ctx_len: int, fmt: str = "auto", on_error: str = "raise",
                 vocab_size: int | None = 65536, packing: bool = True):
    """Open training data: a .jsonl/.json file (tokenized, and packed with document resets when
    ``packing``) or a binidx prefix (a stream of windows across documents, as RWKV-LM trains)."""
    path = os.fspath(path)
    if path.endswith((".jsonl", ".json")):
        if tokenizer is None:
            tokenizer = get_tokenizer()
        samples, _ = read_samples(path, tokenizer, fmt=fmt, on_error=on_error,
                                  vocab_size=vocab_size)
        return PackedDataset(samples, ctx_len, packing=packing)
    prefix = strip_suffix(path)
    if os.path.isfile(idx_path(prefix)) or os.path.isfile(bin_path(prefix)):
        return BinIdxWindows(prefix, ctx_len, vocab_size=vocab_size)
    raise DataError(
        f"{path}: no training data found; looked for a .jsonl/.json file at that path and for "
        f"binidx files {idx_path(prefix)} + {bin_path(prefix)}; check the path"
    )
