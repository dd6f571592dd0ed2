"""GRPO as a training method: rollouts, rewards, the reference, resume, DDP, modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_state_dict
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.trainer import train

SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
REWARD = '''def space_first(prompts, completions, **fields):
    """1 for a completion that starts with a space: about half of a random model's, learnable."""
    assert set(fields) == {"answer"} and len(fields["answer"]) == len(completions)
    return [float(c.startswith(" ")) for c in completions]
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a} plus {b} is", "answer": str(a + b)}) + "\n"
                               for a in range(4) for b in range(4)))
    (d / "reward.py").write_text(REWARD)
    # A peaked head (logits x12): a random model then samples a few dozen first tokens for these
    # prompts, not thousands, so a reward over them can be learned in a few steps.
    sd = make_state_dict(**SMALL)
    sd["head.weight"] *= 12
    torch.save(sd, d / "base.pth")
    return {"prompts": str(prompts), "reward": f"{d / 'reward.py'}:space_first", "dir": d, "ckpt": str(d / "base.pth")}


def _cfg(data, out, **kw):
    base = dict(model=data["ckpt"], data=data["prompts"], out=str(out), method="grpo", reward=(data["reward"],),
                num_generations=4, max_completion_length=4, ctx_len=32, batch_size=2, max_steps=3, lr=1e-2,
                warmup_steps=0, save_every=0, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _rows(out, key="loss"):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_grpo_learns_a_user_reward_and_logs_rollouts(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=12, batch_size=4, num_generations=8))
    rows = _rows(out, "reward")
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.15, [round(r["reward"], 2) for r in rows]
    assert {"reward_std", "rewards/reward.space_first/mean", "completion_length", "frac_reward_zero_std",
            "rollout_tokens_per_s", "clip_ratio/region_mean"} <= set(rows[0])
    rollouts = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 12 * 4 * 8  # every completion of every step, with its rewards
    r = rollouts[0]
    assert r["reward"] == float(r["completion"].startswith(" ")) and r["rewards"] == {"reward.space_first": r["reward"]}
    # advantages are group-relative: each group of 8 sums to zero
    for g in range(0, 64, 8):
        assert abs(sum(x["advantage"] for x in rollouts[g:g + 8])) < 1e-4


@pytest.mark.parametrize("mode", ["lora", "state"])
def test_grpo_reference_is_the_base_in_lora_and_state_modes(data, tmp_path, mode):
    """With beta > 0 the KL to the reference is exactly 0 at the first step (the policy starts as
    the base, and the reference is the base with the trained parts off), then grows."""
    out = tmp_path / mode
    train(_cfg(data, out, mode=mode, beta=0.1, max_steps=3, lr=5e-2 if mode == "state" else 1e-2))
    kl = [r["kl"] for r in _rows(out, "kl")]
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-6


def test_grpo_resume_mid_iterations_continues_identically(data, tmp_path, monkeypatch):
    """num_iterations=2: the rollouts of a batch serve two steps; a run stopped between them resumes
    with the same stored rollouts and updates, as the uninterrupted run."""
    import rwkvtune.train.trainer as trainer_mod

    kw = dict(max_steps=6, save_every=1, num_iterations=2, seed=3)
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(data, full, **kw))
    real_lr_at = trainer_mod.lr_at

    def die_at_step_4(step, *a):
        if step == 3:  # the second step on the rollouts sampled at step 3
            raise KeyboardInterrupt
        return real_lr_at(step, *a)

    monkeypatch.setattr(trainer_mod, "lr_at", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, part, **kw))
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)
    train(TrainConfig(resume=str(part)))
    la, lb = [r["loss"] for r in _rows(full)], [r["loss"] for r in _rows(part)]
    assert len(lb) == 6 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-6
    ra, rb = [(Path(d) / "rollouts.jsonl").read_text() for d in (full, part)]
    assert ra == rb  # the same completions, sampled once per batch
    wa, wb = torch.load(full / "final.pth"), torch.load(part / "final.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _torchrun(data, out, strategy: str, *extra: str) -> None:
    """A 2-process GRPO run (num_iterations 2: the rollouts of step 1 serve step 2 too) in full mode
    with a KL term; ``extra`` options are added, and "--resume" continues the run in ``out``."""
    import socket

    with socket.socket() as sock:  # a fixed port clashes with another suite running at once
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "rwkvtune", "train"]
    if extra[:1] == ("--resume",):
        cmd += ["--resume", str(out), *extra[1:]]
    else:
        cmd += ["--model", data["ckpt"], "--data", data["prompts"], "--out", str(out),
                "--method", "grpo", "--reward", data["reward"], "--reward", "exact_match:answer", "--ctx-len", "32",
                "--batch-size", "2", "--max-steps", "2", "--save-every", "0", "--strategy", strategy,
                "--save-dtype", "fp32", "num_generations=4", "max_completion_length=4", "tensorboard=false",
                "reward_weights=[1.0,0.5]", "num_iterations=2", "adam_eps=1e-6", "beta=0.04", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def torchrun_runs(data, tmp_path_factory):
    """run(strategy): the same 2-process GRPO run (2 steps) under ddp or fsdp, made once per module;
    full mode with a KL term, so each keeps a reference copy of the starting model (sharded under fsdp)."""
    runs = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            out = tmp_path_factory.mktemp("grpo-torchrun") / strategy
            _torchrun(data, out, strategy)
            runs[strategy] = out
        return runs[strategy]

    return run


def test_grpo_ddp_splits_prompts_across_processes(torchrun_runs):
    out = torchrun_runs("ddp")
    rollouts = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 4  # processes x prompts x generations, gathered (step 2 reuses them)
    assert len({r["prompt"] for r in rollouts}) == 4  # the two processes sampled for different prompts
    for r in rollouts:  # the weighted total of both rewards
        assert r["reward"] == pytest.approx(r["rewards"]["reward.space_first"] + 0.5 * r["rewards"]["exact_match:answer"])


def test_grpo_fsdp_equals_ddp(data, torchrun_runs):
    """Sharded rollouts: every process decodes its own rows for its own number of steps (a sharded
    forward would wait for the other process's gathers); samples and the update equal ddp's."""
    ddp, fsdp = torchrun_runs("ddp"), torchrun_runs("fsdp")
    completions = lambda out: [(r["prompt"], r["completion"])  # noqa: E731
                               for r in map(json.loads, (out / "rollouts.jsonl").read_text().splitlines())]
    assert completions(fsdp) == completions(ddp)
    kl = lambda out: [r["kl"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if "kl" in r]
    assert kl(ddp)[-1] > 0 and kl(fsdp) == pytest.approx(kl(ddp), rel=1e-4, abs=1e-9)  # the second update moved away
    wa = torch.load(ddp / "final.pth", weights_only=True)
    wb = torch.load(fsdp / "final.pth", weights_only=True)
    base = torch.load(data["ckpt"], weights_only=True)
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], base[k]) for k in wa)  # the two steps did train
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_two_processes_resumed_mid_batch_equal_the_uninterrupted_run(data, torchrun_runs, tmp_path, strategy):
    """Stopped after step 1 (its rollouts still serve step 2) and resumed on the same 2 processes:
    each process continues with its own rollouts (and RNG), so losses and weights equal the
    uninterrupted run's exactly. (Each process once got process 0's rollouts.)"""
    full, part = torchrun_runs(strategy), tmp_path / "part"
    _torchrun(data, part, strategy, "--max-steps", "1")
    _torchrun(data, part, strategy, "--resume", "--max-steps", "2")
    assert [r["loss"] for r in _rows(part)] == [r["loss"] for r in _rows(full)]
    assert (part / "rollouts.jsonl").read_text() == (full / "rollouts.jsonl").read_text()
    wa, wb = torch.load(full / "final.pth", weights_only=True), torch.load(part / "final.pth", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from rwkvtune.train.checkpointing import read_checkpoint_info
    from rwkvtune.train.run_dir import RunDir

    kept = RunDir(part).checkpoint_files()  # each with both processes' own files, of its own save
    for ck in kept:
        nonce = read_checkpoint_info(ck)["rank_states"]["nonce"]
        assert all(RunDir.rank_state_file(ck, r, 2, nonce).is_file() for r in (0, 1))
        if ck.is_dir():  # sealed with the folder: in its manifest
            assert {"rank-0-of-2.pt", "rank-1-of-2.pt"} <= set(json.loads((ck / "manifest.json").read_text())["files"])
    assert len(RunDir(part).rank_state_files()) == (2 * len(kept) if strategy == "ddp" else 0)  # no stale ones


def test_a_failing_reward_function_stops_with_its_name(data, tmp_path):
    bad = data["dir"] / "bad_reward.py"
    bad.write_text("def short(prompts, completions, **kw):\n    return [1.0]\n")
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data",
                          data["prompts"], "--out", str(tmp_path / "o"), "--method", "grpo", "--reward", f"{bad}:short",
                          "--ctx-len", "32", "--batch-size", "2", "--max-steps", "1", "num_generations=4",
                          "max_completion_length=2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr[res.stderr.index("error: "):].splitlines()[0]
    assert "reward 'bad_reward.short'" in line and "bad_reward.py" in line and "1 values for 8 completions" in line
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data",
                          data["prompts"], "--out", str(tmp_path / "p"), "--method", "grpo"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "reward: missing" in res.stderr


@pytest.mark.parametrize("beta, mode, copy", [(0.0, "full", False), (0.04, "full", True), (0.04, "lora", False)])
def test_memory_plan_counts_the_group_and_a_reference_copy(data, tmp_path, beta, mode, copy):
    """The dry run's estimate plans num_generations sequences per prompt, each the longest prompt
    plus max_completion_length, and a frozen copy of the model only when full mode needs a reference."""
    from rwkvtune.data.prompts import read_prompts
    from rwkvtune.tokenizer import get_tokenizer

    longest = max(len(r.ids) for r in read_prompts(data["prompts"], get_tokenizer())[0])
    report = train(_cfg(data, tmp_path / "dry", beta=beta, mode=mode, max_completion_length=7), dry_run=True)
    settings, terms = report["memory_estimate"]["settings"], report["memory_estimate"]["terms"]
    assert (settings["batch_size"], settings["rows"], settings["ctx_len"]) == (2, 4, longest + 7)
    assert (terms["reference"] > 0) == copy


HOSTILE = '''import os, sys, time

def exits(prompts, completions, **kw):
    sys.exit(0)

def hard_exit(prompts, completions, **kw):
    os._exit(0)

def hangs(prompts, completions, **kw):
    time.sleep(120)

def half_nan(prompts, completions, **kw):
    return [float("nan") if i % 2 else 1.0 + c.startswith(" ") for i, c in enumerate(completions)]
'''


@pytest.mark.parametrize("name, extra, says", [
    ("exits", [], "raised SystemExit(0); a reward function must return one number per completion, not exit"),
    ("hard_exit", [], "the reward worker process exited with status 0 (os._exit or a crash) while this function ran"),
    ("hangs", ["reward_timeout=1"], "did not return within reward_timeout=1 s for 8 completions; the worker was "
                                    "stopped"),
])
def test_a_reward_that_exits_or_hangs_fails_the_run(data, tmp_path, name, extra, says):
    """Before: sys.exit(0) or os._exit(0) in a reward ended training with status 0 and nothing said,
    and a hanging reward hung the run forever. Now: status 2, one line naming the function."""
    import time

    (tmp_path / "hostile.py").write_text(HOSTILE)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data",
                          data["prompts"], "--out", str(tmp_path / "o"), "--method", "grpo", "--reward",
                          f"{tmp_path / 'hostile.py'}:{name}", "--ctx-len", "32", "--batch-size", "2", "--max-steps",
                          "1", "num_generations=4", "max_completion_length=2", "tensorboard=false", *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr[res.stderr.index("error: "):].splitlines()[0]
    assert f"reward 'hostile.{name}' (from {tmp_path / 'hostile.py'})" in line and says in line, line
    assert not (tmp_path / "o" / "final.pth").exists()
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("field", ["completions", "prompts"])
def test_a_data_field_named_like_a_reward_argument_is_refused_before_training(data, tmp_path, field):
    from rwkvtune.errors import DataError

    prompts = tmp_path / "clash.jsonl"
    prompts.write_text(json.dumps({"prompt": "1 plus 1 is", field: "2"}) + "\n")
    cfg = _cfg(data, tmp_path / "o")
    cfg.data = str(prompts)
    with pytest.raises(DataError, match=rf"{prompts}: field '{field}' has the name of an argument every reward "
                                        rf"function is called with .*; rename that field in the data"):
        train(cfg, dry_run=True)


def test_invalid_rewards_are_counted_in_the_metrics(data, tmp_path, capsys):
    """A reward returning NaN for some completions: they count 0, the run goes on, the metrics say
    how many (rewards/NAME/invalid_frac), rollouts.jsonl writes null, a warning says it once."""
    (tmp_path / "hostile.py").write_text(HOSTILE)
    out = tmp_path / "run"
    train(_cfg(data, out, reward=(f"{tmp_path / 'hostile.py'}:half_nan",), max_steps=2, seed=1))
    rows = _rows(out, "reward")
    rollouts = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        step = [r["rewards"]["hostile.half_nan"] for r in rollouts if r["step"] == row["step"]]
        valid = step[0::2]
        assert step[1::2] == [None] * len(valid) and None not in valid  # NaN written as null
        assert row["rewards/hostile.half_nan/invalid_frac"] == 0.5
        assert row["rewards/hostile.half_nan/mean"] == pytest.approx(sum(valid) / len(valid))  # valid values only
        assert row["reward"] == pytest.approx(sum(valid) / len(step))  # invalid ones count 0 in the total
    assert capsys.readouterr().err.count("warning: reward 'hostile.half_nan'") == 1


def test_grpo_metrics_say_what_each_value_is_a_mean_over():
    """GRPOMetrics (issue 21): the loss per loss unit, the KL and clip ratios per completion token,
    rollout values per sampled completion, per group, per valid reward; summed over micro-batches
    and processes, the means stay those of all the data, and rollouts stored by an older version
    (one flat mapping with "_r_" counts) log the same."""
    import torch as _torch

    from rwkvtune.train.methods.grpo import GRPOMetrics, _rollout_metrics, _rollout_sums

    class C:
        def __init__(self, n):
            self.token_ids = [1] * n

    total = _torch.tensor([1.0, 0.0, 1.0, 1.0])  # two groups of two
    per_fn = _torch.tensor([[1.0], [float("nan")], [1.0], [1.0]])
    stored = _rollout_sums(total, per_fn, ["f"], [C(2), C(4), C(1), C(1)], 2, "group", 2.0)
    a = GRPOMetrics({"loss": 6.0, "kl": 0.5 * 3}, {"tokens": 3.0}).add(_rollout_metrics(stored))
    b = GRPOMetrics({"loss": 2.0, "kl": 0.1 * 1}, {"tokens": 1.0})  # a micro-batch without rollouts
    acc = GRPOMetrics().add(a).add(b)
    rows = acc.rows(units=4.0)
    assert rows["loss"] == 2.0 and rows["kl"] == pytest.approx((1.5 + 0.1) / 4)
    assert rows["reward"] == 0.75 and rows["completion_length"] == 2.0 and rows["rollout_tokens_per_s"] == 4.0
    assert rows["rewards/f/mean"] == 1.0 and rows["rewards/f/invalid_frac"] == 0.25  # NaN out of the mean, counted
    assert rows["reward_std"] == pytest.approx(float(_torch.tensor([1.0, 0.0]).std()) / 2)
    assert not any(k.startswith("_") or k in ("tokens", "rollout_completions") for k in rows)  # counts: not logged
    # over two processes holding the same: the same means
    assert acc.reduced(lambda xs: [2 * x for x in xs]).rows(units=8.0) == pytest.approx(rows)
    # an older checkpoint's stored rollouts
    old = {**stored["sums"], "_r_completions": 4.0, "_r_groups": 2.0, "_r_seconds": 2.0, "_r_valid/f": 3.0}
    assert GRPOMetrics().add(_rollout_metrics(old)).rows(1.0) == GRPOMetrics().add(_rollout_metrics(stored)).rows(1.0)
    assert GRPOMetrics({"loss": 0.0}).rows(units=0.0)["loss"] is None  # a row without loss units
