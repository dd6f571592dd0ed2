"""Checkpoint manifests: every resumable checkpoint is checked against what was written before a
resume loads anything (rwkvtune.train.manifest). Each attack below used to resume silently (or
with a traceback); each is now one line naming the checkpoint, the tensor, expected vs found, and
the checkpoint to resume from instead."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import train_losses, write_checkpoint
from rwkvtune.errors import CheckpointError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.trainer import train

SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
COMMON = dict(ctx_len=16, batch_size=2, lr=1e-3, warmup_steps=0, save_dtype="fp32", tensorboard=False)
EMB = "model.emb.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step run saving every step, as one .pt per checkpoint and as sharded folders."""
    d = tmp_path_factory.mktemp("manifest")
    words = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "eats"]
    text = d / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j * 3) % 9] for j in range(8 + i % 5))})
                            + "\n" for i in range(24)))
    ckpt = write_checkpoint(d / "base.pth", **SMALL)
    cfg = dict(model=ckpt, data=str(text), max_steps=2, save_every=1, **COMMON)
    train(TrainConfig(out=str(d / "pt"), **cfg))
    train(TrainConfig(out=str(d / "sharded"), strategy="fsdp", **cfg))
    return d


def _copy(runs, kind, tmp_path) -> Path:
    out = tmp_path / kind
    shutil.copytree(runs / kind, out)
    (out / "summary.json").unlink()  # as if killed after the last checkpoint: the resume trains
    return out


def _resume_error(out, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        train(TrainConfig(resume=str(out), **kw))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _instead(out) -> str:
    prev = out / "checkpoints" / "step-0000001"
    return f"resume from {prev}"


# ---- .pt checkpoints -------------------------------------------------------------------------


def _edit_pt(out, edit, keep_manifest=True):
    path = out / "checkpoints" / "step-0000002.pt"
    ck = torch.load(path, weights_only=True)
    if not keep_manifest:
        del ck["manifest"]  # as written before manifests existed
    edit(ck)
    torch.save(ck, path)
    return path


def test_pt_checkpoint_carries_a_manifest_of_every_tensor_and_resumes(runs, tmp_path):
    ck = torch.load(runs / "pt" / "checkpoints" / "step-0000002.pt", weights_only=True)
    listed = ck["manifest"]["tensors"]
    assert listed[f"trainable/{EMB}"]["shape"] == [65536, 32] and listed[f"trainable/{EMB}"]["dtype"] == "float32"
    assert {f"optimizer/state/0/{k}" for k in ("exp_avg", "exp_avg_sq", "step")} <= set(listed)
    assert "rng/torch" in listed and ck["manifest"]["step"] == 2
    assert set(ck["manifest"]["values"]) == set(ck) - {"manifest"}
    out = _copy(runs, "pt", tmp_path)
    assert train(TrainConfig(resume=str(out), max_steps=3))["steps"] == 3


def test_pt_tensor_replaced_by_a_scalar_is_refused_not_broadcast(runs, tmp_path):
    out = _copy(runs, "pt", tmp_path)
    path = _edit_pt(out, lambda ck: ck["trainable"].__setitem__(EMB, torch.tensor(0.5)))
    msg = _resume_error(out)
    assert msg.startswith(f"{path}: tensor trainable/{EMB} has shape [], expected [65536, 32] (its manifest)")
    assert f"{_instead(out)}.pt instead" in msg and f"or delete {path}" in msg
    # without a manifest, the model's own shapes refuse it
    out = _copy(runs, "pt", tmp_path / "legacy")
    _edit_pt(out, lambda ck: ck["trainable"].__setitem__(EMB, torch.tensor(0.5)), keep_manifest=False)
    assert f"trainable tensor {EMB} has shape [], expected [65536, 32] (this model's)" in _resume_error(out)


def test_pt_wrong_shape_tensor_is_one_line_not_a_traceback(runs, tmp_path):
    out = _copy(runs, "pt", tmp_path)
    _edit_pt(out, lambda ck: ck["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3, 3)))
    assert "tensor optimizer/state/0/exp_avg has shape [3, 3], expected" in _resume_error(out)
    out = _copy(runs, "pt", tmp_path / "legacy")
    _edit_pt(out, lambda ck: ck["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3, 3)), keep_manifest=False)
    assert "optimizer state exp_avg of " in (msg := _resume_error(out)) and "has shape [3, 3], expected" in msg


def test_pt_deleted_tensor_is_refused_not_left_at_its_fresh_init(runs, tmp_path):
    out = _copy(runs, "pt", tmp_path)
    _edit_pt(out, lambda ck: ck["trainable"].pop(EMB))
    assert f"tensor trainable/{EMB} listed in its manifest is missing" in _resume_error(out)
    out = _copy(runs, "pt", tmp_path / "legacy")
    _edit_pt(out, lambda ck: ck["trainable"].pop(EMB), keep_manifest=False)
    assert f"trainable tensor {EMB} is missing (it would keep its fresh init)" in _resume_error(out)


def test_pt_flipped_bytes_are_refused_by_the_cli_in_one_line(runs, tmp_path):
    out = _copy(runs, "pt", tmp_path)
    path = out / "checkpoints" / "step-0000002.pt"
    emb = torch.load(path, weights_only=True)["trainable"][EMB]
    raw = bytearray(path.read_bytes())
    at = raw.find(emb.numpy().tobytes()[:256])
    assert at > 0
    raw[at + 4000] ^= 0x10  # one bit of one weight, inside the zip: torch.load reads it without a word
    path.write_bytes(bytes(raw))
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--resume", str(out), "--max-steps", "3"],
                         capture_output=True, text=True, timeout=120)
    err = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert err.startswith(f"error: {path}: tensor trainable/{EMB} has crc32 ") and "its bytes changed" in err
    assert f"{_instead(out)}.pt instead" in err
    assert len(train_losses(out)) == 2  # nothing trained on it


@pytest.mark.parametrize("step", [1000, -5])
def test_pt_step_out_of_range_is_refused(runs, tmp_path, step):
    out = _copy(runs, "pt", tmp_path)
    path = _edit_pt(out, lambda ck: ck.__setitem__("step", step))
    msg = _resume_error(out)
    want = "expected a whole number >= 0 (2, as its name says)" if step < 0 else \
        "step differs from its manifest (expected 2, found 1000)"
    assert msg.startswith(f"{path}: step ") and want in msg
    # without a manifest: the step in its name
    out = _copy(runs, "pt", tmp_path / "legacy")
    _edit_pt(out, lambda ck: ck.__setitem__("step", step), keep_manifest=False)
    want = "(2, as its name says)" if step < 0 else "step differs from its name (expected 2, found 1000)"
    assert want in _resume_error(out)


def test_step_beyond_the_run_is_refused(runs, tmp_path):
    out = _copy(runs, "pt", tmp_path)
    msg = _resume_error(out, max_steps=1)  # a checkpoint of step 2, a run of 1 step
    assert "step-0000002.pt: holds step 2, beyond this run's 1 steps (expected 0..1); raise --max-steps" in msg


def test_pt_changed_plain_value_is_refused(runs, tmp_path):
    out = _copy(runs, "pt", tmp_path)
    _edit_pt(out, lambda ck: ck["sampler"].__setitem__("position", 7))
    assert "the values of entry 'sampler' differ from its manifest (crc32 expected" in _resume_error(out)


def test_pt_without_manifest_resumes_with_a_warning(runs, tmp_path, capsys):
    out = _copy(runs, "pt", tmp_path)
    _edit_pt(out, lambda ck: None, keep_manifest=False)
    assert train(TrainConfig(resume=str(out), max_steps=3))["steps"] == 3
    assert "step-0000002.pt has no manifest (written before rwkvtune checked checkpoints)" in capsys.readouterr().err
    assert len(train_losses(out)) == 3


def test_the_oldest_checkpoint_damaged_says_there_is_none_before_it(runs, tmp_path):
    out = _copy(runs, "pt", tmp_path)
    path = out / "checkpoints" / "step-0000001.pt"
    ck = torch.load(path, weights_only=True)
    ck["trainable"][EMB][0, 0] = float("nan")
    torch.save(ck, path)
    msg = _resume_error(path)
    assert "no earlier checkpoint of this run is kept" in msg and f"tensor trainable/{EMB} has crc32" in msg


# ---- sharded checkpoints (strategy fsdp) -----------------------------------------------------


def _nan_into_a_shard(folder: Path, floats: int = 1024) -> str:
    """Overwrite the first ``floats`` values of the largest model tensor in its shard file with NaN;
    returns the tensor's name."""
    from rwkvtune.train.dcp_safe import SafeReader

    md = SafeReader(folder).read_metadata()
    index, info = max(((k, v) for k, v in md.storage_data.items() if k.fqn.startswith("model.")),
                      key=lambda kv: kv[1].length)
    f = folder / info.relative_path
    raw = bytearray(f.read_bytes())
    blob = bytes(raw[info.offset:info.offset + info.length])
    values = torch.load(io.BytesIO(blob), weights_only=True).contiguous().view(torch.uint8).numpy().tobytes()
    at = info.offset + blob.find(values[:4 * floats])
    raw[at:at + 4 * floats] = torch.full((floats,), float("nan")).numpy().tobytes()
    f.write_bytes(bytes(raw))
    return index.fqn


def test_sharded_checkpoint_has_a_manifest_of_every_file(runs):
    folder = runs / "sharded" / "checkpoints" / "step-0000002"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["step"] == 2 and set(m["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert m["files"]["__0_0.distcp"]["bytes"] == (folder / "__0_0.distcp").stat().st_size


def test_sharded_flipped_bytes_are_refused(runs, tmp_path):
    out = _copy(runs, "sharded", tmp_path)
    folder = out / "checkpoints" / "step-0000002"
    shard = folder / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    msg = _resume_error(out)
    assert msg.startswith(f"{folder}: file __0_0.distcp has crc32 ") and "its bytes changed" in msg
    assert f"{_instead(out)} instead" in msg


def test_sharded_nan_in_a_shard_is_refused(runs, tmp_path):
    out = _copy(runs, "sharded", tmp_path)
    folder = out / "checkpoints" / "step-0000002"
    _nan_into_a_shard(folder)
    assert "file __0_0.distcp has crc32" in _resume_error(out)
    # without its manifest (an old checkpoint): the values loaded are checked before training
    (folder / "manifest.json").unlink()
    name = _nan_into_a_shard(folder)
    msg = _resume_error(out)
    assert f"tensor model/{name.removeprefix('model.')} holds 1024 non-finite value(s)" in msg
    assert len(train_losses(out)) == 2  # nothing trained on it


def test_sharded_trainer_state_and_step_are_checked(runs, tmp_path):
    out = _copy(runs, "sharded", tmp_path)
    folder = out / "checkpoints" / "step-0000002"
    info = torch.load(folder / "trainer.pt", weights_only=True)
    info["step"] = 1000
    torch.save(info, folder / "trainer.pt")
    assert "file trainer.pt is " in _resume_error(out)
    (folder / "manifest.json").unlink()
    assert "step differs from its name (expected 2, found 1000)" in _resume_error(out)


def test_two_processes_seal_their_shards_and_all_refuse_a_damaged_one(runs, tmp_path):
    """torchrun, 2 processes: each hashes its own shard into the manifest; on resume each checks its
    share of the files and every process stops on the same error, said once by rank 0 (none is left
    waiting)."""
    from test_fsdp import ENV, _torchrun

    data = {"text": str(runs / "text.jsonl"), "ckpt": str(runs / "base.pth")}
    out = tmp_path / "two"
    res = subprocess.run(_torchrun(data, out, max_steps=2, save_every=2), capture_output=True, text=True,
                         timeout=400, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "checkpoints" / "step-0000002"
    m = json.loads((folder / "manifest.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.pt"} <= set(m["files"]) and m["world_size"] == 2
    (out / "summary.json").unlink()
    shard = folder / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    cmd = _torchrun(data, out, resume=True) + ["--max-steps", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV)
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, res.stderr[-3000:]  # every process stops on the same error; rank 0 alone says it
    assert lines[0].startswith(f"error: {folder}: file __1_0.distcp has crc32 ")
    assert len(train_losses(out)) == 2
