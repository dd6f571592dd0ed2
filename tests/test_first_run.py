"""Defaults that work the first time (issue 22): a schedule that cannot learn says what to change,
``--dry-run`` leads with its verdict, and ``plan`` weighs host RAM."""

import json
import re
import subprocess
import sys

import pytest

from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.setup_checks import MIN_LEARNING_STEPS, schedule_warnings


def _schedule(per_epoch=None, **kw):
    """A resolved config and its step count: ``per_epoch`` steps per pass over the data (the run
    has epochs x per_epoch steps), or --max-steps."""
    cfg = TrainConfig(**{"lr": 1e-5, "lr_final": 1e-6, "batch_size": 1, **kw})
    return cfg, cfg.max_steps or cfg.epochs * per_epoch


def _follow(cfg, total, per_epoch, advice: str):
    """The config and steps after applying the first fix of ``advice`` (the flags it names)."""
    first = advice.split(", or ")[0]
    changes = dict(re.findall(r"--([a-z-]+) (?:to )?(\d+)", first))
    new = TrainConfig(**{**cfg.to_dict(), **{k.replace("-", "_"): int(v) for k, v in changes.items()}})
    return new, new.max_steps or new.epochs * per_epoch


def test_the_default_run_on_a_small_file_says_it_cannot_learn_and_what_to_change():
    # The run: own .pth, defaults, a small file: ctx 1024, batch 1 -> 2 windows, 2 steps, warmup 10.
    cfg, total = _schedule(per_epoch=2, warmup_steps=10)
    [line] = schedule_warnings(cfg, total)
    assert line.startswith("warning: warmup_steps 10 >= the run's 2 steps: the learning rate only reaches 1.09e-06 "
                           "of its peak 1e-05, so the loss may barely move; lower --warmup-steps to 1 and pass "
                           "--epochs 5 (10 steps, 1 of warmup), or keep --warmup-steps 10 with --epochs 50 (100 steps)")
    assert line.endswith("more data also gives more steps per epoch")
    new, steps = _follow(cfg, total, 2, line)
    assert (new.epochs, new.warmup_steps, steps) == (5, 1, 10) and schedule_warnings(new, steps) == []


@pytest.mark.parametrize("per_epoch, kw", [
    (2, dict(warmup_steps=10)),
    (1, dict(warmup_steps=0)),
    (3, dict(warmup_steps=2, epochs=2)),
    (7, dict(warmup_steps=0, grad_accum=2)),
    (40, dict(warmup_steps=50)),
    (None, dict(warmup_steps=10, max_steps=3)),
    (None, dict(warmup_steps=0, max_steps=9)),
    (None, dict(warmup_steps=500, max_steps=100)),
])
def test_every_schedule_that_cannot_learn_is_named_and_its_advice_gives_one_that_can(per_epoch, kw):
    cfg, total = _schedule(per_epoch, **kw)
    assert total < MIN_LEARNING_STEPS or cfg.warmup_steps >= total
    [line] = schedule_warnings(cfg, total)
    assert f"{total} " in line and "so the loss may barely move" in line
    new, steps = _follow(cfg, total, per_epoch, line)
    assert steps >= MIN_LEARNING_STEPS and new.warmup_steps < steps
    assert schedule_warnings(new, steps) == [], line
    if per_epoch is None:
        assert "--epochs" not in line and "more data" not in line  # --max-steps decides the length
    if cfg.batch_size * cfg.grad_accum > 1 and per_epoch:
        assert "a smaller --batch-size or --grad-accum" in line


def test_a_schedule_that_learns_is_not_warned_about():
    for per_epoch, kw in [(10, dict(warmup_steps=1)), (5, dict(warmup_steps=0, epochs=2)),
                          (None, dict(warmup_steps=10, max_steps=11))]:
        assert schedule_warnings(*_schedule(per_epoch, **kw)) == []
