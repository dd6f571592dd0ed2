"""The reward worker: GRPO's reward functions run in a separate Python process.

A reward function is user code (or a user's regular expression). Run in the trainer's process, a
``sys.exit(0)`` or ``os._exit(0)`` inside it would end training with status 0 and nothing said,
and a function (or a file at import) that never returns would hang the run forever. In a worker
process:

* ``SystemExit`` and ``KeyboardInterrupt`` raised by a function are caught there and reported;
  ``os._exit``, a crash or a kill ends only the worker, which the trainer sees as end-of-file;
* every call, and the import of every reward file, has a deadline (``reward_timeout``); past it
  the worker is killed.

Either way the run stops with one line naming the reward function (a :class:`RewardError`):
policy, not restart, because a function that exits or hangs once would do it again, and a
restarted worker would hide a bug that decides what the policy learns.

The worker is started once per run (``python -c`` importing this module and
:mod:`rwkvtune.train.rewards`, neither of which imports torch) and serves every call: a call costs
two pipe messages (JSON lines) and their encoding, not a process start (``bench/bench_rewards.py``
measures it). Messages travel on two pipes of their own, so what a reward function prints reaches
the trainer's stdout/stderr as before and cannot corrupt them. JSON, not pickle: nothing the
trainer reads back from the worker can run code. The worker ignores SIGINT and SIGTERM (Ctrl-C in
a terminal reaches the whole process group: the trainer finishes its step and saves; the worker
must not die under it) and exits when its request pipe closes or its parent process goes away.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from rwkvtune.errors import ConfigError
from rwkvtune.train.rewards import RewardError, RewardFunction, build_reward, reward_values

# Seconds for the worker's interpreter to start and import this module (before any reward file is
# imported, which reward_timeout bounds): generous, for a loaded machine.
START_TIMEOUT_S = 60.0
# Seconds a closing worker may take to exit after its request pipe closes, before it is killed.
CLOSE_TIMEOUT_S = 2.0
_CHUNK = 1 << 16


class RewardWorker:
    """One worker process running the reward functions of ``funcs`` (parsed specs), by index.

    Started by the constructor, which waits until every function is built (user files imported);
    :meth:`call` runs one function; :meth:`close` stops the process (also done at garbage
    collection and interpreter exit, so a forgotten worker never outlives its trainer).
    """

    def __init__(self, funcs: list[RewardFunction], timeout: float):
        self.funcs, self.timeout = list(funcs), float(timeout)
        self._buf = b""
        self.proc = None
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        # The child imports this copy of rwkvtune, wherever the trainer found it.
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                          if p))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from rwkvtune.train.reward_worker import serve; serve()", str(req_r),
                 str(res_w)], pass_fds=(req_r, res_w), stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)
            raise RewardError(f"could not start the reward worker process ({sys.executable}): {e}") from e
        os.close(req_r)
        os.close(res_w)
        self._out, self._in = req_w, res_r
        self._finalizer = weakref.finalize(self, _stop, self.proc, req_w, res_r)
        for func in self.funcs:
            func.worker = self
        self._start()

    # -- lifecycle
    def _start(self) -> None:
        self._receive(time.monotonic() + START_TIMEOUT_S, lambda: (
            f"the reward worker process did not start within {START_TIMEOUT_S:g} s; the machine may be "
            f"overloaded, try again"), None)
        self._send({"specs": [f.spec for f in self.funcs]}, None)
        while True:
            msg = self._receive(time.monotonic() + self.timeout, None, None)
            if "loading" in msg:  # the deadline is per reward file
                func = self.funcs[msg["loading"]]
                msg = self._receive(time.monotonic() + self.timeout, lambda f=func: (
                    f"--reward {f.spec!r}: importing {f.source} did not finish within reward_timeout="
                    f"{self.timeout:g} s; the worker was stopped. Fix what the file runs at import (or raise "
                    f"reward_timeout)"), None, kind=ConfigError)
            if "error" in msg:
                self.close()
                raise ConfigError(msg["error"])
            if msg.get("ready"):
                return

    def close(self) -> None:
        """Stop the worker: its request pipe closes (it exits), then a kill if it has not."""
        if self.proc is not None:
            self._finalizer()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self._finalizer.alive and self.proc.poll() is None

    # -- calls
    def call(self, func: RewardFunction, prompts: list, completions: list, fields: dict) -> list[float]:
        """``func``'s rewards for the completions, as floats (any finite or non-finite value); a
        :class:`RewardError` naming ``func`` for anything else (raise, exit, hang, wrong output)."""
        if self.proc is None or not self._finalizer.alive:
            raise RewardError(f"{func.describe()}: the reward worker process is stopped (an earlier reward failed); "
                              f"start the run again")
        if self.proc.poll() is not None:  # died between calls (killed from outside, say)
            self._died(func, "before this function was called")
        try:
            request = json.dumps({"i": self.funcs.index(func), "prompts": prompts, "completions": completions,
                                  "fields": fields})
        except (TypeError, ValueError) as e:
            raise RewardError(f"{func.describe()}: the records' fields cannot be sent to the reward worker as JSON "
                              f"({e}); give fields of JSON values (strings, numbers, lists, objects)") from e
        deadline = time.monotonic() + self.timeout
        self._send(request, func, deadline)
        msg = self._receive(deadline, lambda: (
            f"{func.describe()} did not return within reward_timeout={self.timeout:g} s for {len(completions)} "
            f"completions; the worker was stopped. Make the function faster (or raise reward_timeout)"), func)
        if "values" in msg:
            return msg["values"]
        if "exit" in msg:
            self.close()
            raise RewardError(f"{func.describe()} raised {msg['exit']}; a reward function must return one number per "
                              f"completion, not exit (the run stops here)")
        raise RewardError(f"{func.describe()} {msg['error']}")

    # -- the pipes
    def _send(self, msg, func, deadline: float | None = None) -> None:
        data = (msg if isinstance(msg, str) else json.dumps(msg)).encode() + b"\n"
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        view = memoryview(data)
        while view:
            # A worker busy elsewhere cannot read: wait for room in the pipe, up to the deadline.
            if not select.select([], [self._out], [], max(0.0, deadline - time.monotonic()))[1]:
                self._fail(func, lambda: f"{_who(func)}: the reward worker did not read its request within "
                                         f"reward_timeout={self.timeout:g} s; the worker was stopped")
            try:
                view = view[os.write(self._out, view[:_CHUNK]):]
            except BrokenPipeError:
                self._died(func)

    def _receive(self, deadline: float, timed_out, func, kind=RewardError) -> dict:
        while b"\n" not in self._buf:
            if not select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))[0]:
                self._fail(func, timed_out or (lambda: f"{_who(func)}: no answer from the reward worker"), kind)
            data = os.read(self._in, _CHUNK)
            if not data:
                self._died(func)
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _fail(self, func, message, kind=RewardError):
        if self.proc.poll() is None:
            self.proc.kill()  # hung: no point waiting for it to read end-of-file
        self.close()
        raise kind(message())

    def _died(self, func, when: str = "while this function ran"):
        """The worker's end of the pipes closed: it exited or was killed."""
        try:
            status = self.proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = None
        self.close()
        if status is None:
            how = "closed its pipes"
        elif status < 0:
            name = signal.Signals(-status).name if -status in signal.valid_signals() else str(-status)
            how = f"was killed by {name}" + (" (out of memory?)" if -status == signal.SIGKILL else "")
        else:
            how = f"exited with status {status} (os._exit or a crash)"
        if func is None:  # while importing the reward files
            raise ConfigError(f"--reward: the reward worker process {how} while importing the reward files "
                              f"({', '.join(f.spec for f in self.funcs if f.source)}); a reward file must not exit "
                              f"at import")
        raise RewardError(f"{func.describe()}: the reward worker process {how} {when}; a reward "
                          f"function must return one number per completion, not end the process (the run stops "
                          f"here)")


def _who(func) -> str:
    return func.describe() if func is not None else "--reward"


def _stop(proc, req_w: int, res_r: int) -> None:
    """Close the pipes (an idle worker then exits on its own), wait briefly, then kill."""
    for fd in (req_w, res_r):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        proc.wait(timeout=0 if proc.poll() is not None else CLOSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_rewards(funcs: list[RewardFunction], timeout: float) -> RewardWorker:
    """A worker running ``funcs`` (every one: a built-in's regular expression can hang too)."""
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ConfigError(f"reward_timeout: found {timeout!r}, expected a finite number of seconds > 0")
    return RewardWorker(funcs, timeout)


# ---- the worker process ---------------------------------------------------------------------------


def serve() -> None:
    """The worker's main loop: build the functions, then answer one request per line until the
    request pipe closes. Never raises: every outcome is a message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    req, res = int(sys.argv[1]), int(sys.argv[2])
    _watch_parent(os.getppid())
    reader = os.fdopen(req, "rb")

    def send(msg) -> None:
        data = json.dumps(msg).encode() + b"\n"
        while data:
            data = data[os.write(res, data):]

    send({"started": True})
    line = reader.readline()
    if not line:
        return
    funcs = []
    for i, spec in enumerate(json.loads(line)["specs"]):
        is_file = spec.rpartition(":")[0].endswith(".py")
        if is_file:
            send({"loading": i})
        try:
            funcs.append(build_reward(spec))
        except BaseException as e:  # noqa: B036  SystemExit/KeyboardInterrupt at import are reported too
            text = str(e) if isinstance(e, ConfigError) else (f"--reward {spec!r}: importing raised "
                                                              f"{type(e).__name__}: {_one_line(e)}; fix that file")
            send({"error": text})
            return
    send({"ready": True})
    while line := reader.readline():
        request = json.loads(line)
        fn, n = funcs[request["i"]], len(request["completions"])
        try:
            out = fn(request["prompts"], request["completions"], **request["fields"])
        except (SystemExit, KeyboardInterrupt) as e:
            send({"exit": f"{type(e).__name__}" + (f"({_one_line(e)})" if str(e) else "")})
            continue
        except BaseException as e:  # noqa: B036  anything else a function raises is its failure
            send({"error": f"failed: {type(e).__name__}: {_one_line(e)}"})
            continue
        try:
            send({"values": reward_values(out, n)})
        except RewardError as e:  # the output is not one number per completion
            send({"error": str(e)})
        except BaseException as e:  # noqa: B036  reading the output ran its code (a tolist(), a __float__)
            send({"error": f"returned an output that could not be read: {type(e).__name__}: {_one_line(e)}"})


def _watch_parent(parent: int) -> None:
    """Exit when the trainer is gone (killed with SIGKILL, say) even while a function hangs."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _one_line(text) -> str:
    return " ".join(str(text).split())
