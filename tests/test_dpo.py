"""DPO as a training method: preference data, the reference model, the toy recipe, resume, DDP."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import train_losses as _losses, write_checkpoint
from rwkvtune.errors import DataError
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.objective import TrainModule
from rwkvtune.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "rwkvtune" / "assets"
SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    pairs = d / "pairs.jsonl"
    lines = [json.loads(x) for x in (ASSETS / "sample_preference.jsonl").read_text().splitlines()[:24]]
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"pairs": str(pairs), "ckpt": write_checkpoint(d / "base.pth", **SMALL), "dir": d}


def _cfg(data, out, **kw):
    base = dict(model=data["ckpt"], data=data["pairs"], out=str(out), method="dpo", ctx_len=64, batch_size=4,
                max_steps=3, lr=1e-2, warmup_steps=0, save_every=0, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _base_logps(ckpt, batch) -> torch.Tensor:
    """log p of each row's scored tokens under a freshly loaded base model, from its full logits."""
    from rwkvtune.train.methods.dpo import sequence_logps

    with torch.no_grad():
        logits = RWKV7.from_checkpoint(ckpt)(batch["input_ids"])
    return sequence_logps(logits, batch["labels"])[0]


@pytest.mark.parametrize("mode", ["lora", "state"])
def test_reference_in_lora_and_state_modes_is_the_base_model(data, tmp_path, mode):
    """After training moved the adapters (and layer norms) or the state, the reference still
    gives exactly the base model's log-probs: every trained part is really off."""
    from rwkvtune.data.preference import PreferenceDataset, collate_pairs, read_pairs
    from rwkvtune.peft import get_mode
    from rwkvtune.tokenizer import get_tokenizer
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.dpo import DPO

    cfg = _cfg(data, tmp_path, mode=mode, train_parts=("ln",) if mode == "lora" else ()).resolve(
        RWKV7.from_checkpoint(data["ckpt"]).config)
    module = TrainModule.for_mode(get_mode(mode), RWKV7.from_checkpoint(data["ckpt"]), cfg)
    with torch.no_grad():  # as if trained: every trainable tensor moved away from its start
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = collate_pairs([PreferenceDataset(read_pairs(data["pairs"], get_tokenizer())[0])[i] for i in range(3)],
                          "cpu")
    method = DPO(cfg)
    ctx = StepContext(cfg=cfg, device="cpu", autocast=contextlib.nullcontext, mode=get_mode(mode))
    ref = method._reference(module, batch, ctx, split="train")
    base = _base_logps(data["ckpt"], batch)
    assert (ref - base).abs().max() < 1e-4 * base.abs().max()
    with torch.no_grad():  # and the policy is not the base (so the check above could fail)
        policy = -method._nll(module, batch["input_ids"], batch["labels"], ctx)
    assert (policy - base).abs().max() > 1e-2


def test_dpo_recipe_learns_the_toy_preference(tmp_path):
    """The shipped recipe (from scratch, a tiny model): on held-out pairs the policy's own preference
    starts near chance and ends at >= 0.9, and TRL's reward accuracy reaches >= 0.9."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--config", "examples/recipes/dpo.yaml",
                          "--out", str(out), "max_steps=10", "eval_every=10"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    evals = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r}
    start, end = evals[0], evals[10]
    assert start["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: ln 2
    assert 0.2 <= start["eval_policy_accuracy"] <= 0.8
    assert end["eval_policy_accuracy"] >= 0.9 and end["eval_rewards/accuracies"] >= 0.9
    assert end["eval_rewards/margins"] > 1.0 and (out / "ref_logps.safetensors").is_file()


def test_full_mode_frozen_copy_equals_precomputed_reference(data, tmp_path):
    a, b = tmp_path / "copy", tmp_path / "pre"
    train(_cfg(data, a))
    train(_cfg(data, b, precompute_ref=True))
    rows_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_a) == len(rows_b) and any("loss" in r for r in rows_a), (len(rows_a), len(rows_b))
    for ra, rb in zip(rows_a, rows_b):
        assert ra.get("step") == rb.get("step") and ("loss" in ra) == ("loss" in rb), (ra, rb)
        if "loss" not in ra:
            continue
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key


def _stopped_after_checkpoint_2(cfg, monkeypatch) -> None:
    """Run ``cfg`` until its third step begins, as if the process died after checkpoint 2."""
    import rwkvtune.train.trainer as trainer_mod

    real_lr_at = trainer_mod.lr_at

    def interrupt_at_third_step(step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return real_lr_at(step, *a)

    monkeypatch.setattr(trainer_mod, "lr_at", interrupt_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)


def test_dpo_resume_continues_identically_with_the_cached_reference(data, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(data, full, max_steps=4, save_every=2, precompute_ref=True))
    _stopped_after_checkpoint_2(_cfg(data, part, max_steps=4, save_every=2, precompute_ref=True), monkeypatch)
    cached = (part / "ref_logps.safetensors").read_bytes()
    train(TrainConfig(resume=str(part)))
    assert (part / "ref_logps.safetensors").read_bytes() == cached  # read back, not recomputed
    la, lb = _losses(full), _losses(part)
    assert len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-6


def test_full_mode_resume_compares_with_the_starting_model_not_the_resumed_one(data, tmp_path, monkeypatch):
    """The live reference of a resumed full-mode run is rebuilt from the model file: a copy of the
    resumed policy would give every pair a zero margin (loss ln 2) at the first resumed step."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(data, full, max_steps=4, save_every=2))
    _stopped_after_checkpoint_2(_cfg(data, part, max_steps=4, save_every=2), monkeypatch)
    train(TrainConfig(resume=str(part)))
    la, lb = _losses(full), _losses(part)
    assert la[2] < 0.6 and len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-6


def test_bad_preference_records(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = Path(data["pairs"]).read_text().splitlines()[:4]
    bad.write_text("\n".join(good + ['{"prompt": "hi", "chosen": "a"}', '{"prompt": "hi", "chosen": "x", '
                                                                          '"rejected": "x"}']) + "\n")
    from rwkvtune.data.preference import read_pairs
    from rwkvtune.tokenizer import get_tokenizer

    with pytest.raises(DataError, match=r"bad.jsonl:5: missing field\(s\) 'rejected'"):
        read_pairs(str(bad), get_tokenizer())
    pairs, stats = read_pairs(str(bad), get_tokenizer(), on_error="skip")
    assert len(pairs) == 4 and stats.skipped == 2
    # and through the CLI: one line naming the record and the option that skips
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data", str(bad),
                          "--method", "dpo", "--out", str(tmp_path / "o"), "--ctx-len", "64"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "bad.jsonl:5: missing field(s) 'rejected'" in res.stderr and "--on-data-error skip" in res.stderr


# fsdp with the live reference: a frozen copy of the starting model, sharded like the policy and
# read from the model file shard by shard
@pytest.mark.parametrize("strategy, precompute", [("ddp", True), ("fsdp", False)])
def test_dpo_two_processes_equal_one_process(data, tmp_path, strategy, precompute):
    import socket

    single, ddp = tmp_path / "single", tmp_path / strategy
    train(_cfg(data, single, batch_size=4, max_steps=2, adam_eps=1e-6, precompute_ref=precompute))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, "-m",
           "rwkvtune", "train", "--model", data["ckpt"], "--data", data["pairs"], "--out", str(ddp), "--method", "dpo",
           "--ctx-len", "64", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "2",
           "--save-every", "0", "--strategy", strategy, "tensorboard=false", "adam_eps=1e-6",
           f"precompute_ref={str(precompute).lower()}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(rows(single)) == len(rows(ddp)) and any("loss" in r for r in rows(single))
    for ra, rb in zip(rows(single), rows(ddp)):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("method, extra", [("dpo", {}), ("dpo", {"precompute_ref": True}), ("grpo", {"beta": 0.04})])
def test_lora_train_parts_with_a_reference_under_fsdp_are_refused_before_any_work(data, tmp_path, method, extra):
    """The reference switches train_parts back to their starting values by swapping parameter
    storage, which FSDP owns (it crashed mid-step): refused at validation, naming the fix."""
    from rwkvtune.errors import ConfigError

    cfg = _cfg(data, tmp_path / "run", method=method, mode="lora", train_parts=("ln",), strategy="fsdp", **extra)
    if method == "grpo":
        cfg = dataclasses.replace(cfg, reward=("exact_match:chosen",))
    with pytest.raises(ConfigError, match=r"train_parts: found \['ln'\] with method .*drop train_parts, or use "
                                          r"strategy ddp"):
        train(cfg)
    assert not (tmp_path / "run").exists()
