"""rwkvtune.log: user messages on stderr, printed by rank 0 alone under torchrun (RANK), once, and
above the training progress line while one is open."""

from __future__ import annotations

import io

import pytest

from rwkvtune import log
from rwkvtune.configs import model_loader
from rwkvtune.data.formats import read_samples
from rwkvtune.tokenizer import get_tokenizer
from rwkvtune.train.progress import Progress


def _say_all():
    log.info("a plain message")
    log.note("a note")
    log.warn("a warning")


@pytest.mark.parametrize("rank", [None, "0"])
def test_main_process_prints_each_message_once(capsys, monkeypatch, rank):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)  # not under torchrun
    else:
        monkeypatch.setenv("RANK", rank)
    _say_all()
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is for results
    assert captured.err.splitlines() == ["a plain message", "note: a note", "warning: a warning"]


def test_other_ranks_are_silent(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not log.main_process()
    _say_all()
    assert capsys.readouterr() == ("", "")
    log.emit("this process's own line")  # what differs between processes is said by each
    assert capsys.readouterr().err == "this process's own line\n"


def test_a_real_warning_is_said_once_by_rank_0(capsys, monkeypatch, tmp_path):
    """A library warning (a $RWKVTUNE_CONFIG_PATH entry that does not exist) is silent on rank 1
    and one line on rank 0."""
    missing = tmp_path / "missing"
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(missing))
    monkeypatch.setattr(model_loader, "_warned_missing", set())
    monkeypatch.setenv("RANK", "1")
    model_loader.config_dirs()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(model_loader, "_warned_missing", set())
    monkeypatch.setenv("RANK", "0")
    model_loader.config_dirs()
    model_loader.config_dirs()  # said once per entry
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: $RWKVTUNE_CONFIG_PATH entry") and str(missing) in err[0]


def test_skipped_records_are_said_once_by_rank_0(capsys, monkeypatch, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\nnot json\n')
    tok = get_tokenizer()
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        read_samples(str(path), tok, on_error="skip")
        err = capsys.readouterr().err.splitlines()
        assert len(err) == lines, (rank, err)
    assert err[0].startswith("warning: ") and "skipped 1" in err[0]


def test_messages_go_above_an_open_progress_line(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    stream = io.StringIO()
    bar = Progress(10, stream=stream, tty=True, ticker=False, clock=lambda: 0.0)
    bar.begin_step(0)
    bar.tick("micro-batch", 1, 2)
    bar.write("drawn")  # draws the line
    log.warn("during training")
    text = stream.getvalue()
    assert "\rwarning: during training\n" in text  # the line blanked, the message, the line again
    assert text.rstrip().split("\r")[-1].startswith("step 0/10")
    assert capsys.readouterr().err == ""  # not on stderr past the progress object
    bar.close()
    assert log.sink() is None  # closing restores plain stderr
    log.warn("after training")
    assert capsys.readouterr().err == "warning: after training\n"


def test_a_disabled_progress_line_is_not_a_sink(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    stream = io.StringIO()
    with Progress(3, stream=stream, tty=True, ticker=False, enabled=False):
        log.info("plain")
    assert stream.getvalue() == "" and capsys.readouterr().err == "plain\n"
