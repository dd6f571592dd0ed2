"""Defaults of ``rwkvtune train`` that work the first time (issue 22): a learning rate per mode that
learns, said with where it came from, and a fresh run directory when --out is not given."""

import argparse
import json
import os
import re

import pytest

from helpers import train_losses, write_checkpoint
from rwkvtune.configs.model_loader import ModelConfig
from rwkvtune.constants import MODE_DEFAULT_LR, SCRATCH_LR
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.config import TrainConfig, default_out

TINY = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("defaults")
    text = d / "d.jsonl"
    text.write_text("".join(json.dumps({"text": f"red blue green cat dog bird {i}."}) + "\n" for i in range(24)))
    return {"ckpt": write_checkpoint(d / "tiny.pth", **TINY), "text": str(text)}


# ---- learning rate: one table, one resolve path, the source said ----------------------------------
@pytest.mark.parametrize("model, mode, init, lr, origin", [
    ("1.5b", "full", "pretrained", 1e-5, "RWKV7-1.5B's recommended_lr"),
    ("7.2b", "full", "pretrained", 1e-6, "RWKV7-7.2B's recommended_lr"),
    ("1.5b", "lora", "pretrained", 1e-4, "LoRA default"),  # was 1e-5, the full fine-tune's
    ("7.2b", "lora", "pretrained", 1e-4, "LoRA default"),  # was 1e-6
    ("0.1b", "state", "pretrained", 1e-2, "state-tuning default"),
    ("0.1b", "full", "scratch", 6e-4, "default for init scratch"),
])
def test_each_mode_resolves_its_default_lr_and_says_where_it_came_from(model, mode, init, lr, origin):
    c = TrainConfig(model=model, data="x.jsonl", mode=mode, init=init, out="o", device="cpu")
    r = c.resolve(ModelConfig.from_name(model))
    assert r.lr == lr and r.lr_final == pytest.approx(lr / 10) and r.origins["lr"] == origin
    assert c.lr is None  # resolve copies: the caller's config keeps what it gave


def test_the_one_table_holds_every_mode():
    from rwkvtune.constants import MODES

    assert set(MODE_DEFAULT_LR) == set(MODES) and MODE_DEFAULT_LR["full"] is None and SCRATCH_LR == 6e-4


@pytest.mark.parametrize("source, said", [
    ("command line", "--lr"),
    ("command line (key=value)", "lr=... on the command line"),
    ("recipe r.yaml", "recipe r.yaml"),
])
def test_a_given_lr_is_said_as_given(source, said):
    c = TrainConfig(model="1.5b", data="x.jsonl", mode="lora", out="o", device="cpu").update({"lr": 3e-4}, source)
    r = c.resolve(ModelConfig.from_name("1.5b"))
    assert r.lr == 3e-4 and r.origins["lr"] == said and r.origins["out"] == "set in the config"


def test_help_all_states_the_real_rule(capsys):
    from rwkvtune.cli.train import options_help

    text = options_help()
    assert "lr=null  [--lr]" in text
    assert "lora 1e-4, state 1e-2, full the model's recommended_lr (init scratch: 6e-4)" in text
    assert "recommended_lr (state mode: 1e-2)" not in text  # the old rule, which left out LoRA and scratch
    from rwkvtune.cli import main

    assert main(["train", "--help"]) == 0
    assert ("--lr LR peak learning rate (default by --mode: lora 1e-4, state 1e-2, full the model's recommended_lr, "
            "or 6e-4 with --init scratch; the run says which it used)") in " ".join(capsys.readouterr().out.split())


def test_tiny_lora_run_with_the_default_lr_learns_where_the_old_default_barely_moved(data, tmp_path, capsys):
    """The same 60 steps of LoRA on a tiny model: the mode's default lr against the full fine-tune's
    1e-5 that LoRA used to get (the issue's run went 3.69 -> 3.68)."""
    from rwkvtune.train.trainer import train

    base = dict(model=data["ckpt"], data=data["text"], mode="lora", ctx_len=16, batch_size=4, max_steps=60,
                warmup_steps=0, save_every=0, tensorboard=False, device="cpu", threads=1)
    train(TrainConfig(out=str(tmp_path / "default"), **base))
    assert "lr 0.0001 (LoRA default), lr_final 1e-05; run directory" in capsys.readouterr().err
    train(TrainConfig(out=str(tmp_path / "old"), lr=1e-5, **base))
    new, old = train_losses(tmp_path / "default"), train_losses(tmp_path / "old")
    assert new[0] == old[0]  # the same start
    fall_new, fall_old = new[0] - min(new[-5:]), old[0] - min(old[-5:])
    # measured: 11.77 -> 11.06 with the default, -> 11.41 with 1e-5 (a random tiny model's loss
    # starts near ln(65536) = 11.1 and falls slowly through frozen random weights)
    assert fall_new > 0.5 and fall_new > 1.8 * fall_old, (new, old)


# ---- --out: a new directory per run -----------------------------------------------------------------
def test_runs_without_out_get_new_directories_and_never_collide(data, tmp_path, monkeypatch, capsys):
    from rwkvtune.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", data["ckpt"], "--data", data["text"], "--mode", "lora", "--ctx-len", "8",
            "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "0", "tensorboard=false"]
    assert main([*argv, "--dry-run"]) == 0  # a dry run writes nothing, and is not refused (it was: ./out)
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"--out runs/tiny-lora-sft-\d{8}-\d{6} \(default: a new directory; --out names one\)", out), out
    assert not (tmp_path / "runs").exists()
    assert main(argv) == 0
    assert main(argv) == 0  # a second run: a new directory, not a refusal
    err = capsys.readouterr().err
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r"tiny-lora-sft-\d{8}-\d{6}(-2)?", r) for r in runs), runs
    for r in runs:
        assert f"run directory runs/{r} (default: a new directory; --out names one)" in err
        assert (tmp_path / "runs" / r / "final.pth").is_file()
    # resume is unaffected: it continues in the run's own directory
    first = tmp_path / "runs" / runs[0]
    assert main(["train", "--resume", str(first), "--max-steps", "2"]) == 0
    assert not (tmp_path / "runs" / runs[1] / "checkpoints" / "step-0000002.pt").exists()
    assert len(list((tmp_path / "runs").iterdir())) == 2 and len(train_losses(first)) == 2


def test_default_out_adds_a_suffix_when_the_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, mc = TrainConfig(mode="state", method="dpo"), ModelConfig.from_name("1.5b")
    first = default_out(cfg, mc, now=0)
    assert re.fullmatch(r"runs/rwkv7-1\.5b-state-dpo-\d{8}-\d{6}", first), first
    os.makedirs(first)
    assert default_out(cfg, mc, now=0) == first + "-2"
    (tmp_path / (first + "-2")).write_text("a file also counts")
    assert default_out(cfg, mc, now=0) == first + "-3"


def test_default_out_sanitises_the_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mc = ModelConfig.from_name("0.1b")
    mc.model_name = "../My Model/x"  # from a file stem or a config: never a path or a space
    name = default_out(TrainConfig(), mc, now=0)
    assert re.fullmatch(r"runs/my-model-x-full-sft-\d{8}-\d{6}", name), name


def test_default_out_under_torchrun_is_refused_naming_out(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^out: missing under torchrun.*pass --out DIR"):
        default_out(TrainConfig(), ModelConfig.from_name("0.1b"))


# ---- flags: no abbreviations, a guess for a typo, key=value anywhere --------------------------------
@pytest.mark.parametrize("argv, line", [
    # a prefix was silently taken for the flag; now it is an unknown flag, with the one it looks like
    (["train", "--max-step", "5"], "rwkvtune train: error: unrecognized arguments: --max-step (did you mean "
                                   "--max-steps?) (see rwkvtune train --help)"),
    # another trainer's name (TRL's learning_rate), or a typo of it: ours
    (["train", "--lerning-rate", "1"], "rwkvtune train: error: unrecognized arguments: --lerning-rate "
                                       "(did you mean --lr?) (see rwkvtune train --help)"),
    (["train", "--gradient-accumulation-steps", "2"], "rwkvtune train: error: unrecognized arguments: "
     "--gradient-accumulation-steps (did you mean --grad-accum?) (see rwkvtune train --help)"),
    (["train", "--zzz", "1"], "rwkvtune train: error: unrecognized arguments: --zzz "
                              "(see rwkvtune train --help)"),  # nothing close: no guess
    (["train", "--ctx-lne", "8", "--mdoe", "lora"], "rwkvtune train: error: unrecognized arguments: --ctx-lne "
     "--mdoe lora (did you mean --ctx-len for --ctx-lne, --mode for --mdoe?) (see rwkvtune train --help)"),
    (["generate", "--model", "x.pth", "--promt", "p"], "rwkvtune generate: error: unrecognized arguments: --promt "
                                                       "p (did you mean --prompt?) (see rwkvtune generate --help)"),
    (["models", "show", "0.1b", "--jsn"], "rwkvtune models show: error: unrecognized arguments: --jsn (did you "
                                          "mean --json?) (see rwkvtune models show --help)"),
    (["--vers"], "rwkvtune: error: unrecognized arguments: --vers (did you mean --version?) (see rwkvtune --help)"),
])
def test_unknown_and_abbreviated_flags_are_refused_with_a_guess(capsys, argv, line):
    from rwkvtune.cli import main

    assert main(argv) == 2
    assert capsys.readouterr().err == line + "\n"


def test_no_parser_takes_abbreviations():
    from rwkvtune.cli import COMMANDS, build_parser

    for cmd in COMMANDS:
        parser = build_parser([cmd.name])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        todo = [parser, sub.choices[cmd.name]]
        while todo:
            p = todo.pop()
            assert p.allow_abbrev is False, p.prog
            todo += [q for a in p._actions if isinstance(a, argparse._SubParsersAction)
                     for q in a.choices.values()]


def test_key_value_is_taken_after_flags_too(data, tmp_path, capsys):
    from rwkvtune.cli import main

    assert main(["train", "--model", data["ckpt"], "lr=3e-3", "--data", data["text"], "--out", str(tmp_path / "o"),
                 "warmup_steps=0", "--mode", "lora", "lora_r=4", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    c = report["config"]
    assert (c["lr"], c["warmup_steps"], c["lora_r"], c["mode"]) == (3e-3, 0, 4, "lora")
    origins = {k: v for k, v in report["origins"].items() if k != "precision"}  # the CPU's choice (conftest pins fp32)
    assert origins == {"lr": "lr=... on the command line", "out": "--out"}


def test_ctrl_c_in_a_run_without_out_names_its_default_directory(data, tmp_path, monkeypatch, capsys):
    """Only train() knows a default run directory: an immediate Ctrl-C after a checkpoint names it
    and the command that resumes it (the CLI knew only --out)."""
    import rwkvtune.train.trainer as trainer_mod
    from rwkvtune.cli import main

    monkeypatch.chdir(tmp_path)
    real_lr_at = trainer_mod.lr_at

    def interrupt_at_third_step(step, *a):
        if step == 2:
            raise KeyboardInterrupt  # a second Ctrl-C: no step to finish
        return real_lr_at(step, *a)

    monkeypatch.setattr(trainer_mod, "lr_at", interrupt_at_third_step)
    assert main(["train", "--model", data["ckpt"], "--data", data["text"], "--ctx-len", "8", "--batch-size", "2",
                 "--max-steps", "4", "--save-every", "2", "--warmup-steps", "0", "tensorboard=false"]) == 130
    [run] = (tmp_path / "runs").iterdir()
    err = capsys.readouterr().err
    assert (f"stopped by Ctrl-C; the checkpoints in runs/{run.name}/checkpoints are kept; resume with: rwkvtune "
            f"train --resume runs/{run.name}") in err, err[-1000:]
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)
    assert main(["train", "--resume", f"runs/{run.name}"]) == 0
    assert len(train_losses(run)) == 4
