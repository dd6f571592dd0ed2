"""Training samples from jsonl (or a .json array): plain text, chat messages, prompt/response.

Each record becomes a :class:`Sample` of token ids plus a loss mask. The format is detected per
record (``fmt="auto"``) or forced (``fmt="text" | "chat" | "prompt_response"``):

- ``{"text": "..."}``: tokens of the text, then 0 (end of text). Every token is a target,
  including the final 0 (the model learns where documents end).
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: rendered in
  the RWKV World chat format used by the g1 models::

      System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\nUser: ...

  followed by a final 0. Targets are ONLY the assistant replies (the " {content}" tokens after
  "Assistant:") and the turn-ending "\\n\\n" (token 261) after each reply; the prompt side, the
  role names and the final 0 carry no loss.
- ``{"prompt": "...", "response": "..."}``: the same as a user message then an assistant reply.
- Alpaca ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` and ``system``
  optional): a user message (the instruction, then the input on the next line) and the output as
  the assistant's reply, rendered as the chat format above.
- ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``: the
  same turns as chat messages (human = user, gpt = assistant).

Mask convention: ``mask[i]`` is True when token i is a TARGET, i.e. the loss at the position
whose input is ``tokens[i-1]`` (predicting ``tokens[i]``) counts. Datasets turn this into labels
``labels[t] = tokens[t+1] if mask[t+1] else -100``.

Chat content is normalised: surrounding whitespace is stripped, "\\r\\n" becomes "\\n", and any
run of blank lines ("\\n\\n", "\\n\\n\\n", ...) inside content becomes a single "\\n", because
"\\n\\n" ends a turn in this format: left in place it would teach the model to stop mid-reply and
would make a user message look like several turns. Plain text is used as is.

Tokenization of chat matches inference: the prompt side, up to and including "Assistant:"
(no trailing space), is tokenized as one string, exactly as a chat front end tokenizes the
prompt; the reply " {content}" is tokenized separately and followed by the single token 261.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from rwkvtune.constants import DATA_FORMAT_ALIASES, END_OF_TEXT
from rwkvtune import log
from rwkvtune.errors import DataError
from rwkvtune.utils import not_found, plural, read_error


TURN_END = 261  # "\n\n" in the World vocab
FORMATS = ("text", "chat", "prompt_response", "alpaca", "sharegpt")
_FMT_ALIASES = DATA_FORMAT_ALIASES  # the names of --data-format (TrainConfig.validate checks them too)
# ShareGPT's speakers ("from") -> our roles; "user"/"assistant" appear in some exports too.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_BLANK_LINES = re.compile(r"\n{2,}")


@dataclass
class Sample:
    """One document: ``tokens`` (int32, ends with 0) and ``mask`` (bool, True = token is a
    target that counts in the loss; see the module docstring for the exact alignment)."""

    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class ReadStats:
    """What reading one file produced; ``skipped_examples`` keeps the first few error messages."""

    path: str
    records: int = 0
    samples: int = 0
    skipped: int = 0
    tokens: int = 0
    target_tokens: int = 0
    skipped_examples: list = field(default_factory=list)
    seconds: float = 0.0  # wall time of the read (data prepare reports it)

    def note_skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(message)

    def summary(self) -> str:
        s = (f"{self.path}: {plural(self.samples, 'sample')}, {plural(self.tokens, 'token')} from "
             f"{plural(self.records, 'record')}")
        if self.skipped:
            s += f"; skipped {plural(self.skipped, 'bad record')} (first: {self.skipped_examples[0]})"
        return s


class RecordError(ValueError):
    """A problem with one record; the caller prefixes FILE:LINE and turns it into DataError."""


SKIP_ADVICE = "fix the record or pass on_error='skip' to skip bad records"


class BadRecordError(DataError):
    """A bad record met with ``on_error="raise"``: "FILE:LINE: problem; advice".

    The advice names this module's argument ``on_error='skip'``; a front end whose option has
    another name (or that has none, like ``rwkvtune eval``) words it for its user with
    :meth:`with_advice`. Skip reports use :attr:`located`, since there the advice is moot.
    """

    def __init__(self, where: str, problem: str, advice: str = SKIP_ADVICE):
        self.where, self.problem, self.advice = where, problem, advice
        super().__init__(f"{where}: {problem}; {advice}")

    def __reduce__(self):  # pickles with its three fields, not the formatted message
        return type(self), (self.where, self.problem, self.advice)

    @property
    def located(self) -> str:
        return f"{self.where}: {self.problem}"

    def with_advice(self, advice: str) -> "BadRecordError":
        return BadRecordError(self.where, self.problem, advice)


def normalize_fmt(fmt: str) -> str:
    key = str(fmt).lower()
    if key not in _FMT_ALIASES:
        raise DataError(
            f"data format {fmt!r} is unknown; expected one of auto, {', '.join(FORMATS)}"
        )
    return _FMT_ALIASES[key]


def normalize_content(text: str) -> str:
    """Strip and collapse blank lines so that content can never contain a turn end "\\n\\n"."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())


# --- rendering ----------------------------------------------------------------------------------
def _pack(parts: list[tuple[list[int], bool]]) -> Sample:
    ids: list[int] = []
    mask: list[bool] = []
    for part, is_target in parts:
        ids.extend(part)
        mask.extend([is_target] * len(part))
    return Sample(np.array(ids, dtype=np.int32), np.array(mask, dtype=bool))


def render_text(text, tokenizer) -> Sample:
    if not isinstance(text, str):
        raise RecordError(f"'text' must be a string, found {type(text).__name__}")
    if not text.strip():
        raise RecordError("'text' is empty")
    tokens = np.array(tokenizer.encode(text) + [END_OF_TEXT], dtype=np.int32)
    return Sample(tokens, np.ones(len(tokens), dtype=bool))


def render_chat(messages, tokenizer) -> Sample:
    if not isinstance(messages, list):
        raise RecordError(f"'messages' must be a list, found {type(messages).__name__}")
    if not messages:
        raise RecordError("'messages' is an empty list")
    parts: list[tuple[list[int], bool]] = []
    prompt = ""  # prompt-side text not yet tokenized
    has_reply = False
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError(f"messages[{k}] must be an object, found {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise RecordError(
                f"messages[{k}].role must be one of 'system', 'user', 'assistant', found {role!r}"
            )
        if not isinstance(content, str):
            raise RecordError(
                f"messages[{k}].content must be a string, found {type(content).__name__}"
            )
        content = normalize_content(content)
        if not content:
            raise RecordError(f"messages[{k}].content is empty")
        name = _ROLES[role.lower()]
        if name == "Assistant":
            prompt += "Assistant:"
            parts.append((tokenizer.encode(prompt), False))
            parts.append((tokenizer.encode(" " + content) + [TURN_END], True))
            prompt = ""
            has_reply = True
        else:
            prompt += f"{name}: {content}\n\n"
    if not has_reply:
        raise RecordError("'messages' has no assistant message, so nothing to learn from")
    if prompt:  # trailing user/system turns after the last reply: context only
        parts.append((tokenizer.encode(prompt), False))
    parts.append(([END_OF_TEXT], False))
    return _pack(parts)


def render_prompt_response(prompt, response, tokenizer) -> Sample:
    for key, val in (("prompt", prompt), ("response", response)):
        if not isinstance(val, str):
            raise RecordError(f"'{key}' must be a string, found {type(val).__name__}")
        if not val.strip():
            raise RecordError(f"'{key}' is empty")
    return render_chat(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenizer,
    )


def alpaca_messages(obj: dict) -> list[dict]:
    """An Alpaca record as chat messages: [system], user (instruction + input), assistant (output)."""
    for key in ("instruction", "output") + tuple(k for k in ("input", "system") if obj.get(k) is not None):
        if not isinstance(obj[key], str):
            raise RecordError(f"'{key}' must be a string, found {type(obj[key]).__name__}")
    for key in ("instruction", "output"):
        if not obj[key].strip():
            raise RecordError(f"'{key}' is empty")
    user = obj["instruction"].strip()
    if (obj.get("input") or "").strip():
        user += "\n" + obj["input"].strip()  # one line break: a blank line would end the turn
    system = [{"role": "system", "content": obj["system"]}] if (obj.get("system") or "").strip() else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def sharegpt_messages(turns) -> list[dict]:
    """ShareGPT ``conversations`` as chat messages (speaker names checked, one line per problem)."""
    if not isinstance(turns, list):
        raise RecordError(f"'conversations' must be a list, found {type(turns).__name__}")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"conversations[{k}] must be an object, found {type(turn).__name__}")
        who, value = turn.get("from"), turn.get("value")
        if not isinstance(who, str) or who.lower() not in _SHAREGPT_ROLES:
            raise RecordError(f"conversations[{k}].from must be one of 'human', 'gpt', 'system', found {who!r}")
        if not isinstance(value, str):
            raise RecordError(f"conversations[{k}].value must be a string, found {type(value).__name__}")
        if not normalize_content(value):
            raise RecordError(f"conversations[{k}].value is empty")
        messages.append({"role": _SHAREGPT_ROLES[who.lower()], "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("'conversations' has no 'gpt' turn, so nothing to learn from" if messages
                          else "'conversations' is an empty list")
    return messages


def detect_format(obj: dict) -> str:
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "prompt" in obj or "response" in obj:
        return "prompt_response"
    if "text" in obj:
        return "text"
    raise RecordError(
        f"expected a 'text', 'messages', 'prompt'+'response', 'conversations' (ShareGPT) or "
        f"'instruction'+'output' (Alpaca) field, found keys {sorted(obj)[:8]}"
    )


def encode_record(obj, tokenizer, fmt: str = "auto", vocab_size: int | None = None) -> Sample:
    """Render one parsed record; raises RecordError (no location) on bad input."""
    if not isinstance(obj, dict):
        raise RecordError(
            f'expected a JSON object like {{"text": ...}}, found {type(obj).__name__}'
        )
    fmt = detect_format(obj) if fmt == "auto" else fmt
    needed = {"text": ("text",), "chat": ("messages",), "prompt_response": ("prompt", "response"),
              "alpaca": ("instruction", "output"), "sharegpt": ("conversations",)}
    for key in needed[fmt]:
        if key not in obj:
            raise RecordError(f"missing field '{key}' (format {fmt}); found keys {sorted(obj)[:8]}")
    if fmt == "text":
        sample = render_text(obj["text"], tokenizer)
    elif fmt == "chat":
        sample = render_chat(obj["messages"], tokenizer)
    elif fmt == "alpaca":
        sample = render_chat(alpaca_messages(obj), tokenizer)
    elif fmt == "sharegpt":
        sample = render_chat(sharegpt_messages(obj["conversations"]), tokenizer)
    else:
        sample = render_prompt_response(obj["prompt"], obj["response"], tokenizer)
    if vocab_size is not None and len(sample.tokens) and int(sample.tokens.max()) >= vocab_size:
        raise RecordError(
            f"token id {int(sample.tokens.max())} is outside the model vocab [0, {vocab_size}), "
            "so the tokenizer does not match the model"
        )
    return sample


# --- reading files ------------------------------------------------------------------------------
# A raw record is (where, payload, kind): where = "FILE:LINE" (or "FILE: item N" for a JSON array);
# kind "json" -> payload is a JSON text; "obj" -> already parsed; "bytes" -> undecodable line.
RawRecord = tuple


def iter_raw_records(path: str) -> Iterator[RawRecord]:
    """Yield the raw records of a jsonl file (blank lines are ignored) or a .json array."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(not_found(path, "file", "expected a .jsonl file with one JSON object per line"))
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if path.endswith(".json") and head.startswith(b"["):
            yield from _json_array_records(path)
            return
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark
                if not raw.strip():
                    continue
                try:
                    yield (f"{path}:{lineno}", raw.decode("utf-8"), "json")
                except UnicodeDecodeError as e:
                    yield (f"{path}:{lineno}", f"byte {e.start} of the line", "bytes")
    except OSError as e:  # permission denied, or a read error mid-file
        raise read_error(path, e, DataError) from e


def _json_array_records(path: str) -> Iterator[RawRecord]:
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            items = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        problem = _NESTED if isinstance(e, RecursionError) else e
        raise DataError(
            f"{path}: expected a JSON array of objects, but it does not parse ({problem}); "
            "fix the file or convert it to jsonl"
        ) from e
    for i, obj in enumerate(items):
        yield (f"{path}: item {i}", obj, "obj")


_NESTED = "nested deeper than the JSON reader's recursion limit; no record format nests like that"


def encode_raw(record: RawRecord, tokenizer, fmt: str = "auto", vocab_size=None, encode=None):
    """Parse and render one raw record (with ``encode(obj, tokenizer, fmt, vocab_size)``, default
    :func:`encode_record`); raises BadRecordError "FILE:LINE: ..." on bad input."""
    where, payload, kind = record
    try:
        if kind == "bytes":
            raise RecordError(f"not valid UTF-8 at {payload}")
        if kind == "json":
            try:
                obj = json.loads(payload)
            except json.JSONDecodeError as e:
                # Some of json's messages end with "at" ("Invalid control character at").
                msg = e.msg.removesuffix(" at")
                raise RecordError(f"malformed JSON ({msg} at column {e.colno})") from e
            except RecursionError as e:
                raise RecordError(f"malformed JSON ({_NESTED})") from e
        else:
            obj = payload
        try:
            return (encode or encode_record)(obj, tokenizer, fmt, vocab_size)
        except UnicodeEncodeError as e:  # JSON may escape a lone surrogate ("\\ud800"); text cannot hold one
            bad = e.object[e.start:e.end] if isinstance(e.object, str) else "?"
            raise RecordError(f"the text holds {bad!r}, a lone surrogate (half of a UTF-16 pair), which is not "
                              f"valid Unicode") from e
    except RecordError as e:
        raise BadRecordError(where, str(e)) from e


def check_on_error(on_error: str) -> str:
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', found {on_error!r}")
    return on_error


def finish_stats(stats: ReadStats) -> None:
    """Fail on a file that produced nothing; log a one-line summary when records were skipped."""
    if stats.records == 0:
        raise DataError(
            f"{stats.path}: empty file: expected one JSON object per line, "
            'e.g. {"text": "..."} or {"messages": [...]}'
        )
    if stats.samples == 0:
        raise DataError(
            f"{stats.path}: all {stats.records} records were bad and skipped "
            f"(first: {stats.skipped_examples[0]}); fix the data"
        )
    if stats.skipped:
        log.warn(stats.summary())


def read_encoded(path: str, tokenizer, encode, on_error: str = "raise", vocab_size: int | None = None,
                 sizes=None) -> tuple[list, ReadStats]:
    """Every record of ``path`` through ``encode(obj, tokenizer, fmt, vocab_size)`` (which raises
    RecordError on a bad record): a bad record raises BadRecordError "FILE:LINE: ..." or, with
    ``on_error="skip"``, is skipped and counted. ``sizes(item) -> (tokens, target tokens)``
    feeds the stats."""
    check_on_error(on_error)
    stats = ReadStats(path=os.fspath(path))
    items: list = []
    for rec in iter_raw_records(path):
        stats.records += 1
        try:
            item = encode_raw(rec, tokenizer, None, vocab_size, encode=encode)
        except BadRecordError as e:
            if on_error == "raise":
                raise
            stats.note_skip(e.located)
            continue
        items.append(item)
        stats.samples += 1
        if sizes is not None:
            tokens, targets = sizes(item)
            stats.tokens += tokens
            stats.target_tokens += targets
    finish_stats(stats)
    return items, stats


def read_samples(
    path: str,
    tokenizer,
    fmt: str = "auto",
    on_error: str = "raise",
    vocab_size: int | None = None,
) -> tuple[list[Sample], ReadStats]:
    """Read every record of ``path`` into Samples.

    ``on_error="raise"`` stops at the first bad record with a BadRecordError naming FILE:LINE;
    ``"skip"`` drops bad records, counts them in the returned ReadStats and logs a one-line
    summary (warning level) naming the first one.
    """
    fmt = normalize_fmt(fmt)
    encode = lambda obj, tok, _fmt, vocab: encode_record(obj, tok, fmt, vocab)  # noqa: E731
    return read_encoded(path, tokenizer, encode, on_error, vocab_size,
                        sizes=lambda s: (len(s.tokens), int(s.mask.sum())))
