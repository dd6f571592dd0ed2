"""strategy fsdp against what it reads back: model files without layer 0's v0/v1/v2, sharded
checkpoints whose index points outside the folder, damaged shard files (one line from rank 0, every
process out at once), and a resume on another number of processes."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import time

import pytest
import torch

from helpers import train_losses, write_checkpoint
from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.trainer import train
from test_fsdp import COMMON, ENV, SMALL, _run, _torchrun, data  # noqa: F401  (data: the shared fixture)

# torchrun's own traceback when a worker exits non-zero (the launcher's, not a worker's)
LAUNCHER_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:(?!Traceback).)*?ChildFailedError", re.S)


@pytest.fixture(scope="module")
def no_v0(data, tmp_path_factory):
    """The same tiny model without layer 0's unused blocks.0.att.v0/v1/v2 (as many RWKV-7 files)."""
    return write_checkpoint(tmp_path_factory.mktemp("nov0") / "nov0.pth", layer0_v=False, **SMALL)


# Without v0 in every mode (the files that lost their run); with v0 in full mode only: lora and
# state over a file with v0 run under fsdp in test_fsdp.py's equality tests.
@pytest.mark.parametrize("mode,layer0_v", [("full", True), ("full", False), ("lora", False), ("state", False)],
                         ids=["with-v0-full", "without-v0-full", "without-v0-lora", "without-v0-state"])
def test_fsdp_finishes_with_and_without_layer0_v(data, no_v0, tmp_path, mode, layer0_v):
    # Was: training completed, then gathering final.pth raised "Missing key(s) ... blocks.0.att.v0"
    # on every rank for a file without them. The written file keeps the input's key set.
    model = data["ckpt"] if layer0_v else no_v0
    out = tmp_path / "run"
    extra = {"lora_r": 4} if mode == "lora" else {"lr": 0.05} if mode == "state" else {}
    resumes = mode == "full" and not layer0_v  # only this one saves (a sharded checkpoint costs seconds here)
    _run(_torchrun({**data, "ckpt": model}, out, mode=mode, max_steps=2, save_every=int(resumes), **extra))
    source = torch.load(model, weights_only=True)
    if mode == "state":  # no final.pth: the tuned state is the output, for this same base
        from rwkvtune.models.rwkv7 import RWKV7
        from rwkvtune.peft.state import load_state_file

        state = load_state_file(out / "state.pth", RWKV7.from_checkpoint(model))
        assert torch.isfinite(state).all() and state.abs().max() > 0 and not (out / "final.pth").exists()
    else:
        final = torch.load(out / "final.pth", weights_only=True)
        assert set(final) == set(source)  # no invented keys, none lost
        assert ("blocks.0.att.v0" in final) == layer0_v
        from rwkv.model import RWKV  # the real client (RWKV_V7_ON=1, conftest)

        from rwkvtune.models.rwkv7 import RWKV7

        ids = [5, 300, 2000, 17, 42, 0, 11]
        ref, _ = RWKV(str(out / "final"), "cpu fp32").forward(ids, None, full_output=True)
        with torch.no_grad():
            ours = RWKV7.from_checkpoint(out / "final.pth")(torch.tensor([ids]))[0]
        assert (ref - ours).abs().max() < 1e-4
    if resumes:
        # the sharded checkpoint of such a file resumes (here on one process: resharded)
        train(TrainConfig(resume=str(out / "checkpoints" / "step-0000001"), max_steps=3))
        assert len(train_losses(out)) == 3
        assert set(torch.load(out / "final.pth", weights_only=True)) == set(source)


def _trained_one_process(data, out, **kw):
    train(TrainConfig(model=data["ckpt"], data=data["text"], out=str(out), batch_size=2, strategy="fsdp",
                      **{**COMMON, "max_steps": 2, "save_every": 1, **kw}))
    folder = out / "checkpoints" / "step-0000002"
    _without_manifest(folder)
    return folder


def _without_manifest(folder):
    """Drop the checkpoint's manifest.json (whose checksums would refuse any change first: see
    test_manifest.py), as in a checkpoint written before manifests: the checks here are the ones
    that hold without it."""
    (folder / "manifest.json").unlink()


def _rewrite_index(folder, change):
    """Rewrite a checkpoint's .metadata with ``change`` applied to its first storage entry (the test
    writes the index the way torch.distributed.checkpoint does: a pickled Metadata)."""
    from rwkvtune.train.dcp_safe import _IndexUnpickler

    with open(folder / ".metadata", "rb") as f:
        metadata = _IndexUnpickler(f).load()
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key] = change(metadata.storage_data[key])
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_sharded_index_paths_outside_the_folder_are_refused_before_reading(data, tmp_path, monkeypatch, where):
    import dataclasses

    from torch.distributed.checkpoint.filesystem import FileSystemReader

    folder = _trained_one_process(data, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(folder / "__0_0.distcp", elsewhere / "__0_0.distcp")  # a real shard: only the place is wrong
    if where == "link":
        (folder / "__0_0.distcp").unlink()
        (folder / "__0_0.distcp").symlink_to(elsewhere / "__0_0.distcp")
    else:
        planted = "../../../elsewhere/__0_0.distcp" if where == "parent" else str(elsewhere / "__0_0.distcp")
        assert (folder / planted).resolve() == (elsewhere / "__0_0.distcp").resolve()  # inside tmp_path
        _rewrite_index(folder, lambda info: dataclasses.replace(info, relative_path=planted))

    def read_data(*a, **kw):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(FileSystemReader, "read_data", read_data)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as e:
        train(TrainConfig(resume=str(tmp_path / "run"), max_steps=3))
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_sharded_index_with_a_bad_byte_range_is_refused(data, tmp_path):
    import dataclasses

    folder = _trained_one_process(data, tmp_path / "run")
    _rewrite_index(folder, lambda info: dataclasses.replace(info, offset=-5))
    with pytest.raises(CheckpointError, match="offset=-5"):
        train(TrainConfig(resume=str(tmp_path / "run"), max_steps=3))


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory):
    """A 2-process fsdp run with sharded checkpoints at steps 1 and 2 (one shard file per process)."""
    out = tmp_path_factory.mktemp("two") / "run"
    _run(_torchrun(data, out, max_steps=2, save_every=1, keep_checkpoints=2))
    return out


def _swap(folder):
    a, b = folder / "__0_0.distcp", folder / "__1_0.distcp"
    a.rename(folder / "x")
    b.rename(a)
    (folder / "x").rename(b)


DAMAGE = {
    "missing": (lambda f: (f / "__1_0.distcp").unlink(), r"shard file __1_0\.distcp is missing"),
    "truncated": (lambda f: os.truncate(f / "__1_0.distcp", (f / "__1_0.distcp").stat().st_size // 2),
                  r"shard file __1_0\.distcp is [\d,]+ bytes, the index needs [\d,]+ .*truncated"),
    "swapped": (_swap, r"shard file __0_0\.distcp .*swapped"),
    # bytes of a tensor garbled: no check before dcp.load sees it; its CheckpointException is said
    "garbled": (lambda f: _garble(f / "__1_0.distcp"), r"cannot read this sharded checkpoint \(\w+"),
    "trainer.pt of another save": (lambda f: shutil.copy(f.parent / "step-0000001" / "trainer.pt", f / "trainer.pt"),
                                   # step 1's: its step refuses it first (a same-step one: the save's nonce)
                                   r"step differs from its name|written by another save than this checkpoint's "
                                   r"trainer\.pt"),
}


def _garble(path):
    with open(path, "r+b") as f:
        f.write(b"\x00garbage" * 8)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shards_stop_every_process_with_one_line(two_process_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(two_process_run, run)
    folder = run / "checkpoints" / "step-0000002"
    harm, said = DAMAGE[damage]
    harm(folder)
    _without_manifest(folder)
    start = time.time()
    res = subprocess.run(_torchrun({}, run, resume=True) + ["--max-steps", "3"], capture_output=True, text=True,
                         timeout=120, env=ENV)
    took = time.time() - start
    out = res.stdout + res.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1, out[-3000:]
    assert str(folder) in errors[0] and re.search(said, errors[0]), errors[0]
    assert "Traceback" not in LAUNCHER_TRACEBACK.sub("", out), out[-3000:]  # no worker's traceback
    assert took < 60
    assert not (run / "checkpoints" / "step-0000003").exists()  # no step was trained


def test_resume_on_more_processes_continues_the_epoch_and_says_what_changes(data, tmp_path):
    # 1 process x 2 samples, saved after 1 step (2 windows consumed), resumed on 2 processes x 2
    # samples: the data continues at window 2 (no multiple of the new global batch 4; rounding down
    # would repeat 2 windows), and the change in samples per step is said once.
    out = tmp_path / "run"
    train(TrainConfig(model=data["ckpt"], data=data["text"], out=str(out), batch_size=2, strategy="fsdp",
                      **{**COMMON, "max_steps": 1, "save_every": 1}))
    res = _run(_torchrun(data, out, resume=True) + ["--max-steps", "3"])
    said = [line for line in res.stderr.splitlines() if "resumed on 2" in line]
    assert len(said) == 1 and "samples per step (batch_size x grad_accum x processes) 2 -> 4" in said[0], res.stderr
    info = torch.load(out / "checkpoints" / "step-0000003" / "trainer.pt", weights_only=True)
    assert info["sampler"]["position"] == 2 + 2 * 4 and info["sampler"]["global_batch"] == 4
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"world_size": {"from": 1, "to": 2}, "samples_per_step": {"from": 2, "to": 4}} == {
        k: v for k, v in next(r for r in rows if "world_size_changed" in r)["world_size_changed"].items()
        if k != "max_tokens_per_step"}
    assert len(train_losses(out)) == 3 and (out / "final.pth").exists()


def test_resume_on_other_processes_refuses_a_run_counted_in_epochs(data, tmp_path):
    # Called as on one of 2 processes (Dist(rank 0, world_size 2)): the check reads only trainer.pt.
    from rwkvtune.data.dataset import WindowSampler
    from rwkvtune.train.runtime import Dist
    from rwkvtune.train.strategy import resume_world_size

    out = tmp_path / "run"
    train(TrainConfig(model=data["ckpt"], data=data["text"], out=str(out), batch_size=2, strategy="fsdp",
                      save_every=3, keep_checkpoints=4, **COMMON))  # epochs=1: 24 windows, 12 steps of 2
    resume = out / "checkpoints" / "step-0000003"
    n = torch.load(resume / "trainer.pt", weights_only=True)["sampler"]["n"]
    assert n == 24  # 6 windows consumed: 18 left, 5 steps of 4 on 2 processes
    cfg = TrainConfig(model=data["ckpt"], data=data["text"], batch_size=2, **COMMON)
    two = WindowSampler(n, world_size=2, batch_size=2)
    with pytest.raises(ConfigError, match=r"saved by 1 process\(es\), resumed on 2: .* pass --max-steps 8 to train "
                                          r"the 18 windows left") as e:
        resume_world_size(resume, cfg, Dist(0, 2, 0), two, 1, 64)
    assert e.value.every_rank  # every process raises it; rank 0 alone says it
    cfg.max_steps = 8  # a length in steps: continues, with what changes returned
    assert resume_world_size(resume, cfg, Dist(0, 2, 0), two, 1, 64)["samples_per_step"] == {"from": 2, "to": 4}
