"""The command line's error reporting: one-line usage errors, advice that fits the command, and
recipe problems that name file, line, key and where each value came from. In process and fast:
every case fails before a model is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_checkpoint
from rwkvtune.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = str(REPO / "examples" / "configs" / "rwkv7-tiny.json")
LORA_RECIPE = str(REPO / "examples" / "recipes" / "lora.yaml")


def _error(capsys, argv, status=2) -> str:
    """The one error line of a failed command (a progress bar may share stderr)."""
    assert main(argv) == status, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


# ---- usage errors --------------------------------------------------------------------------


@pytest.mark.parametrize("argv, line", [
    (["train", "--lr", "abc"],
     "rwkvtune train: error: argument --lr: invalid float value: 'abc' (see rwkvtune train --help)"),
    (["generate", "--prompt", "x"],
     "rwkvtune generate: error: the following arguments are required: --model (see rwkvtune generate --help)"),
    # an unknown command or action: the closest name when one is close, then every name
    (["models", "frob"],
     "rwkvtune models: error: unknown action 'frob' (actions: list, show, new, download, releases, check) "
     "(see rwkvtune models --help)"),
    (["models", "shwo"],
     "rwkvtune models: error: unknown action 'shwo'; did you mean 'show'? (actions: list, show, new, download, "
     "releases, check) (see rwkvtune models --help)"),
    (["trian"],
     "rwkvtune: error: unknown command 'trian'; did you mean 'train'? (commands: models, inspect, generate, train, "
     "eval, merge-lora, export, data, plan) (see rwkvtune --help)"),
    (["--debug", "evl", "--model", "x"],
     "rwkvtune: error: unknown command 'evl'; did you mean 'eval'? (commands: models, inspect, generate, train, "
     "eval, merge-lora, export, data, plan) (see rwkvtune --help)"),
    (["data", "prepar", "x.jsonl"],
     "rwkvtune data: error: unknown action 'prepar'; did you mean 'prepare'? (actions: prepare) "
     "(see rwkvtune data --help)"),
])
def test_usage_errors_are_one_line(capsys, argv, line):
    assert _error(capsys, argv) == line


def test_generate_user_errors_use_the_common_form(capsys, tmp_path):
    line = _error(capsys, ["generate", "--model", str(tmp_path / "nope.pth"), "--prompt", "x"])
    assert line.startswith("error: ") and "nope.pth" in line and "not found" in line


# ---- a bad data record: the advice fits the command ------------------------------------------


@pytest.fixture
def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "a\tb"}\n')  # "a" fits the tiny vocab (256) of eval's model
    return str(path)


def test_bad_record_advice_data_prepare(capsys, tmp_path, bad_jsonl):
    out = str(tmp_path / "o")
    line = _error(capsys, ["data", "prepare", bad_jsonl, "--out", out, "--workers", "1"])
    assert line == (f"error: {bad_jsonl}:2: malformed JSON (Invalid control character at column 12); fix the "
                    f"record, or pass --on-data-error skip to skip bad records")
    # With --on-data-error skip given, the report names the bad record without advising to skip.
    assert main(["data", "prepare", bad_jsonl, "--out", out, "--workers", "1", "--on-data-error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith(f"skipped 1 bad record (first: {bad_jsonl}:2: malformed JSON (Invalid control "
                            f"character at column 12))\n"), printed


def test_bad_record_advice_train(capsys, tmp_path, bad_jsonl):
    line = _error(capsys, ["train", "--model", TINY_CONFIG, "--init", "scratch", "--data", bad_jsonl,
                           "--out", str(tmp_path / "o"), "--dry-run"])
    assert line.startswith(f"error: {bad_jsonl}:2: malformed JSON")
    assert line.endswith("fix the record, or pass --on-data-error skip (recipe: on_data_error: skip) to skip "
                         "bad records")


def test_bad_record_advice_eval_names_its_own_option(capsys, tmp_path, bad_jsonl):
    ckpt = write_checkpoint(tmp_path / "tiny.pth")
    line = _error(capsys, ["eval", "--model", ckpt, "--data", bad_jsonl])
    assert line.startswith(f"error: {bad_jsonl}:2: malformed JSON")
    assert "pass --on-data-error skip" in line and "on_error=" not in line
    # and the option does what it says: the good record alone is scored
    assert main(["eval", "--model", ckpt, "--data", bad_jsonl, "--on-data-error", "skip", "--ctx-len", "8"]) == 0
    assert '"eval_tokens": 2' in capsys.readouterr().out


# ---- recipes and key=value overrides -------------------------------------------------------


def test_broken_yaml_names_line_and_column(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: 0.1b\nlora_targets: [att.key, ffn.key\nlr: 1.0e-4\n")
    line = _error(capsys, ["train", "--config", str(recipe)])
    assert line == (f"error: {recipe}: invalid YAML at line 3, column 3: expected ',' or ']', but got ':' (while "
                    f"parsing a flow sequence that starts at line 2, column 15); fix the file")


@pytest.mark.parametrize("key, meant", [
    ("lerning_rate", "lr"),  # a typo of another trainer's name
    ("learning_rate", "lr"),
    ("micro_bsz", "batch_size"),
    ("batchsize", "batch_size"),
    ("LORA_R", "lora_r"),
])
def test_unknown_key_suggests_the_option(capsys, tmp_path, key, meant):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: 0.1b\n{key}: 8\n")
    line = _error(capsys, ["train", "--config", str(recipe)])
    assert f"error: recipe {recipe}: {key}: unknown option (did you mean {meant!r}?)" in line
    line = _error(capsys, ["train", f"{key}=8"])
    assert f"error: command line (key=value): {key}: unknown option (did you mean {meant!r}?)" in line


def test_unknown_key_without_a_close_match_gets_no_guess(capsys):
    line = _error(capsys, ["train", "zzz=1"])
    assert "zzz: unknown option;" in line and "did you mean" not in line


def test_conflict_blames_the_flag_and_names_the_recipe(capsys, tmp_path):
    line = _error(capsys, ["train", "--config", LORA_RECIPE, "--init", "scratch"])
    assert line.startswith(f"error: command line: init: 'scratch' with mode 'lora' from recipe {LORA_RECIPE}: "
                           f"lora mode trains on top of a trained base model"), line
    # The other way round: the recipe says scratch, the flag asks for state tuning.
    recipe = tmp_path / "scratch.yaml"
    recipe.write_text("model: m\ndata: d\ninit: scratch\nmode: full\n")
    line = _error(capsys, ["train", "--config", str(recipe), "--mode", "state"])
    assert line.startswith(f"error: command line: mode: 'state' with init 'scratch' from recipe {recipe}: "), line
    # key=value overrides come after flags
    line = _error(capsys, ["train", "--config", LORA_RECIPE, "lora_targets=[]"])
    assert line.startswith(f"error: command line (key=value): lora_targets: empty with mode 'lora' from recipe "
                           f"{LORA_RECIPE}: LoRA mode would train nothing"), line


def test_conflict_within_one_source_names_it_once():
    from rwkvtune.errors import ConfigError
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.train.setup_checks import validate_config

    cfg = TrainConfig(model="m", data="d").update({"mode": "lora", "init": "scratch"}, source="recipe r.yaml")
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert str(e.value).startswith("recipe r.yaml: init: 'scratch' with mode 'lora': lora mode trains")
