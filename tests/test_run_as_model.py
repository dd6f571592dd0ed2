"""A training run's directory as the model name, in every command and in Python: its final.pth,
or its base model with the run's adapter or tuned state (rwkvtune/configs/run_source.py); and the
"what next" line at the end of each kind of run names commands that run on its output."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from helpers import write_checkpoint
from rwkvtune.cli import main
from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.trainer import train

ASSETS = Path(__file__).resolve().parents[1] / "rwkvtune" / "assets"
SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
COMMON = dict(ctx_len=16, batch_size=2, max_steps=2, lr=1e-2, warmup_steps=0, save_every=0, tensorboard=False,
              save_dtype="fp32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny finished run per mode (full, lora, state) on one base, with their summaries."""
    d = tmp_path_factory.mktemp("runs")
    text = d / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"red blue green {i} cat dog bird runs."}) + "\n" for i in range(12)))
    base = write_checkpoint(d / "base.pth", **SMALL)
    out = {"dir": d, "base": base, "text": str(text)}
    for mode in ("full", "lora", "state"):
        out[mode] = train(TrainConfig(model=base, data=str(text), out=str(d / mode), mode=mode, **COMMON))
    return out


def _logits(model, wkv_init=None):
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        return model(idx, wkv_init=wkv_init)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    status = main(list(argv))
    cap = capsys.readouterr()
    return status, cap.out, cap.err


def test_python_loads_each_kind_of_run(runs, tmp_path):
    import rwkvtune
    from rwkvtune import RWKV7, load_model_config
    from rwkvtune.peft.state import load_state_file

    d = runs["dir"]
    full = RWKV7.from_checkpoint(d / "full")
    assert torch.equal(_logits(full), _logits(RWKV7.from_checkpoint(d / "full" / "final.pth")))
    assert load_model_config(d / "full").model_path == str(d / "full" / "final.pth")
    assert load_model_config(d / "state").model_path == runs["base"]
    with pytest.raises(CheckpointError, match=r"state-tuning run: its result is state\.pth on the unchanged base "
                                              r"model .*base\.pth; load both with: model, wkv_init = "
                                              r"rwkvtune\.load_model\("):
        RWKV7.from_checkpoint(d / "state")
    model, wkv_init = rwkvtune.load_model(str(d / "state"))
    base = RWKV7.from_checkpoint(runs["base"])
    assert torch.equal(wkv_init, load_state_file(d / "state" / "state.pth", base))
    assert torch.equal(_logits(model, wkv_init), _logits(base, wkv_init))
    assert not torch.equal(_logits(base, wkv_init), _logits(base))  # the state was trained: it matters
    # a LoRA run whose final.pth was removed: its adapter on its base equals the merged model
    lora = tmp_path / "lora"
    shutil.copytree(d / "lora", lora)
    (lora / "final.pth").unlink()
    model, wkv_init = rwkvtune.load_model(str(lora))
    merged = RWKV7.from_checkpoint(d / "lora" / "final.pth")
    assert wkv_init is None and torch.allclose(_logits(model), _logits(merged), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(merged), _logits(base), atol=1e-4, rtol=1e-4)


def test_generate_takes_a_run_dir(runs, capsys):
    d = runs["dir"]
    flags = ["--prompt", "red blue", "--max-tokens", "6", "--temperature", "0", "--device", "cpu"]
    for run, same in ((d / "full", ["--model", str(d / "full" / "final.pth")]),
                      (d / "state", ["--model", runs["base"], "--state", str(d / "state" / "state.pth")])):
        status, by_run, err = _cli(capsys, "generate", "--model", str(run), *flags)
        assert status == 0, err
        assert _cli(capsys, "generate", *same, *flags)[1] == by_run
    status, _, err = _cli(capsys, "generate", "--model", str(d / "state"), "--state", str(d / "state" / "state.pth"),
                          *flags)
    assert status == 2 and "--state" in err and "brings its own state" in err


def test_eval_takes_a_run_dir(runs, capsys):
    d, data = runs["dir"], ["--data", runs["text"], "--ctx-len", "16", "--device", "cpu"]
    scores = {}
    for name, argv in (("state run", ["--model", str(d / "state")]),
                       ("base + state", ["--model", runs["base"], "--state", str(d / "state" / "state.pth")]),
                       ("base", ["--model", runs["base"]]),
                       ("full run", ["--model", str(d / "full")]),
                       ("full final", ["--model", str(d / "full" / "final.pth")])):
        status, out, err = _cli(capsys, "eval", *argv, *data)
        assert status == 0, err
        scores[name] = json.loads(out)
    assert scores["state run"] == scores["base + state"] != scores["base"]
    assert scores["full run"] == scores["full final"] and scores["full run"]["ctx_len"] == 16


def test_inspect_and_export_take_a_run_dir(runs, capsys, tmp_path):
    d = runs["dir"]
    status, out, _ = _cli(capsys, "inspect", str(d / "full"), "--json")
    assert status == 0 and json.loads(out)["n_embd"] == 32
    status, out, err = _cli(capsys, "inspect", str(d / "state"), "--json")
    assert status == 0 and json.loads(out)["n_layer"] == 2 and "state.pth on its base model" in err
    status, _, err = _cli(capsys, "export", str(d / "full"), str(tmp_path / "hf"))
    assert status == 0 and (tmp_path / "hf" / "config.json").is_file(), err
    status, _, err = _cli(capsys, "export", str(d / "state"), str(tmp_path / "hf2"))
    assert status == 2 and "export the base model" in err and not (tmp_path / "hf2").exists()


def test_train_takes_a_run_dir(runs, tmp_path):
    from rwkvtune.safe_yaml import read_yaml_file

    d = runs["dir"]
    out = tmp_path / "again"
    train(TrainConfig(model=str(d / "full"), data=runs["text"], out=str(out), **{**COMMON, "max_steps": 1}))
    saved = read_yaml_file(out / "config.yaml", "run config", "")
    assert saved["model"] == str((d / "full" / "final.pth").resolve())  # the file trained from, absolute
    with pytest.raises(ConfigError, match=r"state-tuning run.*train from that base with --model"):
        train(TrainConfig(model=str(d / "state"), data=runs["text"], out=str(tmp_path / "no"), **COMMON))
    assert not (tmp_path / "no").exists()


def _copy_state_run(runs, tmp_path, name="s") -> Path:
    run = tmp_path / name
    shutil.copytree(runs["dir"] / "state", run)
    return run


@pytest.mark.parametrize("case,words", [
    ("empty", "neither a Hugging Face model folder (config.json) nor a training run"),
    ("unfinished", "a training run that has not finished"),
    ("no config", "a training run without its config.yaml"),
    ("scratch", "initialised from scratch (init: scratch"),
    ("loop", "leads back to a run directory again"),
    ("not a dict", "expected the run's resolved config with a 'model' field"),
])
def test_run_dirs_that_cannot_be_a_model_are_one_line(runs, tmp_path, capsys, case, words):
    if case == "empty":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "unfinished":
        run = tmp_path / "unfinished"
        (run / "checkpoints").mkdir(parents=True)
    else:
        run = _copy_state_run(runs, tmp_path)
        cfg = run / "config.yaml"
        if case == "no config":
            cfg.unlink()
        elif case == "scratch":
            cfg.write_text(cfg.read_text().replace("init: pretrained", "init: scratch"))
        elif case == "loop":
            cfg.write_text(cfg.read_text().replace(f"model: {runs['base']}", f"model: {run}"))
        else:
            cfg.write_text("- just a list\n")
    for argv in (["generate", "--model", str(run), "--prompt", "x"], ["inspect", str(run)],
                 ["eval", "--model", str(run), "--data", runs["text"]]):
        status, _, err = _cli(capsys, *argv)
        assert status == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_run_source_names_agree_with_the_run_layout():
    from rwkvtune.configs import run_source
    from rwkvtune.train.run_dir import RunDir

    for fmt, suffix in (("pth", ".pth"), ("safetensors", ".safetensors")):
        run = RunDir("r", fmt)
        assert [run.final.name, run.adapter.name, run.state.name] == [s + suffix for s in run_source.OUTPUT_STEMS]
        assert suffix in run_source.SUFFIXES and run.config.name == run_source.RUN_CONFIG


# ---- what next --------------------------------------------------------------------------------


def _run_printed(line: str, capsys) -> list[str]:
    """Run every command the what-next line names (through main, as a shell would split them)."""
    commands = [c for part in line.split("try it: ")[1:] for c in part.split("  or score it: ")]
    assert commands, line
    for cmd in commands:
        argv = shlex.split(cmd)
        assert argv[0] == "rwkvtune"
        # as printed, on CPU, and generating a few tokens, not 200 (a test's time; the flags are the same)
        extra = ["--max-tokens", "4"] if argv[1] == "generate" else []
        status, _, err = _cli(capsys, *argv[1:], "--device", "cpu", *extra)
        assert status == 0, (cmd, err)
    return commands


def test_what_next_after_sft_runs_in_every_mode(runs, capsys):
    from rwkvtune.cli.train import next_steps

    for mode in ("full", "lora", "state"):
        line = next_steps(runs[mode])
        commands = _run_printed(line, capsys)
        assert [c.split()[1] for c in commands] == ["generate", "eval"], line
        assert f"--model {runs['dir'] / mode}" in line


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_what_next_after_dpo_and_grpo_runs(runs, tmp_path, capsys, method):
    """Their data (preference pairs, prompts) is no eval data: the line offers generate, in chat form."""
    from rwkvtune.cli.train import next_steps

    if method == "dpo":
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("\n".join((ASSETS / "sample_preference.jsonl").read_text().splitlines()[:4]) + "\n")
        extra = dict(data=str(pairs), method="dpo", ctx_len=64, max_steps=1)
    else:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"{a} plus 1 is", "answer": str(a + 1)}) + "\n"
                                   for a in range(4)))
        extra = dict(data=str(prompts), method="grpo", reward=("exact_match:answer",), num_generations=2,
                     max_completion_length=2, ctx_len=32, max_steps=1)
    summary = train(TrainConfig(model=runs["base"], out=str(tmp_path / method), mode="lora",
                                **{**COMMON, **extra}))
    line = next_steps(summary)
    assert "eval" not in line and "--chat" in line, line
    _run_printed(line, capsys)
