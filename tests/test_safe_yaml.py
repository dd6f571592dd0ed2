"""YAML is read as bounded data only (issue 20): alias bombs, recursive aliases, deep nesting and
oversized text are one short error line in well under a second; no tag constructs anything (and
nothing runs); every YAML read in the project goes through rwkvtune/safe_yaml.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwkvtune.cli import main
from rwkvtune.errors import ConfigError
from rwkvtune.models.rwkv7.config import TrainConfig, load_recipe, parse_overrides
from rwkvtune.safe_yaml import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_yaml

ROOT = Path(__file__).resolve().parents[1]


def _bomb(levels: int = 9) -> str:
    """"Billion laughs": 9 levels of 9 aliases, 9**9 ~ 3.9e8 strings from ~900 bytes."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("lr: [" + ",".join([f"*a{levels - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _flow_bomb() -> str:
    """The same bomb as one flow mapping, for a key=value override."""
    return "{" + _bomb().replace("\n", ", ").rstrip(", ") + "}"


def _timed(call):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        call()
    return str(e.value), time.perf_counter() - start


def test_alias_bomb_in_a_recipe_is_one_short_line_at_once(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb())
    msg, seconds = _timed(lambda: load_recipe(recipe))
    assert seconds < 0.5 and len(msg) < 300 and "\n" not in msg, (seconds, msg[:500])
    assert msg.startswith(f"{recipe}: a") and f"expands to more than {MAX_NODES:,} values through its aliases" in msg


def test_alias_bomb_in_an_override_names_the_option(tmp_path):
    msg, seconds = _timed(lambda: parse_overrides(["lr=" + _flow_bomb()]))
    assert seconds < 0.5 and len(msg) < 300 and msg.startswith("command line (key=value): lr: "), msg[:500]
    assert "expands to more than" in msg


def test_aliases_within_the_limit_still_work():
    assert load_yaml("base: &b [1, 2]\nmore: [*b, *b]\n", "x") == {"base": [1, 2], "more": [[1, 2], [1, 2]]}


@pytest.mark.parametrize("text, words", [
    ("&a [*a]", "refers to a mapping or list that contains it"),
    ("&a {x: *a}", "refers to a mapping or list that contains it"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
    ("[" * 100000 + "]" * 100000, f"nested deeper than {MAX_DEPTH} levels"),
    ("x" * (MAX_BYTES + 1), "more than the 1,048,576 read"),
])
def test_recursive_deep_and_huge_yaml_are_one_line(text, words):
    msg, seconds = _timed(lambda: parse_overrides(["lora_targets=" + text]))
    assert seconds < 1 and len(msg) < 300 and msg.startswith("command line (key=value): lora_targets: "), msg[:300]
    assert words in msg


TAGS = [
    '!!python/object/apply:os.system ["touch {marker}"]',
    '!!python/object/new:os.system ["touch {marker}"]',
    "!!python/name:os.system",
    "!!python/module:os",
    "!!binary aGVsbG8=",
    "!!set {{a: null}}",
    "!!timestamp 2024-01-01",
    "!custom value",
    "!!str 1e-4",
]


@pytest.mark.parametrize("tagged", TAGS)
def test_no_tag_constructs_anything(tagged, tmp_path, capsys):
    marker = tmp_path / "pwned"
    value = tagged.format(marker=marker)
    msg, _ = _timed(lambda: parse_overrides([f"lr={value}"]))
    assert msg.startswith("command line (key=value): lr: YAML tag ") and "is not accepted" in msg, msg
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"mode: lora\nlr: {value}\n")
    msg, _ = _timed(lambda: load_recipe(recipe))
    assert msg.startswith(f"{recipe}: YAML tag ") and "at line 2, column 5" in msg
    assert not marker.exists()


def test_implicit_values_stay_data():
    got = load_yaml("wandb: 2024-01-01\nlr: 1e-4\nx: .inf\ny: null\nz: 'quoted'\n", "x")
    assert got == {"wandb": "2024-01-01", "lr": "1e-4", "x": float("inf"), "y": None, "z": "quoted"}
    assert TrainConfig().update({"wandb": got["wandb"]}, "r").wandb == "2024-01-01"


def test_recipe_file_size_is_capped(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("lr: 1e-4\n" + "# padding\n" * (MAX_BYTES // 10 + 1))
    msg, _ = _timed(lambda: load_recipe(big))
    assert msg == f"{big}: larger than the {MAX_BYTES:,} bytes a recipe may have; is it the right file?"


def test_non_string_recipe_keys_are_one_line(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-4\n1: 2\n")
    line = _cli_error(capsys, ["train", "--config", str(recipe), "--model", "m", "--data", "d", "--dry-run"])
    assert f"recipe {recipe}: 1: expected an option name (a string)" in line


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_the_command_line_refuses_tags_and_bombs_quickly_without_a_traceback(tmp_path):
    """The real CLI (a fresh process): exit 2, one line, no traceback, nothing executed, fast (a bad
    override fails before torch is imported)."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb())
    base = [sys.executable, "-m", "rwkvtune", "train", "--model", "m", "--data", "d", "--dry-run"]
    for extra, words in (([f'lr=!!python/object/apply:os.system ["touch {marker}"]'], "lr: YAML tag"),
                         (["lr=" + _flow_bomb()], "lr: a"),
                         (["--config", str(recipe)], f"{recipe}: a")):
        start = time.perf_counter()
        res = subprocess.run(base + extra, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        seconds = time.perf_counter() - start
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.count("\n") == 1 and words in res.stderr and len(res.stderr) < 400, res.stderr[:500]
        assert seconds < 20, seconds  # the bomb used to take 70-98 s; startup alone is most of this
    assert not marker.exists()


def test_read_back_run_config_with_a_bomb_is_ignored(tmp_path):
    from rwkvtune.cli.train import next_steps

    (tmp_path / "config.yaml").write_text(_bomb())
    start = time.perf_counter()
    line = next_steps({"out": str(tmp_path), "final": str(tmp_path / "final.pth")})
    assert time.perf_counter() - start < 0.5 and "--data DATA.jsonl" in line


def test_every_yaml_read_goes_through_the_one_loader():
    """No module but rwkvtune/safe_yaml.py calls PyYAML's readers."""
    pattern = re.compile(r"yaml\.(safe_load|load|full_load|unsafe_load|load_all|safe_load_all|compose|parse)\(")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "rwkvtune").rglob("*.py")
                 if p.name != "safe_yaml.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
