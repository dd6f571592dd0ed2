"""--out never overwrites what is not this tool's run (issue 20): a directory is written into only
when it is missing, empty or marked as a run (rwkvtune-run.json, written first); an older run
without the marker is recognised by its checkpoints, to resume; --dry-run writes nothing at all and
is never refused for --out. Tiny model, a few steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import write_checkpoint
from rwkvtune.cli import main
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train import run_lock
from rwkvtune.train.run_dir import MARKER_NAME, RunDir
from rwkvtune.train.trainer import train

SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
USER_FILES = {"config.yaml": "my: own config\n", "metrics.jsonl": '{"mine": 1}\n', "loss.png": "not a plot"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("outdir")
    text = d / "text.jsonl"
    words = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "eats"]
    text.write_text("".join(json.dumps({"text": " ".join(words[(i * 5 + j) % 9] for j in range(10))}) + "\n"
                            for i in range(12)))
    bad = d / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    return {"text": str(text), "bad": str(bad), "ckpt": write_checkpoint(d / "base.pth", **SMALL)}


def _args(data, out, *extra, text=None):
    return ["train", "--model", data["ckpt"], "--data", text or data["text"], "--out", str(out), "--ctx-len", "16",
            "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "0", "tensorboard=false", *extra]


def _cfg(data, out, **kw):
    base = dict(model=data["ckpt"], data=data["text"], out=str(out), ctx_len=16, batch_size=2, max_steps=1,
                warmup_steps=0, save_every=1, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and directory under ``root``: its bytes (files) and mtime in ns."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
    return out


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name, text in USER_FILES.items():
        (path / name).write_text(text)
    return path


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_out_holding_a_users_files_is_refused_and_left_untouched(data, tmp_path, capsys):
    """The attack: a directory with the user's config.yaml, metrics.jsonl and loss.png (no run)."""
    out = _user_dir(tmp_path / "mine")
    before = _snapshot(tmp_path)
    line = _error_line(capsys, _args(data, out))
    assert f"--out {out}: the directory holds files that are not a rwkvtune run's" in line
    assert "config.yaml, loss.png, metrics.jsonl" in line and f"no {MARKER_NAME}" in line and "choose a new" in line
    assert _snapshot(tmp_path) == before  # not a byte written, not even the lock or the marker


@pytest.mark.parametrize("case", ["users_files", "finished_run", "missing", "file_in_the_way"])
def test_dry_run_writes_nothing_and_is_never_refused_for_out(data, tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "out"
    if case == "users_files":
        _user_dir(out)
    elif case == "finished_run":
        train(_cfg(data, out))
    elif case == "file_in_the_way":
        out.write_text("a file")
    before = _snapshot(tmp_path)
    assert main(_args(data, out, "--dry-run")) == 0
    err = capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    notes = [line for line in err.splitlines() if line.startswith("note: the run itself would be refused")]
    assert len(notes) == (0 if case == "missing" else 1), err
    if notes:
        assert f"--out {out}" in notes[0]


def test_a_new_run_writes_the_marker_before_anything_else(data, tmp_path, monkeypatch):
    out = tmp_path / "a" / "run"
    seen = []
    lock = run_lock._lock_path_fd

    def spy(path):
        seen.append(sorted(os.listdir(out)))  # what the directory holds when the lock is taken
        return lock(path)

    monkeypatch.setattr(run_lock, "_lock_path_fd", spy)
    train(_cfg(data, out))
    assert seen == [[MARKER_NAME]]
    info = json.loads((out / MARKER_NAME).read_text())
    assert info["tool"] == "rwkvtune" and RunDir(out).ownership() == "own"


def test_an_empty_directory_is_used_and_a_failed_setup_leaves_it_as_it_was(data, tmp_path, capsys):
    empty, missing = tmp_path / "empty", tmp_path / "new" / "run"
    empty.mkdir()
    for out in (empty, missing):  # bad data fails after the lock was taken and the marker written
        assert "expected a 'text'" in _error_line(capsys, _args(data, out, text=data["bad"]))
    assert os.listdir(empty) == [] and not (tmp_path / "new").exists()
    assert main(_args(data, empty)) == 0
    assert RunDir(empty).ownership() == "own" and (empty / "final.pth").is_file()


def test_an_older_run_without_the_marker_resumes_and_is_marked_then(data, tmp_path, capsys):
    """Runs of versions before the marker: a directory with resumable checkpoints is a run."""
    out = tmp_path / "old"
    train(_cfg(data, out))
    (out / MARKER_NAME).unlink()
    assert RunDir(out).ownership() == "legacy"
    line = _error_line(capsys, _args(data, out))  # a new run: as any run that holds checkpoints
    assert "already holds a run" in line and f"--resume {out}" in line
    assert main(["train", "--resume", str(out), "--max-steps", "2"]) == 0
    assert RunDir(out).is_marked() and json.loads((out / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("marker", ["not json {", '{"tool": "other"}', "[1, 2]", "link", "dir", "huge"])
def test_a_forged_or_damaged_marker_does_not_make_a_directory_a_run(data, tmp_path, capsys, marker):
    out = _user_dir(tmp_path / "mine")
    path = out / MARKER_NAME
    if marker == "link":  # to a real marker elsewhere: a link is never trusted
        real = tmp_path / "real"
        real.mkdir()
        RunDir(real).mark()
        path.symlink_to(real / MARKER_NAME)
    elif marker == "dir":
        path.mkdir()
    elif marker == "huge":
        path.write_text(json.dumps({"tool": "rwkvtune", "pad": "x" * 10000}))
    else:
        path.write_text(marker)
    assert RunDir(out).ownership() == "foreign"
    before = _snapshot(out)
    assert "not a rwkvtune run's" in _error_line(capsys, _args(data, out))
    assert _snapshot(out) == before


def test_the_lock_refuses_to_mark_a_directory_filled_since_the_check(tmp_path):
    """Between the check and taking the lock someone's files appeared: nothing is marked or locked."""
    out = _user_dir(tmp_path / "late")
    with pytest.raises(ConfigError, match="not a rwkvtune run's"):
        with run_lock.hold(RunDir(out)):
            pass
    assert sorted(os.listdir(out)) == sorted(USER_FILES)
