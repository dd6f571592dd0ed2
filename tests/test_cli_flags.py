"""One flag vocabulary: the flags of ``rwkvtune train`` are built from the options' table
(rwkvtune/models/rwkv7/flags.py) and land in the config exactly as key=value does; ``generate``
and ``eval`` take the same model flags, ``--adapter`` a LoRA file or run included."""

from __future__ import annotations

import argparse
import functools
import json

import pytest

from helpers import write_checkpoint
from rwkvtune.cli import build_parser, main
from rwkvtune.cli.train import config_from_args
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7 import flags as flags_mod
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.models.rwkv7.flags import TRAIN_FLAGS, flag_options


@functools.lru_cache(maxsize=None)
def _parser(name: str) -> argparse.ArgumentParser:
    return build_parser([name])


def _command_parser(name: str) -> argparse.ArgumentParser:
    parser = _parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _train_config(argv: list[str]) -> TrainConfig:
    return config_from_args(_parser("train").parse_args(["train", *argv]))


# ---- the flags come from the table, one each ---------------------------------------------------


def test_every_flagged_option_has_exactly_one_argparse_option():
    p = _command_parser("train")
    options = flag_options()
    assert sorted(o.name for o in options) == sorted(TRAIN_FLAGS)
    for opt in options:
        actions = [a for a in p._actions if opt.flag in a.option_strings]
        assert len(actions) == 1, opt.flag
        assert actions[0].dest == opt.name and actions[0].default is None, opt.flag  # None: a recipe's value stands
    # and no option of the config has a flag that bypasses the table
    dests = {a.dest for a in p._actions if a.option_strings}
    assert dests & set(TrainConfig.option_names()) == set(TRAIN_FLAGS)
    # the flags the issue names, as TRL spells them
    for flag in ("--beta", "--num-generations", "--loss-type", "--max-completion-length", "--eval-on-start",
                 "--save-format", "--wandb", "--packing", "--no-packing", "--no-memory-check", "--reward"):
        assert flag in p._option_string_actions, flag


def test_a_table_entry_that_names_no_option_is_refused(monkeypatch):
    monkeypatch.setitem(flags_mod.TRAIN_FLAGS, "num_generation", flags_mod.Flag())
    with pytest.raises(ConfigError, match=r"^TRAIN_FLAGS: num_generation: not TrainConfig options$"):
        flag_options()


def _values(opt, action) -> list[tuple[list[str], str]]:
    """(flag argv, the same as key=value) pairs that set ``opt`` to something not its default."""
    key = opt.name
    if opt.kind is bool:
        return [([opt.flag], f"{key}=true"), ([f"--no-{opt.flag[2:]}"], f"{key}=false")]
    if opt.kind == "repeat":
        return [([opt.flag, "exact_match:answer", opt.flag, "format:x"], f"{key}=[exact_match:answer,format:x]")]
    if opt.kind == "list":
        return [([opt.flag, "1,2"], f"{key}=1,2")]
    choices = action.choices or opt.choices
    value = str(choices[-1]) if choices else {int: "3", float: "0.25", str: "x"}[opt.kind]
    return [([opt.flag, value], f"{key}={value}")]


@pytest.mark.parametrize("opt", flag_options(), ids=lambda o: o.flag)
def test_each_flag_lands_in_the_config_as_key_value_does(opt):
    """Every flag, generated: its value reaches the option, the same config as key=value."""
    action = _command_parser("train")._option_string_actions[opt.flag]
    base = ["--method", "dpo"] if opt.name in ("beta", "loss_type") else []  # the run's method's options
    default = _train_config(base).flat_dict()
    changed = False
    for argv, key_value in _values(opt, action):
        by_flag, by_key = _train_config(base + argv), _train_config(base + [key_value])
        assert by_flag.flat_dict() == by_key.flat_dict(), argv
        changed |= by_flag.flat_dict() != default
        assert by_flag.sources, argv
    assert changed, opt.flag


def test_trl_flags_set_the_methods_options():
    c = _train_config(["--method", "dpo", "--beta", "0.2", "--loss-type", "ipo", "--precompute-ref"])
    assert (c.dpo.beta, c.dpo.loss_type, c.dpo.precompute_ref) == (0.2, "ipo", True)
    assert (c.grpo.beta, c.grpo.loss_type) == (0.0, "dapo")  # the other method's are untouched
    c = _train_config(["--method", "grpo", "--beta", "0.04", "--num-generations", "4", "--max-completion-length",
                       "32", "--reward", "exact_match:answer", "--reward", "format:x", "--reward-weights", "1,0.5",
                       "--eval-on-start", "--save-format", "safetensors", "--no-packing"])
    assert (c.grpo.beta, c.grpo.num_generations, c.grpo.max_completion_length) == (0.04, 4, 32)
    assert c.grpo.reward == ("exact_match:answer", "format:x") and c.grpo.reward_weights == (1.0, 0.5)
    assert (c.dpo.beta, c.eval_on_start, c.save_format, c.packing) == (0.1, True, "safetensors", False)
    # key=value still wins over a flag (the documented precedence)
    assert _train_config(["--method", "dpo", "--beta", "0.2", "beta=0.3"]).dpo.beta == 0.3


def test_a_bad_flag_value_is_one_line(capsys):
    assert main(["train", "--num-generations", "many"]) == 2
    assert capsys.readouterr().err == ("rwkvtune train: error: argument --num-generations: invalid int value: "
                                       "'many' (see rwkvtune train --help)\n")
    assert main(["train", "--model", "m", "--data", "d", "--save-format", "zip", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line: save_format: found 'zip', expected 'pth' or 'safetensors'"), err


def test_help_is_in_sections_and_help_all_works(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for section in ("what to train:", "data:", "shapes and schedule:", "PEFT:", "method dpo:", "method grpo:",
                    "runtime:", "outputs:"):
        assert f"\n{section}\n" in out, section
    assert out.index("method grpo:") < out.index("--num-generations") < out.index("runtime:")
    assert ("--num-generations NUM_GENERATIONS completions sampled per prompt (the group) (default: 8)"
            in " ".join(out.split()))  # GRPOConfig's comment and default
    assert main(["train", "--help-all"]) == 0
    out = capsys.readouterr().out
    assert "grpo.num_generations=8  [--num-generations]" in out
    assert "eval_on_start=false  [--eval-on-start/--no-eval-on-start]" in out
    assert "adam_eps=1e-18  [--adam-eps]" in out


# ---- generate and eval: one set of model flags -------------------------------------------------


def _model_group(name: str) -> dict[str, tuple]:
    group = next(g for g in _command_parser(name)._action_groups if g.title == "model")
    return {a.option_strings[0]: (a.choices and tuple(a.choices), a.default, a.help) for a in group._group_actions}


def test_generate_and_eval_take_the_same_model_flags():
    generate, evaluate = _model_group("generate"), _model_group("eval")
    assert set(generate) == {"--model", "--adapter", "--state", "--precision", "--base-quant", "--device"}
    assert generate.keys() == evaluate.keys()
    assert {k: v for k, v in generate.items() if k != "--model"} == {k: v for k, v in evaluate.items() if k != "--model"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from rwkvtune.train.trainer import train

    d = tmp_path_factory.mktemp("lora")
    text = d / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"red blue green {i} cat dog bird runs."}) + "\n" for i in range(12)))
    base = write_checkpoint(d / "base.pth", n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8,
                            d_mv=8, d_gate=8)
    train(TrainConfig(model=base, data=str(text), out=str(d / "run"), mode="lora", ctx_len=16, batch_size=2,
                      max_steps=2, lr=1e-2, warmup_steps=0, save_every=0, tensorboard=False, save_dtype="fp32"))
    return {"dir": d, "base": base, "run": str(d / "run"), "text": str(text)}


def _generate(capsys, *model_flags) -> str:
    status = main(["generate", *model_flags, "--prompt", "red blue", "--temperature", "0", "--max-tokens", "12"])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


def test_generate_adapter_equals_the_merged_model_and_the_run(lora_run, capsys):
    d, base, run = lora_run["dir"], lora_run["base"], lora_run["run"]
    merged = str(d / "merged.pth")
    assert main(["merge-lora", base, f"{run}/adapter.pth", merged, "--save-dtype", "fp32"]) == 0
    capsys.readouterr()
    by_merged = _generate(capsys, "--model", merged)
    assert _generate(capsys, "--model", base, "--adapter", run) == by_merged  # the run's directory as --adapter
    assert _generate(capsys, "--model", base, "--adapter", f"{run}/adapter.pth") == by_merged
    assert _generate(capsys, "--model", run) == by_merged
    assert _generate(capsys, "--model", base) != by_merged  # the adapter changes the text


def test_eval_adapter_equals_the_run(lora_run, capsys):
    scores = []
    for flags in (["--model", lora_run["base"], "--adapter", lora_run["run"]], ["--model", lora_run["run"]],
                  ["--model", lora_run["base"]]):
        assert main(["eval", *flags, "--data", lora_run["text"], "--ctx-len", "16"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["eval_loss"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-4) and scores[0] != pytest.approx(scores[2], abs=1e-4)


@pytest.mark.parametrize("flags, words", [
    # the run's final.pth has its adapter merged in: applying it again is refused
    (lambda r: ["--model", r["run"], "--adapter", r["run"]], ["--adapter", "already merged into its final.pth"]),
    (lambda r: ["--model", r["base"], "--state", r["run"]], ["--state", "without state.pth or state.safetensors",
                                                             "--mode state"]),
    (lambda r: ["--model", r["base"], "--adapter", str(r["dir"])], ["--adapter", "without adapter.pth"]),
])
def test_a_wrong_adapter_or_state_is_one_line(lora_run, capsys, flags, words):
    for command in ("generate", "eval"):
        argv = [command, *flags(lora_run), *(["--prompt", "x"] if command == "generate" else
                                             ["--data", lora_run["text"]])]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        assert all(w in err for w in words), err
