"""`rwkvtune models ...` / `rwkvtune inspect` and examples/test_model_configs.py, run as users run them.

Every command runs as `python -m rwkvtune ...` in a subprocess. To keep the suite fast, all the
subprocesses are started at once by one module fixture and the tests then check their results.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_checkpoint

from rwkvtune.cli import main
from rwkvtune.configs.model_loader import load_model_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "test_model_configs.py"
INSPECT_KEYS = ["n_layer", "n_embd", "vocab_size", "head_size_a", "n_head", "dim_att_lora", "dim_aaa_lora",
                "dim_mv_lora", "dim_gate_lora", "dim_ffn", "n_params", "dtype", "has_layer0_v"]
RELEASES = ["0.1b", "0.4b", "1.5b", "2.9b", "7.2b", "13.3b"]


def _config_json(directory: Path, name: str, model_file: str = "tiny.pth", **dims) -> Path:
    d = dict(n_layer=2, n_embd=64, vocab_size=256, head_size_a=16, dim_att_lora=8, dim_aaa_lora=12, dim_mv_lora=4,
             dim_gate_lora=16)
    d.update(dims)
    raw = {
        "model_name": f"Tiny-{name}",
        "model_file": model_file,
        "architecture": {k: d[k] for k in ("n_layer", "n_embd", "vocab_size", "head_size_a")} | {"ctx_len": 512},
        "lora_dims": {k: d[k] for k in ("dim_att_lora", "dim_aaa_lora", "dim_mv_lora", "dim_gate_lora")},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rwkv7-{name}.json"
    path.write_text(json.dumps(raw))
    return path


class World:
    """Files and directories shared by the tests of this module."""

    def __init__(self, root: Path):
        import torch

        self.root = root
        self.models = root / "models"  # RWKVTUNE_MODEL_DIR
        self.models.mkdir()
        self.tiny = Path(write_checkpoint(self.models / "tiny.pth"))
        self.outside = Path(write_checkpoint(root / "outside.pth", n_layer=3, d_gate=32, layer0_v=False))
        self.bf16 = Path(write_checkpoint(root / "trainer-out.pth", prefix="_forward_module.", dtype=torch.bfloat16))
        data = self.tiny.read_bytes()
        self.truncated = root / "truncated.pth"
        self.truncated.write_bytes(data[: len(data) // 2])
        # Config dirs: one matching + one mismatching config for the tiny model file; one only matching;
        # one with broken files.
        self.cfg_mixed = root / "cfg-mixed"
        _config_json(self.cfg_mixed, "tiny")
        _config_json(self.cfg_mixed, "wrong", dim_gate_lora=32, dim_mv_lora=8)
        self.cfg_ok = root / "cfg-ok"
        _config_json(self.cfg_ok, "tiny")
        self.cfg_broken = root / "cfg-broken"
        self.cfg_broken.mkdir()
        (self.cfg_broken / "rwkv7-broken.json").write_text(
            json.dumps({"model_name": "B", "architecture": {"n_layer": "2"}, "lora_dims": {}}))
        (self.cfg_broken / "notjson.json").write_text("{ nope")
        self.work = root / "work"  # cwd of `models new` without RWKVTUNE_CONFIG_PATH
        self.work.mkdir()
        self.new_cfg = root / "new-cfg"  # RWKVTUNE_CONFIG_PATH of the second `models new`
        self.new_cfg.mkdir()

    def env(self, config_path: Path | str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RWKVTUNE_CONFIG_PATH", None)
        env["RWKVTUNE_MODEL_DIR"] = str(self.models)
        if config_path is not None:
            env["RWKVTUNE_CONFIG_PATH"] = str(config_path)
        return env


def _start(world: World, args: list[str], config_path=None, cwd=None, script: Path | None = None):
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "rwkvtune"]
    return subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=world.env(config_path), cwd=cwd or world.root)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def runs(world: World) -> dict[str, subprocess.CompletedProcess]:
    w = world
    specs = {
        # no torch needed
        "models": dict(args=["models"]),
        "models_list_user": dict(args=["models", "list"], config_path=w.cfg_mixed),
        "models_broken": dict(args=["models"], config_path=w.cfg_broken),
        "show": dict(args=["models", "show", "RWKV7-1.5B"]),
        "show_json": dict(args=["models", "show", "tiny", "--json"], config_path=w.cfg_ok),
        "show_unknown": dict(args=["models", "show", "1.6b"]),
        "check_default": dict(args=["models", "check"]),
        "check_broken": dict(args=["models", "check"], config_path=w.cfg_broken),
        "new_bad_name": dict(args=["models", "new", str(w.tiny), "--name", "a/b"]),
        "no_command": dict(args=[]),
        "bad_action": dict(args=["models", "frobnicate"]),
        "missing_arg": dict(args=["inspect"]),
        "example_default": dict(args=[], script=EXAMPLE),
        "example_broken": dict(args=[], script=EXAMPLE, config_path=w.cfg_broken),
        # these read checkpoints (torch)
        "inspect_json": dict(args=["inspect", str(w.tiny), "--json"]),
        "inspect_human": dict(args=["inspect", str(w.bf16)], config_path=w.cfg_ok),
        "inspect_nomatch": dict(args=["inspect", str(w.outside)]),
        "inspect_truncated": dict(args=["inspect", str(w.truncated)]),
        "inspect_missing": dict(args=["inspect", str(w.root / "nope.pth"), "--json"]),
        "new_in_models_dir": dict(args=["models", "new", str(w.tiny), "--name", "fresh"], cwd=w.work),
        "new_outside": dict(args=["models", "new", str(w.outside), "--name", "outside"], config_path=w.new_cfg),
        "check_mixed": dict(args=["models", "check"], config_path=w.cfg_mixed),
        "example_mixed": dict(args=[], script=EXAMPLE, config_path=w.cfg_mixed),
    }
    procs = {name: _start(w, **spec) for name, spec in specs.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return results


def _assert_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ---- models / models show ------------------------------------------------------------------


def test_models_table(runs, world):
    r = runs["models"]
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "LAYERS", "WIDTH", "PARAMS", "MODEL", "FILE", "PRESENT"]
    rows = {line.split()[0]: line.split() for line in lines[1:7]}
    assert list(rows) == RELEASES
    assert rows["1.5b"] == ["1.5b", "RWKV7-1.5B", "24", "2048", "1,527,668,736", "rwkv7-g1-1.5b-20250429-ctx4096.pth",
                            "no"]
    assert rows["13.3b"][2:5] == ["61", "4096", "13,270,298,624"]
    assert f"models directory: {world.models}" in r.stdout


def test_models_table_with_user_config_and_present_file(runs):
    r = runs["models_list_user"]
    assert r.returncode == 0
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:] if line.strip()}
    assert rows["tiny"][1:] == ["Tiny-tiny", "2", "64", "144,000", "tiny.pth", "yes"]
    assert rows["wrong"][-1] == "yes" and rows["0.1b"][-1] == "no"


def test_models_table_reports_broken_config_without_crashing(runs):
    r = runs["models_broken"]
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "(invalid config)" in r.stdout and "rwkvtune models check" in r.stdout
    assert "1.5b" in r.stdout


def test_models_show_all_fields(runs, world):
    r = runs["show"]
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(":", 1) for line in r.stdout.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    for key in ("name", "model_name", "description", "architecture_version", "n_layer", "n_embd", "n_head",
                "head_size_a", "vocab_size", "ctx_len", "dim_ffn", "dim_att_lora", "dim_aaa_lora", "dim_mv_lora",
                "dim_gate_lora", "n_params", "recommended_ctx_len", "recommended_batch_size", "recommended_lr",
                "model_file", "model_path", "config_path"):
        assert key in fields, key
    assert fields["name"] == "1.5b" and fields["model_name"] == "RWKV7-1.5B"
    assert fields["n_params"].startswith("1,527,668,736")
    assert fields["dim_aaa_lora"].startswith("96") and fields["dim_gate_lora"].startswith("256")
    assert fields["model_path"] == f"{world.models / 'rwkv7-g1-1.5b-20250429-ctx4096.pth'}  (not present)"
    assert fields["config_path"].endswith("rwkvtune/configs/models/rwkv7-1.5b.json")


def test_models_show_json(runs, world):
    r = runs["show_json"]
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["name"] == "tiny" and rec["n_params"] == 144_000 and rec["n_head"] == 4
    assert rec["model_path"] == str(world.models / "tiny.pth") and rec["model_present"] is True
    assert rec["config_path"] == str(world.cfg_ok / "rwkv7-tiny.json")


def test_models_show_unknown_is_one_error_line(runs):
    _assert_error_line(runs["show_unknown"], "unknown model '1.6b'", "Closest: '1.5b'", "0.1b", "13.3b")


# ---- inspect -------------------------------------------------------------------------------


def test_inspect_json_has_exactly_the_keys(runs):
    r = runs["inspect_json"]
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)  # ONE JSON object, nothing else on stdout
    assert list(obj) == INSPECT_KEYS
    assert obj == {"n_layer": 2, "n_embd": 64, "vocab_size": 256, "head_size_a": 16, "n_head": 4, "dim_att_lora": 8,
                   "dim_aaa_lora": 12, "dim_mv_lora": 4, "dim_gate_lora": 16, "dim_ffn": 256, "n_params": 144_000,
                   "dtype": "float32", "has_layer0_v": True}


def test_inspect_human_names_matching_entry(runs, world):
    r = runs["inspect_human"]
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "checkpoint:" in out and str(world.bf16) in out
    assert "dtype:" in out and "bfloat16" in out and "'_forward_module.'" in out
    assert "dim_aaa_lora:  12" in out
    assert f"registry entry: tiny ({world.cfg_ok / 'rwkv7-tiny.json'})" in out


def test_inspect_human_without_match_says_how_to_add(runs, world):
    r = runs["inspect_nomatch"]
    assert r.returncode == 0, r.stderr
    assert "n_layer:       3" in r.stdout and "has_layer0_v:  no" in r.stdout
    assert f"none matches; write one with: rwkvtune models new {world.outside} --name NAME" in r.stdout


def test_inspect_errors_are_one_line(runs, world):
    _assert_error_line(runs["inspect_truncated"], str(world.truncated), "truncated")
    err = _assert_error_line(runs["inspect_missing"], "nope.pth", "not found")
    assert runs["inspect_missing"].stdout == ""  # --json prints nothing on error
    assert err


# ---- models new ----------------------------------------------------------------------------


def test_models_new_in_models_dir_round_trip(runs, world):
    r = runs["new_in_models_dir"]
    assert r.returncode == 0, r.stderr
    out_file = world.work / "rwkv7-fresh.json"
    assert f"wrote {out_file}" in r.stdout
    assert "RWKVTUNE_CONFIG_PATH" in r.stdout and f"export RWKVTUNE_CONFIG_PATH={world.work}" in r.stdout
    raw = json.loads(out_file.read_text())
    assert raw["model_file"] == "tiny.pth"  # lies in the models directory -> file name only
    assert raw["lora_dims"] == {"dim_att_lora": 8, "dim_aaa_lora": 12, "dim_gate_lora": 16, "dim_mv_lora": 4}
    os.environ["RWKVTUNE_MODEL_DIR"], old = str(world.models), os.environ.get("RWKVTUNE_MODEL_DIR")
    try:
        cfg = load_model_config(out_file)
        assert cfg.model_path == str(world.tiny)
        assert (cfg.n_layer, cfg.n_embd, cfg.n_params) == (2, 64, 144_000)
    finally:
        if old is None:
            del os.environ["RWKVTUNE_MODEL_DIR"]
        else:
            os.environ["RWKVTUNE_MODEL_DIR"] = old


def test_models_new_outside_models_dir_into_config_path(runs, world, monkeypatch):
    r = runs["new_outside"]
    assert r.returncode == 0, r.stderr
    out_file = world.new_cfg / "rwkv7-outside.json"
    assert f"wrote {out_file}" in r.stdout and "load_model_config('outside')" in r.stdout
    raw = json.loads(out_file.read_text())
    assert raw["model_file"] == str(world.outside)  # outside the models directory -> absolute path
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(world.new_cfg))
    cfg = load_model_config("outside")
    assert (cfg.n_layer, cfg.dim_gate_lora, cfg.model_path) == (3, 32, str(world.outside))


def test_models_new_refuses_overwrite_and_bad_names(world, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RWKVTUNE_CONFIG_PATH", raising=False)
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(world.models))
    out = tmp_path / "x.json"
    assert main(["models", "new", str(world.tiny), "--name", "x", "-o", str(out)]) == 0
    assert load_model_config(out).dim_aaa_lora == 12
    capsys.readouterr()
    assert main(["models", "new", str(world.tiny), "--name", "x", "-o", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["models", "new", str(world.tiny), "--name", "x", "-o", str(out), "--force"]) == 0
    assert main(["models", "new", str(world.tiny), "--name", "x", "-o", str(tmp_path / "x.txt")]) == 2
    assert "ending in .json" in capsys.readouterr().err
    assert main(["models", "new", str(world.root / "missing.pth"), "--name", "y", "-o", str(tmp_path / "y.json")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "y.json").exists()


def test_models_new_bad_name_subprocess(runs):
    _assert_error_line(runs["new_bad_name"], "--name 'a/b'")


# ---- models check --------------------------------------------------------------------------


def test_models_check_default_exit_0(runs):
    r = runs["check_default"]
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[1] for line in lines[:6]] == RELEASES
    assert all(line.startswith("OK") for line in lines[:6])
    assert "6 config(s) checked: 6 OK, 0 with problems; 0 compared" in r.stdout


def test_models_check_broken_user_dir_exit_1(runs, world):
    r = runs["check_broken"]
    assert r.returncode == 1 and "Traceback" not in r.stderr
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2
    assert any("rwkv7-broken.json" in f and "architecture.n_layer: found '2' (str), expected int" in f
               and "lora_dims.dim_att_lora: missing" in f for f in fails)
    assert any("notjson.json: not valid JSON" in f for f in fails)
    assert "8 config(s) checked: 6 OK, 2 with problems" in r.stdout


def test_models_check_against_present_model_files(runs, world):
    r = runs["check_mixed"]
    assert r.returncode == 1, r.stdout + r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line[:4] in ("OK  ", "FAIL")}
    assert lines["tiny"].startswith("OK") and f"matches model file {world.tiny}" in lines["tiny"]
    wrong = lines["wrong"]
    assert wrong.startswith("FAIL")
    for part in ("dim_mv_lora: expected 8, found 4", "dim_gate_lora: expected 32, found 16",
                 "blocks.0-1.att.g1: expected [64, 32], found [64, 16]", "blocks.0-1.att.v1: expected [64, 8], found [64, 4]",
                 "matches registry entry 'tiny'"):
        assert part in wrong, part
    assert "2 compared with a model file" in r.stdout


def test_models_check_matching_model_file_exit_0(world, monkeypatch, capsys):
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(world.cfg_ok))
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(world.models))
    assert main(["models", "check"]) == 0
    out = capsys.readouterr().out
    assert "7 config(s) checked: 7 OK, 0 with problems; 1 compared with a model file" in out


# ---- dispatcher ----------------------------------------------------------------------------


def test_usage_errors_exit_2(runs):
    r = runs["no_command"]  # not an error in a flag: the help, which lists the commands
    assert r.returncode == 2 and "usage: rwkvtune" in r.stderr and "Traceback" not in r.stderr
    for name, prog in (("bad_action", "rwkvtune models"), ("missing_arg", "rwkvtune inspect")):
        r = runs[name]
        assert r.returncode == 2, name
        assert r.stderr.startswith(f"{prog}: error: ") and r.stderr.endswith(f" (see {prog} --help)\n"), r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr


def test_unknown_option_is_reported_by_the_subcommand(capsys):
    for argv, prog in ((["train", "--bogus"], "rwkvtune train"),
                       (["models", "show", "0.1b", "--bogus"], "rwkvtune models show"),
                       (["data", "prepare", "in.jsonl", "--out", "x", "--bogus"], "rwkvtune data prepare"),
                       (["--bogus"], "rwkvtune")):
        assert main(argv) == 2, argv
        # One line: the usage (20 lines for train) would bury it.
        assert capsys.readouterr().err == f"{prog}: error: unrecognized arguments: --bogus (see {prog} --help)\n"


def test_help_and_version_in_process(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "models" in out and "inspect" in out
    assert main(["--version"]) == 0
    assert main(["models", "--help"]) == 0
    assert "check" in capsys.readouterr().out


def test_models_and_inspect_do_not_import_torch(world):
    """Listing, showing, checking and inspecting read JSON and checkpoint headers only."""
    code = ("import sys, contextlib, io\n"
            "from rwkvtune.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    codes = [main(['models']), main(['models', 'show', '13.3b']), main(['models', 'check']),\n"
            f"             main(['inspect', {str(world.tiny)!r}]), main(['inspect', {str(world.bf16)!r}, '--json'])]\n"
            "    codes.append(main(['--help']))\n"
            "assert codes == [0, 0, 0, 0, 0, 0], codes\n"
            "heavy = [m for m in ('torch', 'numpy', 'rwkvtune.cli.train', 'rwkvtune.cli.generate')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=world.env(), timeout=60)
    assert r.returncode == 0, r.stderr


# ---- examples/test_model_configs.py --------------------------------------------------------


def test_example_script_exit_codes(runs, world):
    r = runs["example_default"]
    assert r.returncode == 0, r.stdout + r.stderr
    for key in RELEASES:
        assert f"[{key}]" in r.stdout
    assert "params: 13,270,298,624" in r.stdout and "gate(g)=480" in r.stdout
    assert "6/6 config(s) OK" in r.stdout

    r = runs["example_broken"]
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stdout.count("FAIL invalid config") == 2

    r = runs["example_mixed"]
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"OK, model file fits: {world.tiny}" in r.stdout
    assert "FAIL model file:" in r.stdout and "matches registry entry 'tiny'" in r.stdout


def test_example_script_passes_with_matching_model_file(world, monkeypatch):
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(world.cfg_ok))
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(world.models))
    ns = runpy.run_path(str(EXAMPLE), run_name="example")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert ns["main"]() == 0
    assert "7/7 config(s) OK, 1 compared with a model file" in buf.getvalue()


def test_dispatcher_loads_a_commands_module_only_when_it_runs(tmp_path, monkeypatch, capsys):
    """The structure future commands plug into: options and handler in their own module."""
    from rwkvtune import cli

    (tmp_path / "fake_cmd_mod.py").write_text(
        "def add_arguments(p):\n"
        "    p.add_argument('--n', type=int, required=True)\n"
        "def run(args):\n"
        "    print('ran', args.n)\n"
        "    return 0 if args.n else 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [
        cli.Command("fake", "fake_cmd_mod", "a plugged-in command")])
    monkeypatch.delitem(sys.modules, "fake_cmd_mod", raising=False)
    assert main(["--help"]) == 0
    assert "a plugged-in command" in capsys.readouterr().out
    assert main(["models", "show", "0.1b"]) == 0
    assert "fake_cmd_mod" not in sys.modules
    capsys.readouterr()
    assert main(["fake", "--n", "3"]) == 0
    assert capsys.readouterr().out.strip() == "ran 3"
    assert main(["fake", "--n", "0"]) == 1
    assert main(["fake"]) == 2  # its own required option, enforced by argparse
    assert "--n" in capsys.readouterr().err


def test_inspect_says_what_a_non_checkpoint_file_is(world, tmp_path):
    import numpy as np
    import torch

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    pickled = tmp_path / "step-0000002.pt"  # Python objects besides tensors: numpy arrays inside
    torch.save({"step": 2, "rng": np.random.get_state(), "trainable": {}}, pickled)
    resumable = tmp_path / "step-0000003.pt"  # what rwkvtune train writes: tensors and plain values
    torch.save({"step": 3, "trainable": {}, "optimizer": {"state": {}}, "config": {}}, resumable)
    adapter = tmp_path / "adapter.pth"
    torch.save({"format": "rwkvtune-lora-v1", "r": 4, "lora": {}}, adapter)
    procs = {p: _start(world, ["inspect", str(p)]) for p in (text, pickled, resumable, adapter)}
    res = {}
    for p, pr in procs.items():
        out, err = pr.communicate(timeout=120)
        res[p] = subprocess.CompletedProcess(pr.args, pr.returncode, out, err)
    line = _assert_error_line(res[text], str(text), "not a file written by torch.save")
    assert "Python objects" not in line
    line = _assert_error_line(res[pickled], "Python objects besides tensors", "never unpickles")
    assert "\x1b[" not in line and "corrupt" not in line and "--resume" not in line
    _assert_error_line(res[resumable], "resumable checkpoint", "final.pth", "not a model checkpoint")
    _assert_error_line(res[adapter], "this is a LoRA adapter", "merge-lora", "not a model checkpoint")


def test_a_path_that_is_a_directory_or_unknown_file_is_named(tmp_path):
    from rwkvtune.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{tmp_path}: is a directory that is neither a Hugging Face model folder "
                       r"\(config.json\) nor a training run .*; expected a registry name"):
        load_model_config(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="model.bin: is a file that is neither .pth/.pt/.safetensors nor .json"):
        load_model_config(str(tmp_path / "model.bin"))
