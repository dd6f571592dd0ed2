"""Messages for the user: warnings, notes and what a run is doing, on stderr, once per run.

stdout carries a command's result (tables, JSON, generated text) and stays ``print``; everything a
person reads beside it goes through here, so that

* under torchrun, where every process runs the same code, a message is printed by rank 0 alone
  (the ``RANK`` variable torchrun sets; a plain process has none and prints);
* during training it is printed above the progress line instead of through it: the open progress
  line (:mod:`rwkvtune.train.progress`) installs itself as the sink with :func:`set_sink`;
* a message is one line, prefixed ``warning:`` or ``note:`` by :func:`warn` and :func:`note`.

Errors are not messages: they are raised (rwkvtune.errors) and the CLI prints them.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

Sink = Callable[[str], None]

_sink: Sink | None = None  # the open progress line's writer, else None: plain lines on stderr


def main_process() -> bool:
    """True on rank 0 of a torchrun launch, and in a process that is not part of one."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def set_sink(sink: Sink | None) -> Sink | None:
    """Send messages to ``sink`` (a function printing one line) instead of stderr; None restores
    stderr. Returns the previous sink."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def sink() -> Sink | None:
    """The sink messages go to now (None: stderr)."""
    return _sink


def emit(message: str) -> None:
    """Print ``message`` on this process, whatever its rank (for what differs between processes, e.g.
    a reward function's output seen by one of them); through the sink when one is set."""
    target = _sink
    if target is not None:
        target(message)
        return
    print(message, file=sys.stderr, flush=True)  # sys.stderr looked up now: a test may have replaced it


def info(message: str) -> None:
    """A message, printed by the main process only."""
    if main_process():
        emit(message)


def note(message: str) -> None:
    """``note: message``, by the main process only."""
    info(f"note: {message}")


def warn(message: str) -> None:
    """``warning: message``, by the main process only."""
    info(f"warning: {message}")
