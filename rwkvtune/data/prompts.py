"""Prompts for GRPO: jsonl records ``{"prompt", ...}``.

``prompt`` is a string, sent to the model as is (a text to continue), or a list of chat messages,
rendered in the RWKV World chat format ending with ``"Assistant:"`` (the model then answers as
the assistant). Every other field of the record (an answer to check, a label) is handed to the
reward functions, by name.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rwkvtune.data.formats import ReadStats, RecordError, read_encoded
from rwkvtune.data.preference import render_prompt
from rwkvtune.errors import DataError


@dataclasses.dataclass
class PromptRecord:
    text: str  # the prompt as the model reads it (chat prompts rendered)
    ids: np.ndarray  # its tokens (int32)
    fields: dict  # the record's other fields, for the reward functions


def encode_prompt(obj, tokenizer, fmt=None, vocab_size: int | None = None) -> PromptRecord:
    """One record -> PromptRecord; raises RecordError (no location) on bad input."""
    if not isinstance(obj, dict):
        raise RecordError(f'expected a JSON object like {{"prompt": ..., "answer": ...}}, found {type(obj).__name__}')
    if "prompt" not in obj:
        raise RecordError(f"missing field 'prompt' (GRPO data needs a prompt per record); found keys {sorted(obj)[:8]}")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError("'prompt' is empty")
        text = prompt
    else:
        text = render_prompt(prompt)  # a list of messages: a chat
    ids = tokenizer.encode(text)
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise RecordError(f"token id {max(ids)} is outside the model vocab [0, {vocab_size}), so the tokenizer does "
                          f"not match the model")
    return PromptRecord(text, np.asarray(ids, dtype=np.int32), {k: v for k, v in obj.items() if k != "prompt"})


def read_prompts(path: str, tokenizer, on_error: str = "raise", vocab_size: int | None = None
                 ) -> tuple[list[PromptRecord], ReadStats]:
    return read_encoded(path, tokenizer, encode_prompt, on_error, vocab_size, sizes=lambda r: (len(r.ids), 0))


class PromptDataset:
    def __init__(self, records: list[PromptRecord]):
        if not records:
            raise DataError("GRPO data: no prompts; add data")
        names = set(records[0].fields)
        for i, r in enumerate(records):
            if set(r.fields) != names:
                raise DataError(f"GRPO data: record {i} has fields {sorted(r.fields)}, record 0 has {sorted(names)}; "
                                f"every record needs the same fields (the reward functions receive them as lists)")
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"index": int(i), "record": self.records[i]}
