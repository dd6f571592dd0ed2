"""Each process's own state file of a multi-process checkpoint (GRPO's rollouts, the RNGs) against
what can be found there instead: another process's, save's or run's file, a missing, planted,
linked or damaged one, malformed rollouts; a checkpoint from before these files; pruning.

The files are read as process 1 of 2 would read them (rank_state.restore with Dist(1, 2)): the
reading and checking run no collective, so no process group is needed."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.train import checkpointing, manifest, rank_state
from rwkvtune.train.run_dir import RunDir
from rwkvtune.train.runtime import Dist
from rwkvtune.train.trainer import train
from test_grpo import _cfg, data  # noqa: F401  (data: the shared fixture)

NONCE = 0x1234_5678_9ABC


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """A one-process GRPO checkpoint after step 1 of a batch of 2 (num_iterations 2): its method
    state holds the rollouts that step 2 reuses."""
    out = tmp_path_factory.mktemp("rank-state") / "run"
    train(_cfg(data, out, max_steps=1, num_iterations=2, seed=3))
    return out


@pytest.fixture
def method(data, tmp_path):
    from rwkvtune.tokenizer import get_tokenizer
    from rwkvtune.train.methods import get_method

    m = get_method(_cfg(data, tmp_path / "unused", num_iterations=2))
    m.build_datasets(get_tokenizer(), 65536)
    yield m
    m.close()


def _two_process_checkpoint(one_process, tmp_path):
    """The checkpoint as 2 processes save it: each process's own file beside the main file, which
    records them (process 1's rollouts: process 0's with advantages + 0.5, to tell them apart)."""
    run = tmp_path / "run"
    shutil.copytree(one_process, run)
    main = run / "checkpoints" / "step-0000001.pt"
    ck = torch.load(main, weights_only=True)
    own = {"buffer": [{**b, "advantages": b["advantages"] + 0.5} for b in ck["method"]["buffer"]]}
    rank_state.write_own(main, Dist(0, 2), 1, NONCE, ck["method"])
    torch.manual_seed(1234)
    rank_state.write_own(main, Dist(1, 2), 1, NONCE, own)
    _seal(main)
    return main, ck, own


def _seal(main):
    """Record the process files as they are now in the main file, under its manifest (as a save
    does): what is then refused is refused by the checks after the checksum."""
    ck = {k: v for k, v in torch.load(main, weights_only=True).items() if k != manifest.MANIFEST_KEY}
    files = [RunDir.rank_state_file(main, r, 2, NONCE) for r in (0, 1)]
    ck[rank_state.KEY] = {"world_size": 2, "nonce": NONCE, "files": [
        {"bytes": f.stat().st_size, "crc32": f"{manifest.file_crc(f):08x}"} if f.is_file() else {"bytes": 0,
                                                                                                  "crc32": "0"}
        for f in files]}
    torch.save(manifest.with_manifest(ck), main)


def _restore(main, method):
    rank_state.restore(main, checkpointing.read_checkpoint_info(main), Dist(1, 2), method, {"buffer": []})


def test_each_process_continues_with_its_own_rollouts_and_rng(one_process, tmp_path, method):
    main, ck, own = _two_process_checkpoint(one_process, tmp_path)
    expected_rng = (torch.manual_seed(1234), torch.get_rng_state())[1]
    torch.manual_seed(0)
    _restore(main, method)
    assert len(method.buffer) == 1 and torch.equal(method.buffer[0]["advantages"], own["buffer"][0]["advantages"])
    assert not torch.equal(method.buffer[0]["advantages"], ck["method"]["buffer"][0]["advantages"])
    assert torch.equal(torch.get_rng_state(), expected_rng)  # process 1's RNGs, not process 0's


def _planted(path):
    class Planted:
        def __reduce__(self):
            return (os.mkdir, (str(path.parent.parent / "pwned"),))

    torch.save({"format": rank_state.FORMAT, "method": Planted()}, path)


def _other(main, **kw):
    """A well-formed file for another process/save/world, put under process 1's name."""
    d = Dist(kw.get("rank", 1), kw.get("world", 2))
    rank_state.write_own(main, d, kw.get("step", 1), kw.get("nonce", NONCE), {"buffer": []})
    os.replace(RunDir.rank_state_file(main, d.rank, d.world_size, kw.get("nonce", NONCE)), _own(main))


def _own(main):
    return RunDir.rank_state_file(main, 1, 2, NONCE)


def _rollouts(main, change):
    ck = torch.load(_own(main), weights_only=True)
    change(ck["method"]["buffer"][0])
    torch.save(ck, _own(main))


def _bad_rng(main):
    ck = torch.load(_own(main), weights_only=True)
    ck["rng"]["torch"] = torch.zeros(3)
    torch.save(ck, _own(main))


def _swap(main):
    shutil.copy(RunDir.rank_state_file(main, 0, 2, NONCE), _own(main))


# attack: (harm, what is said, whether the main file's record is rewritten to match (else the
# size or checksum it records refuses the file first))
ATTACKS = {
    "process 0's file as process 1's": (_swap, r"crc32 \w+, expected crc32 \w+ \(recorded by step-0000001.pt", False),
    "truncated": (lambda m: _own(m).write_bytes(_own(m).read_bytes()[:300]), r"300 bytes, expected \d+ bytes", False),
    "NaN advantages (unrecorded)": (lambda m: _rollouts(m, lambda b: b["advantages"].fill_(float("nan"))),
                                    r"expected (crc32 \w+|\d+ bytes) \(recorded", False),
    "missing": (lambda m: _own(m).unlink(), "missing; .*process 1", False),
    "a link": (lambda m: (_own(m).unlink(), _own(m).symlink_to(RunDir.rank_state_file(m, 0, 2, NONCE))),
               "not a regular file", False),
    # recorded as they are: the checks behind the checksum
    "process 0's file, recorded": (_swap, "process index 0, expected 1", True),
    "a file of another save": (lambda m: _other(m, nonce=NONCE + 1), "save nonce", True),
    "a file of a 3-process run": (lambda m: _other(m, world=3), "number of processes 3, expected 2", True),
    "a file of another step": (lambda m: _other(m, step=7), "step 7, expected 1", True),
    "code in the pickle": (lambda m: _planted(_own(m)), "cannot read .* never unpickles", True),
    "garbage": (lambda m: _own(m).write_bytes(b"PK\x03\x04" + b"x" * 200), "cannot read", True),
    "NaN advantages": (lambda m: _rollouts(m, lambda b: b["advantages"].fill_(float("nan"))),
                       "micro-batch 0 advantages holds non-finite", True),
    "token ids beyond the vocab": (lambda m: _rollouts(m, lambda b: b["input_ids"].fill_(70000)),
                                   r"input_ids has token ids outside \[0, 65536\)", True),
    "float token ids": (lambda m: _rollouts(m, lambda b: b.update(input_ids=b["input_ids"].float())),
                        "expected int64", True),
    "no old log-probs": (lambda m: _rollouts(m, lambda b: b.pop("old_logps")), "expected .*old_logps", True),
    "a bad RNG state": (_bad_rng, "RNG state is malformed", True),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_wrong_process_state_file_is_refused_by_name(one_process, tmp_path, method, attack):
    main, _, _ = _two_process_checkpoint(one_process, tmp_path)
    harm, said, reseal = ATTACKS[attack]
    harm(main)
    if reseal:
        _seal(main)
    with pytest.raises(CheckpointError, match=said) as e:
        _restore(main, method)
    assert str(_own(main)) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "pwned").exists()


def test_a_changed_record_of_the_process_files_is_refused_by_the_main_manifest(one_process, tmp_path, method):
    main, _, _ = _two_process_checkpoint(one_process, tmp_path)
    _swap(main)
    ck = torch.load(main, weights_only=True)
    ck[rank_state.KEY]["files"][1] = ck[rank_state.KEY]["files"][0]  # rewritten without its manifest
    torch.save(ck, main)
    with pytest.raises(CheckpointError, match="values of entry 'rank_states' differ from its manifest"):
        _restore(main, method)


def test_a_checkpoint_of_several_processes_from_before_is_refused_inside_a_batch(data, one_process):
    """Saved by 2 processes before each kept its own file: it holds process 0's rollouts only."""
    from rwkvtune.train.strategy import resume_world_size

    main = one_process / "checkpoints" / "step-0000001.pt"
    cfg = _cfg(data, one_process, max_steps=1, num_iterations=2, seed=3)
    same = SimpleNamespace(global_batch=torch.load(main, weights_only=True)["sampler"]["global_batch"])
    with pytest.raises(ConfigError, match=r"inside a batch .* process 0's rollouts only .* multiple of 2 steps") as e:
        resume_world_size(main, cfg, Dist(0, 2), same, 2, 64)
    assert e.value.every_rank
    assert resume_world_size(main, cfg, Dist(0, 1), same, 2, 64) is None  # one process: its own file


def test_process_files_go_with_their_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    for step in (1, 2):
        run.checkpoint(step).write_bytes(b"")
    files = {(step, rank, nonce): RunDir.rank_state_file(run.checkpoint(step), rank, 2, nonce)
             for step in (1, 2, 3) for rank in (0, 1) for nonce in (5, 6)}
    for f in files.values():
        f.write_bytes(b"")
    checkpointing.prune(run, 2, keep=1, nonce=6)
    left = {k for k, f in files.items() if f.exists()}
    # step 1: pruned with its checkpoint; step 2: the other save's removed; step 3: newer, left alone
    assert left == {(2, 0, 6), (2, 1, 6), (3, 0, 5), (3, 1, 5), (3, 0, 6), (3, 1, 6)}
