"""Text around generation: the chat prompt format, stop strings, prompt encoding."""

from __future__ import annotations

import re
from typing import Sequence

from rwkvtune.constants import END_OF_TEXT
from rwkvtune.generate.config import GenerationError

CHAT_TURN_END = "\n\n"


def _clean(text: str) -> str:
    """One chat turn's content: CRLF -> LF, stripped, blank lines collapsed ("\\n\\n" ends a turn)."""
    return re.sub(r"\n{2,}", "\n", str(text).replace("\r\n", "\n").strip())


def format_chat(message: str, history: Sequence | None = None, system: str | None = None) -> str:
    """RWKV World chat prompt: ``"User: ...\\n\\nAssistant:"`` (no trailing space).

    ``history``: earlier turns, as (user, assistant) pairs or {"role", "content"} dicts (roles
    "system", "user", "assistant"). A "\\n\\n" inside any content would end the turn early, so
    runs of newlines become one "\\n".
    """
    parts = []
    if system:
        parts.append(f"System: {_clean(system)}\n\n")
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    for turn in history or ():
        if isinstance(turn, dict):
            role = str(turn.get("role", "")).lower()
            if role not in names:
                raise GenerationError(f"chat history: unknown role {turn.get('role')!r}; expected one of "
                                      f"{', '.join(names)}")
            parts.append(f"{names[role]}: {_clean(turn.get('content', ''))}\n\n")
        else:
            user, assistant = turn
            parts.append(f"User: {_clean(user)}\n\nAssistant: {_clean(assistant)}\n\n")
    parts.append(f"User: {_clean(message)}\n\nAssistant:")
    return "".join(parts)


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """(safe to emit, held back, stopped). Text before the earliest stop string when one occurs;
    otherwise everything except the longest tail that could still begin a stop string."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[:len(text) - hold], text[len(text) - hold:], False


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in ``text`` that ends after ``start``, or -1.

    A caller that checks after every appended piece passes the old length as ``start``: an
    earlier match would have been found already, so only the last ``len(stop) - 1`` old
    characters need to be searched again.
    """
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def encode_prompt(tokenizer, prompt, what: str = "prompt") -> list[int]:
    """Token ids of a text or id-list prompt; an empty prompt is [END_OF_TEXT] (token 0 precedes
    every document in training data, so it is the natural start)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = [int(i) for i in prompt]
        except (TypeError, ValueError) as e:
            raise GenerationError(f"{what}: expected text or a list of token ids, found "
                                  f"{type(prompt).__name__}; pass a str or a list of ints") from e
    return ids or [END_OF_TEXT]
