"""SIGTERM and Ctrl-C during training: finish the step, save, exit with the shell's status."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Iterator

from rwkvtune import log
from rwkvtune.errors import RwkvtuneError


class Terminated(RwkvtuneError):
    """A signal stopped training after a step (and its checkpoint). The CLI exits 128 + the signal
    number, what a shell reports for it: 143 for SIGTERM, 130 for Ctrl-C. A stop the user asked for
    is no error: the CLI prints the message as it is, without ``error:``."""

    deliberate = True

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_status = 128 + int(signum)


class GracefulStop:
    """The SIGTERM and SIGINT (Ctrl-C) handler while train() runs.

    In the loop the first signal only records the request: the loop finishes the optimizer step,
    saves a resumable checkpoint and raises Terminated (stopping mid-step would save weights,
    optimizer, data position and RNGs out of step with each other). A second Ctrl-C, or any signal
    outside the loop (setup, final eval and saving: no step to finish), stops at once.
    """

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def __init__(self):
        self.requested: int | None = None   # the signal number that asked to stop
        self.in_loop = False
        self.run_dir = None  # RunDir of the run, once known: its checkpoints are named on exit
        self.wakeup: socket.socket | None = None  # read end of the wakeup fd (see graceful_stop)

    def _deliveries(self) -> int:
        """Stop signals delivered since the last handler call (at least this one). Python runs a
        handler once for all deliveries of a signal that arrive before it can run (two Ctrl-C
        within a few ms), but its C-level handler writes one byte per delivery to the wakeup fd."""
        if self.wakeup is None:
            return 1
        count = 0
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while data := self.wakeup.recv(4096):
                count += sum(b in (signal.SIGINT, signal.SIGTERM) for b in data)
        return max(1, count)

    def describe(self) -> str:
        return "stopped by SIGTERM" if self.requested == signal.SIGTERM else "stopped by Ctrl-C"

    def __call__(self, signum, frame):
        again = self.requested is not None or self._deliveries() > 1
        self.requested = signum
        if self.in_loop and not again:
            if signum == signal.SIGINT:
                log.info("Ctrl-C: stopping after this step to save a resumable checkpoint (Ctrl-C again to quit at once)")
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # the CLI names the checkpoints already on disk
        message = self.describe()
        if self.run_dir is not None and self.run_dir.checkpoint_files():
            message += (f"; the checkpoints in {self.run_dir.checkpoints} are kept; resume with: "
                        f"rwkvtune train --resume {self.run_dir.path}")
        raise Terminated(message, signum)


def interrupted_message(run_dir) -> str:
    """What an immediate Ctrl-C leaves: the checkpoints of ``run_dir`` (a RunDir, None when the run's
    directory is not known yet) and the command that resumes them, or that there is nothing to resume."""
    if run_dir is not None and run_dir.checkpoint_files():
        return f"the checkpoints in {run_dir.checkpoints} are kept; resume with: rwkvtune train --resume {run_dir.path}"
    return "no checkpoint was saved yet, so there is nothing to resume; rerun the command to start again"


@contextlib.contextmanager
def graceful_stop() -> Iterator[GracefulStop]:
    """Install a :class:`GracefulStop` for SIGTERM and SIGINT while the block runs (main thread
    only: Python sets handlers nowhere else); the previous handlers are restored on exit."""
    stop = GracefulStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    with _wakeup_socket() as stop.wakeup:
        try:
            yield stop
        finally:
            for signum, handler in previous.items():
                # None: the previous handler was not set from Python; the default is the nearest we can do
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def _wakeup_socket() -> Iterator[socket.socket | None]:
    """The read end of a socketpair installed with ``signal.set_wakeup_fd``, which gets one byte
    (the signal number) per delivery; None where another wakeup fd is in use (an event loop's: it
    is left alone, and coalesced signals then count once)."""
    read, write = socket.socketpair()
    for sock in (read, write):
        sock.setblocking(False)
    previous = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
    try:
        if previous != -1:
            signal.set_wakeup_fd(previous)
            yield None
        else:
            yield read
    finally:
        if previous == -1:
            signal.set_wakeup_fd(-1)
        read.close()
        write.close()
