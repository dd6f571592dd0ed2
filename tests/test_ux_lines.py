"""The lines people read: counts in the right number, where the CPU thread count came from, and a
deliberate Ctrl-C that reads as a stop, not an error."""

from __future__ import annotations

import json

import pytest

from helpers import write_checkpoint
from rwkvtune.cli import main
from rwkvtune.utils import plural

SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


def test_plural():
    assert [plural(n, "window") for n in (0, 1, 2)] == ["0 windows", "1 window", "2 windows"]
    assert plural(1, "process", "processes") == "1 process" and plural(3, "process", "processes") == "3 processes"
    assert plural(51339, "token", grouped=True) == "51,339 tokens"


def test_a_one_window_one_step_run_says_so(tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "red blue green cat dog bird."}) + "\n")
    ckpt = write_checkpoint(tmp_path / "base.pth", **SMALL)
    assert main(["train", "--model", ckpt, "--data", str(one), "--out", str(tmp_path / "run"), "--ctx-len", "64",
                 "--batch-size", "1", "--max-steps", "1", "--save-every", "0", "--threads", "1",
                 "tensorboard=false"]) == 0
    err = capsys.readouterr().err
    assert ", 1 window, 1 step of up to 8 tokens" in err and "the run's 1 step: " in err, err
    assert "1 CPU thread (--threads)" in err
    assert "1 windows" not in err and "1 steps" not in err and "1 records" not in err


@pytest.mark.parametrize("env,threads,said", [
    ({}, None, "torch's default; set with --threads"),
    ({"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x"}, None,
     "from OMP_NUM_THREADS=1 (torchrun sets it to 1 unless you do); set with --threads"),
    ({"OMP_NUM_THREADS": "3"}, None, "from OMP_NUM_THREADS=3; set with --threads"),
    ({"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x"}, 4, "--threads"),
])
def test_the_thread_count_names_where_it_came_from(monkeypatch, env, threads, said):
    from rwkvtune.train.trainer import threads_origin

    for name in ("OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert threads_origin(threads) == said


def test_ctrl_c_in_any_command_is_a_calm_line_and_exit_130(monkeypatch, capsys):
    import rwkvtune.cli.generate as gen

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "run", interrupted)
    assert main(["generate", "--model", "m.pth", "--prompt", "x"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "stopped by Ctrl-C", err
