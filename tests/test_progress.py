"""The progress line of a training run (rwkvtune.train.progress): driven by a fake clock without
its ticker thread, as the trainer drives it (begin_step, ticks inside the step, update per metrics
row); then once through a real tiny run."""

import io
import json

import pytest

from helpers import write_checkpoint
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.progress import Progress, duration


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _progress(total, tty, **kw):
    clock, stream = Clock(), io.StringIO()
    return Progress(total, stream=stream, tty=tty, clock=clock, ticker=False, **kw), clock, stream


def _run(p, clock, steps, log_every, micro=4, seconds_per_micro=0.5):
    """What the trainer does: each step's micro-batches tick, and a metrics row every log_every."""
    window = 0
    for step in range(steps):
        p.begin_step(step)
        for i in range(micro):
            p.tick("micro-batch", i, micro)
            clock.t += seconds_per_micro
            p.tick("micro-batch", i + 1, micro)
        window += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            p.set_postfix(loss=f"{2.0 / (step + 1):.4f}")
            p.update(window)
            window = 0
    p.close()


@pytest.mark.parametrize("steps, log_every", [(10, 3), (5, 1), (4, 4)])
def test_not_a_terminal_one_plain_line_per_metrics_row(steps, log_every):
    p, clock, stream = _progress(steps, tty=False)
    _run(p, clock, steps, log_every)
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == -(-steps // log_every), out  # one per row, the last (partial) window included
    assert lines[-1].startswith(f"step {steps}/{steps} (100%): loss ") and "ETA 0s" in lines[-1]
    assert lines[0].startswith(f"step {min(log_every, steps)}/{steps} ")


def test_terminal_line_is_redrawn_at_most_once_per_second_inside_a_step():
    # One step of 40 micro-batches of 1/8 s (5 s): 40 ticks, 5 redraws (the first, then one a second).
    p, clock, stream = _progress(1, tty=True)
    p.begin_step(0)
    for i in range(40):
        clock.t += 0.125
        p.tick("micro-batch", i + 1, 40)
    draws = stream.getvalue().split("\r")[1:]
    assert [d.split("micro-batch ")[1].split(",")[0] for d in draws] == ["1/40", "9/40", "17/40", "25/40", "33/40"]
    # The ETA counts the done part of the step: 33 of 40 micro-batches in 4.1 s leave 0.9 s.
    assert draws[-1].startswith("step 0/1 (0%) 4s elapsed, ETA 1s | step 1/1: micro-batch 33/40, 4s in"), draws[-1]
    p.close()
    assert stream.getvalue().endswith("\n")


def test_a_long_step_shows_life_on_a_terminal_and_in_a_log():
    # Nothing ticks for 5 min (one forward of a large model): the terminal line still moves each
    # second (the ticker's poll); a log file gets a "running" line per heartbeat.
    p, clock, stream = _progress(1, tty=True)
    p.begin_step(0)
    p.tick("micro-batch", 0, 1)
    for _ in range(3):
        clock.t += 1.0
        p.poll()
    draws = stream.getvalue().split("\r")[1:]
    assert [d.split(" | ")[1].strip() for d in draws] == [f"step 1/1: micro-batch 0/1, {s}s in" for s in range(4)]
    p.close()

    p, clock, stream = _progress(1, tty=False, heartbeat=60)
    p.begin_step(0)
    p.tick("micro-batch", 0, 1)
    for _ in range(314):  # 5 min 14 s, polled each second
        clock.t += 1.0
        p.poll()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in stream.getvalue()
    assert lines[0].startswith("step 0/1 (0%) done; running step 1/1: micro-batch 0/1, 1m00s in; 1m00s elapsed")
    assert "5m00s in" in lines[-1]


def test_messages_go_above_the_line_and_phases_are_named():
    p, clock, stream = _progress(3, tty=True)
    p.begin_step(0)
    p.tick("micro-batch", 1, 2)
    with p.phase("eval"):
        clock.t += 2
        p.tick("eval batch", 3, 9)
        assert "| eval: eval batch 3/9" in stream.getvalue().split("\r")[-1]
        p.write("step 1: eval_loss 1.0")
    tail = stream.getvalue()
    assert "step 1: eval_loss 1.0\n" in tail
    before = tail[:tail.index("step 1: eval_loss")]
    assert before.endswith("\r"), "the line is blanked before the message"
    assert p.inner == {"micro-batch": (1, 2)} and p.activity is None  # restored after the phase
    p.close()
    p.close()  # twice is fine


def test_disabled_progress_writes_nothing():
    p, clock, stream = _progress(3, tty=True, enabled=False)
    p.begin_step(0)
    p.tick("micro-batch", 1, 2)
    p.update(1)
    p.poll()
    p.close()
    assert stream.getvalue() == ""


def test_eta_and_durations():
    p, clock, _ = _progress(10, tty=False, initial=4)  # resumed at step 4: the pace counts from here
    assert p.eta() is None
    p.begin_step(4)
    clock.t += 10
    p.tick("micro-batch", 1, 2)  # half a step in 10 s: 5.5 steps left at 20 s each
    assert p.eta() == pytest.approx(110)
    assert [duration(s) for s in (0, 59.4, 194, 7500)] == ["0s", "59s", "3m14s", "2h05m"]
    p.close()


def test_training_ticks_micro_batches_and_logs_plain_lines(tmp_path, capsys, monkeypatch):
    """A real run with stderr captured (not a terminal): no carriage return, one line per
    log_every, and ticks for every micro-batch of every step, before the step is counted."""
    from rwkvtune.train.trainer import train

    ckpt = write_checkpoint(tmp_path / "base.pth", n_layer=1, n_embd=32, head_size=16, vocab=65536, d_decay=8,
                            d_aaa=8, d_mv=8, d_gate=8)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"red blue green cat dog {i}."}) + "\n" for i in range(12)))
    events = []
    tick, update = Progress.tick, Progress.update
    monkeypatch.setattr(Progress, "tick", lambda self, *a: (events.append(a), tick(self, *a)))
    monkeypatch.setattr(Progress, "update", lambda self, n=1: (events.append(("update", n)), update(self, n)))
    cfg = TrainConfig(model=ckpt, data=str(data), out=str(tmp_path / "run"), ctx_len=8, batch_size=1, grad_accum=3,
                      max_steps=4, log_every=2, warmup_steps=0, save_every=0, tensorboard=False)
    train(cfg)
    err = capsys.readouterr().err
    assert "\r" not in err
    rows = [line for line in err.splitlines() if line.startswith("step ") and "elapsed, ETA" in line]
    assert [r.split(":")[0] for r in rows] == ["step 2/4 (50%)", "step 4/4 (100%)"], err
    micro = [("micro-batch", i, 3) for i in range(3) for i in (i, i + 1)]
    assert events == (micro * 2 + [("update", 2)]) * 2
