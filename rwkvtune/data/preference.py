"""Preference pairs for DPO: jsonl records ``{"prompt", "chosen", "rejected"}``.

Each field is a string or a list of chat messages (``{"role", "content"}``), rendered in the RWKV
World chat format the SFT formats use (:mod:`rwkvtune.data.formats`):

* a string prompt is one user turn; a list is the conversation so far (system, user, assistant
  turns); either way the prompt ends with ``"Assistant:"``;
* a string completion is the assistant's reply; a list holds the assistant message(s) of the reply.
  A reply is ``" {content}"`` followed by the turn end ``"\\n\\n"`` (token 261), as in SFT chat data.

Only the completion's tokens are scored (the prompt carries no loss); chosen and rejected share the
prompt's tokens exactly (the prompt is tokenized once, as a chat front end tokenizes it). Bad
records get the same one-line errors and ``on_error`` handling as SFT data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rwkvtune.constants import END_OF_TEXT, IGNORE_INDEX
from rwkvtune.data.formats import TURN_END, ReadStats, RecordError, _ROLES, normalize_content, read_encoded
from rwkvtune.errors import DataError


@dataclasses.dataclass
class PreferencePair:
    prompt: np.ndarray  # int32 token ids, ending with "Assistant:"
    chosen: np.ndarray  # the reply's tokens, ending with the turn end 261
    rejected: np.ndarray


def _content(msg, where: str) -> tuple[str, str]:
    if not isinstance(msg, dict):
        raise RecordError(f"{where} must be an object with 'role' and 'content', found {type(msg).__name__}")
    role, content = msg.get("role"), msg.get("content")
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise RecordError(f"{where}.role must be one of 'system', 'user', 'assistant', found {role!r}")
    if not isinstance(content, str) or not normalize_content(content):
        raise RecordError(f"{where}.content must be a non-empty string")
    return _ROLES[role.lower()], normalize_content(content)


def render_prompt(prompt) -> str:
    """The prompt as chat text ending with "Assistant:" (no trailing space)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError("'prompt' is empty")
        return f"User: {normalize_content(prompt)}\n\nAssistant:"
    if not isinstance(prompt, list) or not prompt:
        raise RecordError(f"'prompt' must be a string or a non-empty list of messages, found "
                          f"{type(prompt).__name__ if not isinstance(prompt, list) else 'an empty list'}")
    turns = [_content(m, f"prompt[{k}]") for k, m in enumerate(prompt)]
    return "".join(f"{name}: {text}\n\n" for name, text in turns) + "Assistant:"


def render_reply(reply, field: str, tokenizer) -> list[int]:
    """The reply's tokens: " {content}" + turn end, per assistant message."""
    if isinstance(reply, str):
        if not reply.strip():
            raise RecordError(f"'{field}' is empty")
        return tokenizer.encode(" " + normalize_content(reply)) + [TURN_END]
    if not isinstance(reply, list) or not reply:
        raise RecordError(f"'{field}' must be a string or a non-empty list of assistant messages")
    ids: list[int] = []
    for k, m in enumerate(reply):
        name, text = _content(m, f"{field}[{k}]")
        if name != "Assistant":
            raise RecordError(f"{field}[{k}].role is {name.lower()!r}; a completion holds assistant messages only "
                              f"(put earlier turns in 'prompt')")
        ids += tokenizer.encode(" " + text) + [TURN_END]
    return ids


def encode_pair(obj, tokenizer, fmt=None, vocab_size: int | None = None) -> PreferencePair:
    """One record -> PreferencePair; raises RecordError (no location) on bad input."""
    if not isinstance(obj, dict):
        raise RecordError(f'expected a JSON object like {{"prompt": ..., "chosen": ..., "rejected": ...}}, found '
                          f'{type(obj).__name__}')
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(repr(k) for k in missing)} (preference data needs prompt, "
                          f"chosen and rejected); found keys {sorted(obj)[:8]}")
    prompt = tokenizer.encode(render_prompt(obj["prompt"]))
    chosen, rejected = render_reply(obj["chosen"], "chosen", tokenizer), render_reply(obj["rejected"], "rejected",
                                                                                     tokenizer)
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are the same text; a pair needs two different completions")
    top = max(prompt + chosen + rejected)
    if vocab_size is not None and top >= vocab_size:
        raise RecordError(f"token id {top} is outside the model vocab [0, {vocab_size}), so the tokenizer does not "
                          f"match the model")
    as_array = lambda ids: np.asarray(ids, dtype=np.int32)  # noqa: E731
    return PreferencePair(as_array(prompt), as_array(chosen), as_array(rejected))


def read_pairs(path: str, tokenizer, on_error: str = "raise", vocab_size: int | None = None
               ) -> tuple[list[PreferencePair], ReadStats]:
    """Every pair of a jsonl file; bad records raise (FILE:LINE) or are skipped and counted."""
    sizes = lambda p: (2 * len(p.prompt) + len(p.chosen) + len(p.rejected), len(p.chosen) + len(p.rejected))  # noqa
    return read_encoded(path, tokenizer, encode_pair, on_error, vocab_size, sizes=sizes)


class PreferenceDataset:
    """Item i: the chosen and the rejected sequence of pair i, as model inputs and labels.

    Each sequence is ``[0] + prompt + reply`` (0 = end of text, which precedes every document
    in training); the input is all but the last token and labels[t] is the next token where it
    belongs to the reply, else -100.
    """

    def __init__(self, pairs: list[PreferencePair]):
        if not pairs:
            raise DataError("preference data: no pairs; add data")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def _sequence(prompt: np.ndarray, reply: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = np.concatenate([[END_OF_TEXT], prompt, reply]).astype(np.int64)
        labels = w[1:].copy()
        labels[: len(prompt)] = IGNORE_INDEX  # the prompt's tokens are predicted from the prompt: no loss
        return w[:-1], labels

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        return {"index": int(i), "chosen": self._sequence(p.prompt, p.chosen),
                "rejected": self._sequence(p.prompt, p.rejected)}


def collate_pairs(items: list[dict], device) -> dict:
    """[2B, T]: the B chosen sequences, then the B rejected ones, right-padded (input 0, label -100;
    the model is causal, so padding after a sequence changes nothing before it)."""
    import torch  # torch-free until a batch is built

    from rwkvtune.data.collate import right_pad

    batch = right_pad([it["chosen"] for it in items] + [it["rejected"] for it in items], device)
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return batch
