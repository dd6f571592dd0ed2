"""The one right-padding collate: rows of (input ids, labels) stacked into [R, T] tensors, input
padded with 0 and labels with IGNORE_INDEX. The model is causal, so padding after a row's last
token changes nothing before it, and padded positions carry no loss."""

from __future__ import annotations

import torch

from rwkvtune.constants import IGNORE_INDEX


def right_pad(rows, device, length: int | None = None, doc_start=None) -> dict:
    """``{"input_ids", "labels"}`` [len(rows), T] on ``device`` from ``rows`` of (input ids, labels),
    each a 1-D sequence (list, numpy array or tensor). ``T``: ``length`` (longer rows are cut to it),
    else the longest row. ``doc_start``: one bool sequence per row (packed documents' first tokens),
    padded with False into ``"doc_start"`` [len(rows), T]."""
    T = length if length is not None else max(len(x) for x, _ in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (x, y) in enumerate(rows):
        x, y = torch.as_tensor(x[:T]), torch.as_tensor(y[:T])
        idx[r, :len(x)] = x
        labels[r, :len(y)] = y
    batch = {"input_ids": idx.to(device), "labels": labels.to(device)}
    if doc_start is not None:
        starts = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, d in enumerate(doc_start):
            d = torch.as_tensor(d[:T], dtype=torch.bool)
            starts[r, :len(d)] = d
        batch["doc_start"] = starts.to(device)
    return batch
