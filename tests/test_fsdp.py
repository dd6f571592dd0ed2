"""Sharded training (strategy fsdp, FSDP2) on CPU with gloo: equal to one process, exact resume after
kill -9, resharding onto another number of processes, final.pth in the official layout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import train_losses as _losses, write_checkpoint
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.trainer import train

SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
# adam_eps 1e-6 instead of the reference 1e-18: AdamW turns gradients that are pure rounding noise
# into full +-lr steps, and the sum over two processes rounds differently from one process's.
COMMON = dict(ctx_len=16, lr=1e-3, warmup_steps=0, save_dtype="fp32", adam_eps=1e-6, tensorboard=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    words = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "eats"]
    text = d / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j * 3) % 9] for j in range(8 + i % 5))})
                            + "\n" for i in range(24)))
    return {"text": str(text), "ckpt": write_checkpoint(d / "base.pth", **SMALL)}


def _free_port() -> str:
    with socket.socket() as sock:  # a fixed port clashes with another suite running at once
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _torchrun(data, out, nproc=2, resume=False, **kw) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           _free_port(), "-m", "rwkvtune", "train"]
    if resume:
        return cmd + ["--resume", str(out)]
    opts = {**COMMON, "batch_size": 2, "strategy": "fsdp", **kw}
    return cmd + ["--model", data["ckpt"], "--data", data["text"], "--out", str(out)] + [
        f"{k}={v}" for k, v in opts.items()]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _relative(a: dict, b: dict) -> float:
    """The largest per-tensor relative difference ||a - b|| / ||a||."""
    return max(float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-30)) for k in a)


@pytest.mark.parametrize("mode", ["full", "lora", "state", "full+ckpt+accum", "scratch"])
def test_fsdp_equals_one_process_on_the_same_global_batch(data, tmp_path, mode):
    # Under fsdp each process builds the module on meta and reads only its shards of the model file
    # (rwkvtune.train.sharded_load); the adapters' random init must still equal the eager build's.
    # full+ckpt+accum: 2 processes x 1 sample x 2 accumulated micro-batches, gradient checkpointing.
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    extra = {"mode": mode, "lora_r": 4} if mode == "lora" else {"mode": mode, "lr": 0.05} if mode == "state" else {}
    per_process = {"batch_size": 2}
    if mode == "full+ckpt+accum":
        mode, extra, per_process = "full", {"grad_checkpoint": True}, {"batch_size": 1, "grad_accum": 2}
    if mode == "scratch":  # the official init, computed one block at a time and sliced into the shards
        mode, extra = "full", {"init": "scratch"}
    train(TrainConfig(model=data["ckpt"], data=data["text"], out=str(single), batch_size=4, max_steps=4,
                      save_every=0, **{**COMMON, **extra}))
    res = _run(_torchrun(data, sharded, max_steps=4, save_every=0, **{**extra, **per_process}))
    assert res.stdout.count('"steps"') == 1  # the summary, from the main process only
    la, lb = _losses(single), _losses(sharded)
    assert len(lb) == 4 and max(abs(x - y) / abs(x) for x, y in zip(la, lb)) < 1e-6
    if mode == "state":
        sa, sb = (torch.load(run / "state.pth", weights_only=True)["wkv_init"] for run in (single, sharded))
        # 1e-4: AdamW at lr 0.05 turns the two runs' different gradient rounding into visible steps
        assert sa.abs().max() > 0 and _relative({"s": sa}, {"s": sb}) < 1e-4
        return
    wa, wb = torch.load(single / "final.pth"), torch.load(sharded / "final.pth")
    # from scratch, output and value weights start at zero: AdamW turns their first gradients'
    # different rounding over 2 processes into visible steps (the init itself is identical:
    # test_fsdp_never_loads_the_whole_model...)
    assert set(wa) == set(wb) and _relative(wa, wb) < (1e-5 if extra.get("init") == "scratch" else 1e-6)
    if mode == "full":  # the gathered final.pth is the official layout: the rwkv package runs it
        os.environ.setdefault("RWKV_V7_ON", "1")
        from rwkv.model import RWKV

        from rwkvtune.models.rwkv7 import RWKV7

        ids = [5, 300, 2000, 17, 42, 0, 11]
        ref, _ = RWKV(str(sharded / "final"), "cpu fp32").forward(ids, None, full_output=True)
        with torch.no_grad():
            ours = RWKV7.from_checkpoint(sharded / "final.pth")(torch.tensor([ids]))[0]
        assert (ref - ours).abs().max() < 1e-4
    else:  # same adapters, recorded against the same base (the fingerprint read from the file)
        aa, ab = (torch.load(run / "adapter.pth", weights_only=True) for run in (single, sharded))
        assert ab["r"] == 4 and aa["base_fingerprint"] == ab["base_fingerprint"] != ""
        assert set(aa["lora"]) == set(ab["lora"]) and _relative(aa["lora"], ab["lora"]) < 1e-6


def test_fsdp_kill_resume_is_exact_and_reshards_onto_one_process(data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_torchrun(data, full, max_steps=6, save_every=2))
    proc = subprocess.Popen(_torchrun(data, killed, max_steps=6, save_every=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-0000004").is_dir():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
    proc.wait()
    assert not (killed / "final.pth").exists(), "the run finished before it could be killed"
    one = tmp_path / "one"
    shutil.copytree(killed, one)
    _run(_torchrun(data, killed, resume=True))
    la, lb = _losses(full), _losses(killed)
    assert len(lb) == 6 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-6
    assert _relative(torch.load(full / "final.pth"), torch.load(killed / "final.pth")) < 1e-6
    # The same checkpoint resumed by one process: the shards are read back into one.
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--resume", str(one)], capture_output=True,
                         text=True, timeout=400, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    lo = _losses(one)
    assert len(lo) == 6 and lo[:4] == la[:4]  # history kept up to the checkpoint
    assert set(torch.load(one / "final.pth")) == set(torch.load(full / "final.pth"))


def test_sharded_checkpoint_index_runs_no_code(data, tmp_path):
    """A planted ``.metadata`` (the index torch's reader unpickles) is refused without running it."""
    out = tmp_path / "run"
    train(TrainConfig(model=data["ckpt"], data=data["text"], out=str(out), batch_size=2, max_steps=2, save_every=1,
                      strategy="fsdp", **COMMON))
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    import pickle

    index = out / "checkpoints" / "step-0000002" / ".metadata"
    index.write_bytes(pickle.dumps(Planted()))
    from rwkvtune.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"file \.metadata is \d+ bytes, expected \d+ \(its manifest\)"):
        train(TrainConfig(resume=str(out), max_steps=3))  # its manifest refuses it before it is read
    (index.parent / "manifest.json").unlink()  # as written before manifests existed
    with pytest.raises(CheckpointError, match="never unpickles"):
        train(TrainConfig(resume=str(out), max_steps=3))
    assert not marker.exists()


def test_fsdp_never_loads_the_whole_model_and_checks_each_tensor_it_reads(data, tmp_path, monkeypatch):
    """Under fsdp the module is built on meta, sharded, and each process fills its shards tensor by
    tensor from the model file or the seeded init (rwkvtune.train.sharded_load): the whole-model
    loader and init never run, the result equals a ddp run, and a damaged tensor is refused by name."""
    from helpers import make_state_dict
    from rwkvtune.errors import CheckpointError
    from rwkvtune.models.rwkv7 import RWKV7

    cfg = dict(model=data["ckpt"], data=data["text"], batch_size=2, max_steps=2, save_every=0, **COMMON)
    train(TrainConfig(out=str(tmp_path / "ddp"), **cfg))

    def whole_model_load(*a, **kw):
        raise AssertionError("the whole model was loaded on a sharded run")

    monkeypatch.setattr(RWKV7, "from_checkpoint", classmethod(whole_model_load))
    train(TrainConfig(out=str(tmp_path / "fsdp"), strategy="fsdp", **cfg))
    assert _relative(torch.load(tmp_path / "ddp" / "final.pth"), torch.load(tmp_path / "fsdp" / "final.pth")) < 1e-6
    monkeypatch.undo()
    scratch = {**cfg, "init": "scratch", "lr": 0.0}  # lr 0: final.pth is the starting model
    train(TrainConfig(out=str(tmp_path / "scratch-ddp"), **scratch))
    monkeypatch.setattr(RWKV7, "from_config", classmethod(whole_model_load))
    train(TrainConfig(out=str(tmp_path / "scratch-fsdp"), strategy="fsdp", **scratch))
    wa, wb = (torch.load(tmp_path / f"scratch-{s}" / "final.pth") for s in ("ddp", "fsdp"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the official init, bit for bit

    sd = make_state_dict(**SMALL)
    sd["blocks.1.ffn.value.weight"][3, 4] = float("inf")
    torch.save(sd, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointError, match=r"damaged\.pth: tensor blocks\.1\.ffn\.value\.weight holds 1 non-finite"):
        train(TrainConfig(out=str(tmp_path / "bad"), strategy="fsdp", **{**cfg, "model": str(tmp_path / "damaged.pth")}))
