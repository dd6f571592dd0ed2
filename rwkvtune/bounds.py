"""Bounds of numeric options: one table per config (``TRAIN_BOUNDS`` beside TrainConfig, the
sampling table beside SamplingConfig, the flags of ``plan`` and ``eval``), checked by one helper.

A value passes only when it has the right type (an int field takes no float, no field takes a
bool), is finite (nan and inf never pass: they surface much later as "loss is nan" with the
wrong advice) and lies in the field's range. Upper limits sit far beyond any useful value; they
are there so that a typo (``1e23``, a run of extra zeros) is refused here instead of overflowing
in the maths or in torch (a seed beyond 64 bits, a thread count that crashes OpenMP).

Problems read ``"NAME: found VALUE, expected WHAT"``; values are shown shortened
(:func:`shown`), so that no input, however large, makes a long error line.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import reprlib
from typing import Any, Callable, Mapping

# torch.set_num_threads beyond the cores only adds contention; at ~100000 OpenMP crashes the
# process (a segfault, not an error). This many threads per core are allowed.
THREADS_PER_CORE = 4


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_threads() -> int:
    return THREADS_PER_CORE * cpu_cores()


_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxtuple, _short.maxdict = 2, 4, 4, 4
_short.maxstring, _short.maxother, _short.maxlong = 40, 40, 40
SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """``repr(value)`` for an error line, at most SHOWN_CHARS characters however large or deeply
    nested the value is (a YAML alias bomb's value is never expanded into the message)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):  # a config's tuples are lists in YAML and on the command line
        value = list(value)
    text = _short.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def clip(text: str, n: int = 60) -> str:
    """``text`` cut to ``n`` characters (a name or key shown in an error line)."""
    return text if len(text) <= n else text[:n - 3] + "..."


def _fmt(x: float) -> str:
    """A bound as people write it: 10, 65536, 0.5, 1e+06."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class Bound:
    """The accepted values of one numeric option: ``kind`` int or float, within ``lo``..``hi``
    (either may be None; ``hi`` may be a function, e.g. of the machine's cores), the ends
    included unless ``lo_open``/``hi_open``. ``optional``: None is accepted (a default resolved
    later). ``each``: the value is a list or tuple and every item must pass. ``note``: why the
    range or what to do, shown after the problem."""

    kind: type
    lo: float | None = None
    hi: float | Callable[[], float] | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False
    each: bool = False
    note: str = ""

    def high(self) -> float | None:
        return self.hi() if callable(self.hi) else self.hi

    def expected(self, name: str, flag: bool = False) -> str:
        """"an integer with 1 <= lora_r <= 65536", "a finite number > 0", ... (``flag``: of a
        command-line flag, whose given value is never None)."""
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = self.lo, self.high()
        lo_op, hi_op = "<" if self.lo_open else "<=", "<" if self.hi_open else "<="
        if lo is not None and hi is not None:
            what += f" with {_fmt(lo)} {lo_op} {name} {hi_op} {_fmt(hi)}"
        elif lo is not None:
            what += f" {'>' if self.lo_open else '>='} {_fmt(lo)}"
        elif hi is not None:
            what += f" {hi_op} {_fmt(hi)}"
        if self.each:
            what = ("each value " if flag else "a list, each item ") + what
        if self.optional and not flag:
            what += " (or null for the default)"
        return what

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.each:
            return isinstance(value, (list, tuple)) and all(self._accepts_one(v) for v in value)
        return self._accepts_one(value)

    def _accepts_one(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if self.kind is int else numbers.Real):
            return False
        try:
            x = float(v)
        except OverflowError:  # an int beyond a double: beyond any range here
            return False
        if not math.isfinite(x):
            return False
        lo, hi = self.lo, self.high()
        if lo is not None and (v <= lo if self.lo_open else v < lo):
            return False
        return hi is None or (v < hi if self.hi_open else v <= hi)

    def problem(self, name: str, value: Any, flag: bool = False) -> str | None:
        """None when ``value`` is accepted, else "NAME: found VALUE, expected WHAT (NOTE)"."""
        if self.accepts(value):
            return None
        return (f"{name}: found {shown(value)}, expected {self.expected(name, flag)}"
                + (f" ({self.note})" if self.note else ""))


def bound_problems(values: Any, table: Mapping[str, Bound]) -> list[str]:
    """The problems of every option in ``table`` (an attribute of ``values``, or its key when it
    is a mapping), in the table's order."""
    get = values.get if isinstance(values, Mapping) else lambda name: getattr(values, name)
    return [p for name, bound in table.items() if (p := bound.problem(name, get(name))) is not None]


def check_flag(flag: str, value: Any, bound: Bound, error: type) -> Any:
    """``value`` of the command-line ``flag`` (e.g. "--ctx-len") when ``bound`` accepts it, else
    ``error`` with the one-line problem naming the flag."""
    problem = bound.problem(flag, value, flag=True)
    if problem is not None:
        raise error(problem)
    return value
