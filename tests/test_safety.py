"""Newcomer and safety: one run per directory, full disks, divergence, damaged inputs, signals and
the first steps of a new user. Tiny models; the file systems' failures are real where a test can
cause them (a file-size limit makes torch.save and plain writes fail as a full disk does)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import make_state_dict, write_checkpoint
from rwkvtune.cli import main
from rwkvtune.errors import CheckpointError, DataError, OutputError, RwkvtuneError
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.trainer import train

SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    text = d / "text.jsonl"
    words = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "eats"]
    text.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % 9] for j in range(8 + i % 5))}) + "\n"
                            for i in range(24)))
    return {"text": str(text), "ckpt": write_checkpoint(d / "base.pth", **SMALL), "dir": d}


def _cfg(fixture, out, **kw):
    base = dict(model=fixture["ckpt"], data=fixture["text"], out=str(out), ctx_len=16, batch_size=2, max_steps=2,
                lr=1e-3, warmup_steps=0, save_every=0, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _train_args(fixture, out, *extra):
    return ["train", "--model", fixture["ckpt"], "--data", fixture["text"], "--out", str(out), "--ctx-len", "16",
            "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "tensorboard=false", *extra]


def _error_line(capsys, argv, status=2) -> str:
    """The one error line of a failed command (its exit status checked, no traceback)."""
    assert main(argv) == status, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail (EFBIG) as on a full disk: torch.save raises its RuntimeError,
    plain writes their OSError. SIGXFSZ, which would kill the process, is ignored meanwhile."""
    resource = pytest.importorskip("resource")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


# ---- 1. one run per directory ---------------------------------------------------------------


def test_a_second_run_in_a_locked_directory_names_the_holder_and_kill_9_leaves_no_stale_lock(data, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rwkvtune", *_train_args(data, out, "--max-steps", "100000", "--save-every", "1")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "step-0000001.pt").exists():
            time.sleep(0.05)
        line = _error_line(capsys, ["train", "--resume", str(out), "--max-steps", "3"])
        assert f"--resume {out}: another run is using this directory (pid {first.pid} on host " in line
        assert "rwkvtune train --model" in line and "wait for it to finish or stop it" in line
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the lock with the process: the run resumes at once.
    steps = int((out / "checkpoints" / "latest").read_text().strip()[5:12])
    assert train(TrainConfig(resume=str(out), max_steps=steps + 1))["steps"] == steps + 1
    assert not (out / "run.lock").exists()  # removed on release


def test_lock_is_released_and_a_failed_setup_leaves_no_directory(data, tmp_path):
    from rwkvtune.train import run_lock
    from rwkvtune.train.run_dir import RunDir

    run = RunDir(tmp_path / "a" / "b")
    with run_lock.hold(run):
        holder = json.loads(run.lock.read_text())
        assert holder["pid"] == os.getpid() and holder["command"]
        with pytest.raises(run_lock.RunDirLocked, match=f"pid {os.getpid()}"):
            with run_lock.hold(run):
                pass
    assert not (tmp_path / "a").exists()  # created only for the lock, and left empty
    with pytest.raises(DataError):
        train(_cfg(data, tmp_path / "bad", data=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "bad").exists()


# ---- 2. full disks -------------------------------------------------------------------------


def test_full_disk_at_the_resumable_checkpoint_keeps_final_and_says_the_space(data, tmp_path):
    out = tmp_path / "run"
    # final.pth (bf16, 8.4 MB) fits; the checkpoint (fp32 weights and AdamW state, 50 MB) does not.
    with file_size_limit(30_000_000), pytest.raises(OutputError) as e:
        train(_cfg(data, out))
    msg = str(e.value)
    assert msg.startswith(f"{out / 'checkpoints' / 'step-0000002.pt'}: cannot write: ") and "\n" not in msg
    assert "it needs about 50.7 MB" in msg and "free there" in msg
    assert f"the trained model is saved: {out / 'final.pth'}" in msg
    assert RWKV7.from_checkpoint(out / "final.pth") is not None  # complete
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_full_disk_at_a_sharded_checkpoint_is_one_line_too(data, tmp_path):
    out = tmp_path / "run"
    with file_size_limit(30_000_000), pytest.raises(OutputError) as e:
        train(_cfg(data, out, strategy="fsdp"))
    msg = str(e.value)
    assert msg.startswith(f"{out / 'checkpoints' / 'step-0000002'}: cannot write: ") and "it needs about 50.7 MB" in msg
    assert f"the trained model is saved: {out / 'final.pth'}" in msg
    assert not (out / "checkpoints" / ".step-0000002.tmp").exists() and (out / "final.pth").is_file()


def test_atomic_write_says_no_space_and_the_bytes_needed(tmp_path, monkeypatch):
    from rwkvtune import utils

    target = tmp_path / "x.bin"
    target.write_bytes(b"previous")

    def write_then_fail(tmp):
        Path(tmp).write_bytes(b"0" * 3000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"x.bin: cannot write: No space left on device; it needs about 2.0 MB "
                                          r"\(.* free there\); free some space or choose another location; files "
                                          r"written before are intact"):
        utils._atomic_write(target, write_then_fail, needed=2_000_000)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["x.bin"]
    # torch.save's own failure (a RuntimeError without errno): judged by the free space
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with file_size_limit(100_000), pytest.raises(OutputError, match="x.bin: cannot write: not enough space on the "
                                                                    "device; it needs about 5.0 MB"):
        utils.atomic_torch_save({"w": torch.zeros(1_250_000)}, target)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["x.bin"]


def test_merge_prepare_and_export_on_a_full_disk_are_one_line(data, tmp_path, capsys):
    from rwkvtune.peft.lora import apply_lora, save_adapter

    model = RWKV7.from_checkpoint(data["ckpt"])
    apply_lora(model, ["att.key"], r=2, alpha=4)
    save_adapter(tmp_path / "adapter.pth", model)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"word{i} " * 200}) + "\n" for i in range(300)))
    with file_size_limit(1_000_000):  # the outputs are 8.4 MB, 320 KB and 8.4 MB
        merged = tmp_path / "merged.pth"
        line = _error_line(capsys, ["merge-lora", data["ckpt"], str(tmp_path / "adapter.pth"), str(merged)])
        assert line.startswith(f"error: {merged}: cannot write: ") and "it needs about 8.4 MB" in line
        line = _error_line(capsys, ["export", data["ckpt"], str(tmp_path / "hf")])
        assert line.startswith(f"error: {tmp_path / 'hf'}: cannot write: File too large") and "it needs about" in line
    with file_size_limit(100_000):
        line = _error_line(capsys, ["data", "prepare", str(big), "--out", str(tmp_path / "corpus"), "--workers", "1"])
        assert line.startswith(f"error: {tmp_path / 'corpus.bin'}: cannot write: File too large") and "needs" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pth", "big.jsonl"]


def test_a_run_that_takes_the_lock_removes_what_killed_writers_left(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(data, out, save_every=1))
    ck = out / "checkpoints"
    dead = 4_999_999  # above any pid_max: no such process
    stale = [out / f".final.pth.{dead}.0123abcd.tmp", ck / f".step-0000002.pt.{dead}.89abcdef.tmp",
             ck / ".step-0000003.tmp"]
    stale[0].write_bytes(b"torn")
    stale[1].write_bytes(b"torn")
    stale[2].mkdir()
    (stale[2] / "__0_0.distcp").write_bytes(b"shard")
    kept = [out / f".summary.json.{os.getpid()}.0123abcd.tmp", out / "notes.tmp", ck / "step-0000002.pt"]
    kept[0].write_text("a live writer's")
    kept[1].write_text("the user's")
    capsys.readouterr()
    train(TrainConfig(resume=str(out), max_steps=3))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert f"removed 3 temporary file(s) that an interrupted run left in {out}" in capsys.readouterr().err


# ---- 3. divergence -------------------------------------------------------------------------


def test_divergence_names_the_checkpoint_to_resume_and_a_resume_may_lower_the_lr(data, tmp_path, monkeypatch):
    import yaml

    import rwkvtune.train.loss as loss_mod
    from rwkvtune.train.trainer import TrainingDiverged

    real, calls = loss_mod.chunked_loss_sum, {"n": 0}

    def nan_from_step_4(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw) * (float("nan") if calls["n"] >= 4 else 1.0)

    monkeypatch.setattr(loss_mod, "chunked_loss_sum", nan_from_step_4)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train(_cfg(data, out, max_steps=6, save_every=1))
    # Checkpoints 2 and 3 are kept; 3's weights already give nan on step 4's batch: resume from 2.
    good = out / "checkpoints" / "step-0000002.pt"
    assert str(e.value) == (f"loss is nan at step 4; stopped without saving. Resume from the checkpoint of step 2 "
                            f"with a lower learning rate (this run's peak lr is 0.001): rwkvtune train --resume "
                            f"{good} --lr 0.0005")
    monkeypatch.setattr(loss_mod, "chunked_loss_sum", real)
    summary = train(TrainConfig(resume=str(good), lr=5e-4))
    assert summary["steps"] == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 5e-4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 5, 6]
    assert rows[2] == {"step": 2, "resumed": True, "schedule_changed": {"lr": {"from": 1e-3, "to": 5e-4}}}
    from rwkvtune.train.optim import lr_at

    assert rows[3]["lr"] == pytest.approx(lr_at(2, 5e-4, 1e-4, 0, 6))  # the new peak, the saved lr_final
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000005.pt", "step-0000006.pt"]


def test_divergence_without_a_usable_checkpoint_says_to_start_again(data, tmp_path, monkeypatch):
    import rwkvtune.train.loss as loss_mod
    from rwkvtune.train.trainer import TrainingDiverged

    monkeypatch.setattr(loss_mod, "chunked_loss_sum", lambda *a, **kw: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(TrainingDiverged, match=r"loss is inf at step 1; stopped without saving; no checkpoint was "
                                               r"saved yet \(save_every 0\): run the same command again with a "
                                               r"lower --lr \(this run's peak lr is 0.001, e.g. --lr 0.0005\)"):
        train(_cfg(data, tmp_path / "run"))


# ---- 4. non-finite and non-float tensors ----------------------------------------------------


@pytest.mark.parametrize("key, change, words", [
    ("head.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")),
     "tensor head.weight holds 32 non-finite value(s) (NaN or inf)"),
    ("blocks.1.att.w0", lambda t: t.masked_fill(t > 0, float("inf")), "tensor blocks.1.att.w0 holds"),
    ("head.weight", lambda t: (t * 10).long(), "tensor head.weight holds int64 values, expected floating-point"),
    ("emb.weight", lambda t: t.to(torch.complex64), "tensor emb.weight holds complex64 values"),
    ("blocks.0.att.r_k", lambda t: t.to_sparse(), "tensor blocks.0.att.r_k is stored as a sparse_coo tensor"),
])
def test_damaged_weights_are_refused_at_load_naming_the_tensor(tmp_path, key, change, words):
    sd = make_state_dict(**SMALL)
    sd[key] = change(sd[key])
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as e:
        RWKV7.from_checkpoint(tmp_path / "m.pth")
    assert str(e.value).startswith(f"{tmp_path / 'm.pth'}: {words}"), str(e.value)


def test_nan_adapter_and_generate_eval_of_a_nan_model_fail_in_one_line(data, tmp_path, capsys):
    from rwkvtune.peft.lora import apply_lora, load_adapter, save_adapter

    model = RWKV7.from_checkpoint(data["ckpt"])
    apply_lora(model, ["att.key"], r=2, alpha=4)
    with torch.no_grad():
        model.blocks[1].att.key.lora_B.fill_(float("nan"))
    save_adapter(tmp_path / "adapter.pth", model)
    with pytest.raises(CheckpointError, match="adapter tensor blocks.1.att.key.lora_B holds 64 non-finite"):
        load_adapter(RWKV7.from_checkpoint(data["ckpt"]), tmp_path / "adapter.pth")
    sd = make_state_dict(**SMALL)
    sd["ln_out.weight"][0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    for argv in (["generate", "--model", str(tmp_path / "nan.pth"), "--prompt", "hi", "--max-tokens", "3"],
                 ["eval", "--model", str(tmp_path / "nan.pth"), "--data", data["text"], "--ctx-len", "16"]):
        assert "tensor ln_out.weight holds 1 non-finite value(s)" in _error_line(capsys, argv)


@pytest.mark.parametrize("value, words", [
    (float("nan"), "state wkv_init holds 1 non-finite value(s)"),
    (1e30, "wkv_init holds values up to 1e+30 in magnitude"),
])
def test_eval_and_generate_refuse_the_same_bad_state(data, tmp_path, capsys, value, words):
    # eval --state once accepted a state that generate --state refused; both read through one loader now
    state = torch.zeros(SMALL["n_layer"], SMALL["n_embd"] // SMALL["head_size"], SMALL["head_size"],
                        SMALL["head_size"])
    state[1, 0, 2, 3] = value
    torch.save({"wkv_init": state}, tmp_path / "bad_state.pth")
    flags = ["--model", data["ckpt"], "--state", str(tmp_path / "bad_state.pth")]
    lines = [_error_line(capsys, ["eval", *flags, "--data", data["text"], "--ctx-len", "16"]),
             _error_line(capsys, ["generate", *flags, "--prompt", "hi", "--max-tokens", "3"])]
    for line in lines:
        assert line.startswith(f"error: --state {tmp_path / 'bad_state.pth'}: {words}"), line


# ---- 5. tracebacks that become one line -----------------------------------------------------


@pytest.fixture
def unreadable(monkeypatch):
    """deny(path): reading ``path`` fails with EACCES. chmod 000 does it for a normal user; root
    reads anything, so for root opening those paths raises PermissionError as well."""
    denied: set[str] = set()

    def deny(*paths):
        for p in paths:
            os.chmod(p, 0)
            denied.add(os.path.abspath(p))

    if os.geteuid() == 0:
        real_open, real_os_open = builtins.open, os.open

        def refuse(path):
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)) in denied:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

        def fake_open(file, *a, **kw):
            refuse(file)
            return real_open(file, *a, **kw)

        def fake_os_open(path, *a, **kw):
            refuse(path)
            return real_os_open(path, *a, **kw)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
    yield deny
    for p in denied:
        os.chmod(p, 0o644)


def test_unreadable_inputs_are_one_line_errors(data, tmp_path, unreadable, capsys):
    from rwkvtune.configs.model_loader import ModelConfig
    from rwkvtune.data.formats import read_samples
    from rwkvtune.models.rwkv7.config import load_recipe
    from rwkvtune.peft.state import load_state_file, save_state_file
    from rwkvtune.tokenizer import get_tokenizer

    model = RWKV7.from_checkpoint(data["ckpt"])
    ckpt, jsonl, recipe, config, state = (tmp_path / n for n in ("m.pth", "d.jsonl", "r.yaml", "c.json", "s.pth"))
    ckpt.write_bytes(Path(data["ckpt"]).read_bytes())
    jsonl.write_text('{"text": "hello"}\n')
    recipe.write_text("lr: 1e-4\n")
    config.write_text((Path(__file__).parents[1] / "examples" / "configs" / "rwkv7-tiny.json").read_text())
    save_state_file(state, torch.zeros(2, 2, 16, 16), model)
    unreadable(ckpt, jsonl, recipe, config, state)
    denied = "cannot read{}: permission denied; make it readable (chmod/chown) or run as its owner"
    for call, path, what in ((lambda: RWKV7.from_checkpoint(ckpt), ckpt, ""),
                             (lambda: read_samples(str(jsonl), get_tokenizer()), jsonl, ""),
                             (lambda: load_recipe(recipe), recipe, " the recipe"),
                             (lambda: ModelConfig.from_file(config), config, " the config"),
                             (lambda: load_state_file(state, model), state, " state file")):
        with pytest.raises(RwkvtuneError) as e:
            call()
        assert str(e.value) == f"{path}: " + denied.format(what)
    assert denied.format("") in _error_line(capsys, ["inspect", str(ckpt)])


def test_deep_and_lone_surrogate_records_are_bad_records_that_skip_skips(tmp_path, capsys):
    from rwkvtune.data.formats import BadRecordError, read_samples
    from rwkvtune.tokenizer import get_tokenizer

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100000 + "]" * 100000 + '\n{"text": "a\\ud800b"}\n')
    samples, stats = read_samples(str(path), get_tokenizer(), on_error="skip")
    assert len(samples) == 1 and stats.skipped == 2
    assert stats.skipped_examples[0] == f"{path}:2: malformed JSON (nested deeper than the JSON reader's recursion " \
                                        f"limit; no record format nests like that)"
    assert stats.skipped_examples[1].startswith(f"{path}:3: the text holds '\\ud800', a lone surrogate")
    with pytest.raises(BadRecordError, match=f"{path}:2: malformed JSON"):
        read_samples(str(path), get_tokenizer())
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "c"), "--on-data-error", "skip"]) == 0
    assert "skipped 2 bad records" in capsys.readouterr().out


def test_one_bad_user_config_does_not_break_models_list(tmp_path, monkeypatch, capsys, unreadable):
    tiny = (Path(__file__).parents[1] / "examples" / "configs" / "rwkv7-tiny.json").read_text()
    (tmp_path / "rwkv7-good.json").write_text(tiny)
    (tmp_path / "rwkv7-deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "rwkv7-surrogate.json").write_text(tiny.replace('"model_name": "', '"model_name": "\\ud800'))
    (tmp_path / "rwkv7-locked.json").write_text(tiny)
    unreadable(tmp_path / "rwkv7-locked.json")
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "0.1b" in out and "3 invalid config(s): deep, locked, surrogate" in out
    assert main(["models", "check"]) == 1
    out = capsys.readouterr().out
    assert "lone surrogate" in out and "recursion limit" in out and "permission denied" in out


def test_a_seed_out_of_range_is_refused_with_the_range(data, tmp_path, capsys):
    line = _error_line(capsys, _train_args(data, tmp_path / "s", "--seed", str(2 ** 70), "--dry-run"))
    assert f"seed: found {2 ** 70}, expected an integer with 0 <= seed <= 4294967295" in line


def test_a_model_too_large_to_allocate_says_its_size_and_what_to_change(data, tmp_path, capsys):
    if Path("/proc/sys/vm/overcommit_memory").is_file() and \
            Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("memory overcommit always on: a too-large allocation would succeed and then be killed")
    from rwkvtune.configs.model_loader import ModelConfig

    huge = ModelConfig(model_name="huge", n_layer=1, n_embd=65536, dim_att_lora=64, dim_gate_lora=64, dim_mv_lora=64,
                       vocab_size=1 << 22)  # within every range: 1.1 TB of fp32 embeddings alone
    with pytest.raises(RwkvtuneError, match=r"model huge \(n_layer 1, n_embd 65536, vocab_size 4194304, "
                                                   r"dim_ffn 262144: .* parameters, .* TB in float32\) cannot be "
                                                   r"allocated on cpu .*use a smaller config"):
        RWKV7.from_config(huge)


def test_a_pickle_that_inflates_far_beyond_any_model_is_not_read(tmp_path):
    import tracemalloc

    from rwkvtune.configs.detect import inspect_checkpoint
    from rwkvtune.peft.state import load_state_file

    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/version", "3\n")
        with zf.open("archive/data.pkl", "w", force_zip64=True) as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(100):  # 100 MB of zeros: 100 KB on disk
                f.write(chunk)
    assert bomb.stat().st_size < 1_000_000
    model = RWKV7.from_checkpoint(write_checkpoint(tmp_path / "m.pth", **SMALL))
    tracemalloc.start()
    try:
        for load in (RWKV7.from_checkpoint, inspect_checkpoint, lambda p: load_state_file(p, model)):
            with pytest.raises(CheckpointError, match="bomb.pth: its pickle archive/data.pkl declares 104.9 MB when "
                                                      "inflated"):
                load(bomb)
        assert tracemalloc.get_traced_memory()[1] < 20_000_000  # nothing was inflated
    finally:
        tracemalloc.stop()


# ---- 6. signals, the progress bar, symlink loops ---------------------------------------------


def test_two_ctrl_c_that_arrive_before_the_handler_runs_count_as_two():
    from rwkvtune.train.signals import graceful_stop

    with pytest.raises(KeyboardInterrupt):
        with graceful_stop() as stop:
            stop.in_loop = True
            # Delivered to (and caught at C level by) another thread, both before the main thread
            # runs Python's handler, which then runs once: only the wakeup fd saw two.
            sender = threading.Thread(target=lambda: [signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                                                      for _ in range(2)])
            sender.start()
            sender.join()
            time.sleep(0.05)


def test_the_error_line_is_the_last_line(data, tmp_path, monkeypatch, capsys):
    import rwkvtune.train.loss as loss_mod

    real = loss_mod.chunked_loss_sum
    calls = {"n": 0}

    def nan_at_step_2(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw) * (float("nan") if calls["n"] == 2 else 1.0)

    monkeypatch.setattr(loss_mod, "chunked_loss_sum", nan_at_step_2)
    assert main(_train_args(data, tmp_path / "run", "--max-steps", "3")) == 2
    err = capsys.readouterr().err
    last = [part for line in err.splitlines() for part in line.split("\r") if part.strip()][-1]
    assert last.startswith("error: loss is nan at step 2"), err[-2000:]


def test_a_symlink_loop_is_called_one(data, tmp_path, capsys):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    model_loop = tmp_path / "loop.pth"
    model_loop.symlink_to(model_loop)
    line = _error_line(capsys, _train_args(data, tmp_path / "r", "--data", str(loop), "--max-steps", "1"))
    assert f"{loop}: file is a symlink loop (the link leads back to itself)" in line
    line = _error_line(capsys, ["eval", "--model", str(model_loop), "--data", data["text"]])
    assert f"{model_loop}: checkpoint is a symlink loop" in line
    broken = tmp_path / "broken.jsonl"
    broken.symlink_to(tmp_path / "gone.jsonl")
    line = _error_line(capsys, ["data", "prepare", str(broken), "--out", str(tmp_path / "c")])
    assert f"input file not found: it is a broken symlink to {tmp_path / 'gone.jsonl'}" in line


# ---- 7. getting started --------------------------------------------------------------------


def test_warmup_longer_than_the_run_warns_threads_show_and_the_end_says_what_next(data, tmp_path, capsys):
    out = tmp_path / "run"
    before = torch.get_num_threads()  # 1 under the suite's workers (conftest), the cores otherwise
    n = 2 if before == 1 else 1  # another count than the process's, to see it restored
    assert main(_train_args(data, out, "--max-steps", "3", "--warmup-steps", "10", "--threads", str(n))) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["final"] == str(out / "final.pth")  # JSON for tools on stdout
    err = captured.err
    assert ("warning: warmup_steps 10 >= the run's 3 steps: the learning rate only reaches 0.000208 of its peak "
            "0.001, so the loss may barely move; lower --warmup-steps") in err
    assert f"device cpu, precision fp32, {n} CPU thread{'s' if n > 1 else ''} (--threads)" in err
    assert err.rstrip().splitlines()[-1] == (
        f"done: the model is in {out / 'final.pth'}; try it: rwkvtune generate --model {out} --prompt "
        f"'Hello'  or score it: rwkvtune eval --model {out} --data {data['text']}")
    assert torch.get_num_threads() == before  # restored after the run


def test_help_shows_defaults_choices_every_option_and_the_key_value_ones(capsys):
    import argparse

    from rwkvtune.cli import COMMANDS, build_parser

    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--mode {full,lora,state}" in text and "linear warmup steps (default: 10)" in text
    assert "Every option has a flag and can also be set as key=value or in a recipe;" in text
    assert main(["train", "--help-all"]) == 0
    text = capsys.readouterr().out
    assert "    log_every=1  [--log-every]\n        steps per metrics row" in text
    assert "    keep_checkpoints=2  [--keep-checkpoints]\n" in text and "    adam_eps=1e-18  [--adam-eps]\n" in text
    assert ("    tensorboard=null  [--tensorboard/--no-tensorboard]\n        TensorBoard logs" in text
            and "    lr=null  [--lr]\n" in text)
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not action.help:
                missing.append(" ".join(path + [action.option_strings[0] if action.option_strings else action.dest]))

    for cmd in COMMANDS:
        sub = next(a for a in build_parser([cmd.name])._actions if isinstance(a, argparse._SubParsersAction))
        walk(sub.choices[cmd.name], [cmd.name])
    assert missing == []
