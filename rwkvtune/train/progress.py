"""Progress of a training run on stderr: one object for the step count, what runs inside a step
(micro-batches, GRPO rollout tokens, eval batches, a checkpoint being saved) and the ETA.

On a terminal it is one line redrawn in place (``\\r``), at most once per ``min_interval``
seconds, and a ticker thread redraws it even when nothing reports (the elapsed time moves, so a
step of minutes is not mistaken for a hang). When stderr is not a terminal (a log file, a pipe,
a job scheduler's capture) it writes no carriage returns: one plain line per metrics row (every
``log_every`` steps), and a "still running" line when nothing was written for ``heartbeat``
seconds.

Everything time-dependent reads ``clock`` (``time.monotonic`` by default), so a test drives it
with a fake clock and no thread (``ticker=False``, then :meth:`Progress.poll`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

from rwkvtune import log

MIN_INTERVAL = 1.0  # seconds between redraws of the terminal line
HEARTBEAT = 60.0  # seconds without a line in a log file before a "still running" line
STEP_LEVEL = "micro-batch"  # the level inside a step whose fraction the ETA counts



def write(message: str) -> None:
    """Print ``message`` on stderr on this process without breaking the open progress line (if any).
    Messages for the user go through :mod:`rwkvtune.log` (rank 0 only), which an open progress line
    receives too: it is the log's sink while it is open."""
    log.emit(message)


def duration(seconds: float) -> str:
    """'45s', '3m14s', '2h05m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """The step progress of a run (see the module docstring).

    The loop calls :meth:`begin_step` before each optimizer step and the metrics logger calls
    :meth:`set_postfix` and :meth:`update` per metrics row (``update`` moves the count by the
    steps of that row). Code inside a step reports with :meth:`tick` (e.g. micro-batch 3 of 8);
    :meth:`phase` names what runs between steps (eval, saving). ``enabled=False`` (processes other
    than the main one) makes every call a no-op.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, stream: TextIO | None = None,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = MIN_INTERVAL, heartbeat: float = HEARTBEAT, ticker: bool = True,
                 unit: str = "step"):
        self.total, self.initial, self.n, self.current = total, initial, initial, initial
        self.enabled, self.unit = enabled, unit
        self._stream = stream  # None: sys.stderr as it is at each write (a test, or a redirect, may replace it)
        self.tty = bool(tty) if tty is not None else _isatty(self.stream)
        self.clock, self.min_interval, self.heartbeat = clock, min_interval, heartbeat
        self.start = self.step_start = self.last_line = clock()
        self.last_draw = -math.inf
        self.inner: dict[str, tuple[int, int]] = {}  # level -> (done, of), in the order first ticked
        self.activity: str | None = None  # what runs between steps (eval, saving), else None: a step
        self.postfix: dict[str, str] = {}
        self.closed = not enabled
        self.drawn = 0  # length of the terminal line now shown (0: none)
        self._lock = threading.RLock()  # the ticker thread and signal handlers write too
        self._stop = threading.Event()
        self._thread = None
        self._previous_sink: log.Sink | None = None
        if enabled:
            self._previous_sink = log.set_sink(self._sink_write)
            if ticker:
                self._thread = threading.Thread(target=self._tick_loop, name="rwkvtune-progress", daemon=True)
                self._thread.start()

    # ---------------------------------------------------------------------------------- reports
    def begin_step(self, step: int) -> None:
        """The loop starts optimizer step ``step + 1`` (``step`` steps are done)."""
        if self.closed:
            return
        with self._lock:
            self.current, self.step_start, self.inner, self.activity = step, self.clock(), {}, None

    def tick(self, what: str, done: int, of: int) -> None:
        """Inside a step (or a phase): ``done`` of ``of`` ``what`` (e.g. "micro-batch", 3, 8)."""
        if self.closed:
            return
        with self._lock:
            self.inner[what] = (done, of)
            self._maybe_draw()

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Name what runs between steps (``with progress.phase("eval"): ...``)."""
        if self.closed:
            yield
            return
        with self._lock:
            saved, self.activity, self.inner = (self.activity, self.inner), what, {}
            self._maybe_draw(force=True)
        try:
            yield
        finally:
            with self._lock:
                self.activity, self.inner = saved

    def set_postfix(self, **fields) -> None:
        """The metrics shown after the count (loss, lr, tokens/s), as strings."""
        with self._lock:
            self.postfix = {k: str(v) for k, v in fields.items()}

    def update(self, n: int = 1) -> None:
        """``n`` more steps are done and logged: on a terminal a redraw, else one plain line."""
        if self.closed:
            return
        with self._lock:
            self.n += n
            self.current = max(self.current, self.n)
            self.inner = {}
            if self.tty:
                self._maybe_draw()
            else:
                self._line(self._status())

    def write(self, message: str) -> None:
        """A message on its own line; the progress line is redrawn below it."""
        with self._lock:
            if self.tty and self.drawn:
                self.stream.write("\r" + " " * self.drawn + "\r")
                self.drawn = 0
            self.stream.write(message + "\n")
            self.stream.flush()
            if self.tty and not self.closed:
                self._draw()
            self.last_line = self.clock()

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _sink_write(self, message: str) -> None:
        """The log's sink while this line is open (a message during training)."""
        if self.closed:  # closed by another thread since the log read its sink
            print(message, file=sys.stderr, flush=True)
        else:
            self.write(message)

    def poll(self) -> None:
        """What the ticker thread does each ``min_interval``: redraw the terminal line (the elapsed
        time moves), or in a log file a "still running" line after ``heartbeat`` quiet seconds."""
        if self.closed:
            return
        with self._lock:
            if self.tty:
                self._maybe_draw()
            elif self.clock() - self.last_line >= self.heartbeat:
                self._line(self._running())

    def close(self) -> None:
        """Stop the ticker; on a terminal draw the last state and end its line. Safe to call twice."""
        if self.closed:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self.tty:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
            self.closed = True
            if log.sink() == self._sink_write:  # not replaced by a later progress line since
                log.set_sink(self._previous_sink)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------- the text
    def eta(self) -> float | None:
        """Seconds to the last step at this run's pace so far (None before any progress): the steps
        done since this object started, plus the done fraction of the current step's micro-batches."""
        done = max(self.n, self.current)
        if self.activity is None and done < self.total and STEP_LEVEL in self.inner:
            i, of = self.inner[STEP_LEVEL]
            done += min(max(i / of, 0.0), 1.0) if of else 0.0
        elapsed = self.clock() - self.start
        if done <= self.initial or elapsed <= 0:
            return None
        return elapsed * (self.total - done) / (done - self.initial)

    def _count(self) -> str:
        done = max(self.n, self.current)
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        return f"{self.unit} {done}/{self.total}{pct}"

    def _timing(self) -> str:
        eta = self.eta()
        return f"{duration(self.clock() - self.start)} elapsed, ETA " + (duration(eta) if eta is not None else "?")

    def _inside(self) -> str:
        """What runs now: 'step 3/10: micro-batch 2/8, 1m02s in' or 'eval: eval batch 4/9'."""
        levels = ", ".join(f"{k} {d}/{o}" for k, (d, o) in self.inner.items())
        if self.activity is not None:
            return self.activity + (f": {levels}" if levels else "")
        if self.current >= self.total:
            return ""
        head = f"{self.unit} {self.current + 1}/{self.total}"
        return f"{head}: {levels + ', ' if levels else ''}{duration(self.clock() - self.step_start)} in"

    def _status(self) -> str:
        """The plain line of a metrics row: count, metrics, elapsed and ETA."""
        fields = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return f"{self._count()}: {fields + '; ' if fields else ''}{self._timing()}"

    def _running(self) -> str:
        """The heartbeat line of a log file: what runs and since when."""
        inside = self._inside()
        return f"{self._count()} done; running {inside}; {self._timing()}" if inside else self._status()

    def _bar_text(self) -> str:
        """The terminal line, most telling first (a narrow terminal cuts the end): count and time,
        what runs now, the last metrics row."""
        fields = " ".join(f"{k} {v}" for k, v in self.postfix.items())
        return " | ".join(p for p in (f"{self._count()} {self._timing()}", self._inside(), fields) if p)

    # ----------------------------------------------------------------------------------- output
    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_line = self.clock()

    def _maybe_draw(self, force: bool = False) -> None:
        if self.tty and (force or self.clock() - self.last_draw >= self.min_interval):
            self._draw()

    def _draw(self) -> None:
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        text = self._bar_text()[:width]
        self.stream.write("\r" + text + " " * max(0, self.drawn - len(text)))
        self.stream.flush()
        self.drawn, self.last_draw = len(text), self.clock()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.min_interval):
            try:
                self.poll()
            except (OSError, ValueError):  # the stream closed under us (interpreter exit): stop quietly
                return


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
