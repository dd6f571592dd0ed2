"""Datasets as the trainer sees them: packed ctx_len windows, or whole samples (long context)."""

from __future__ import annotations

import numpy as np
import torch

from rwkvtune.constants import END_OF_TEXT, IGNORE_INDEX
from rwkvtune.data.collate import right_pad
from rwkvtune.data.dataset import PackedDataset, load_dataset
from rwkvtune.data.formats import read_samples
from rwkvtune.errors import DataError


class WholeSamples:
    """Each item is one whole document, however long (``long_context`` training).

    Like a packed window, the input starts with the end-of-text token 0 (beginning of text)
    and labels[t] is the next token where the sample's mask makes it a target.
    """

    def __init__(self, samples):
        if not samples:
            raise DataError("long-context data: no samples; add data")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        w = np.concatenate([[END_OF_TEXT], s.tokens]).astype(np.int64)
        labels = np.where(s.mask, w[1:], IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(w[:-1].copy()), "labels": torch.from_numpy(labels)}


def build_dataset(path: str, tokenizer, cfg, vocab_size: int):
    if cfg.long_context:
        if not path.endswith((".jsonl", ".json")):
            raise DataError(f"{path}: long_context needs jsonl data (binidx has no sample boundaries)")
        samples, _ = read_samples(path, tokenizer, fmt=cfg.data_format, on_error=cfg.on_data_error,
                                  vocab_size=vocab_size)
        if cfg.packing and samples:
            # Rows as long as the longest sample, each holding whole samples back to back with a
            # state reset at each one's start: no sample is cut, and the rows run in ctx_len chunks
            # carrying the state like whole samples do.
            return PackedDataset(samples, max(1, max(len(s.tokens) for s in samples)), packing=True)
        return WholeSamples(samples)
    return load_dataset(path, tokenizer, cfg.ctx_len, fmt=cfg.data_format, on_error=cfg.on_data_error,
                        vocab_size=vocab_size, packing=cfg.packing)


def _used_len(item: dict) -> int:
    """Length up to the item's last target: later positions (padding, or input that nothing is
    predicted from) cannot change any loss, since the model is causal."""
    hits = (item["labels"] != IGNORE_INDEX).nonzero()
    return int(hits[-1]) + 1 if len(hits) else 1


def collate(items: list[dict], device) -> dict:
    """Stack items, padding to the longest (input 0, label -100). Columns after the batch's last
    target are dropped, so a ctx_len much longer than the data costs nothing. Packed items'
    ``doc_start`` (document starts) come along as a bool [B, T]."""
    T = max(_used_len(it) for it in items)
    packed = all("doc_start" in it for it in items)
    return right_pad([(it["input_ids"], it["labels"]) for it in items], device, length=T,
                     doc_start=[it["doc_start"] for it in items] if packed else None)
