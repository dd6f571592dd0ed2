"""Model config registry: numbers, loader input forms, search paths, validation, README snippets."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
from pathlib import Path

import pytest

from rwkvtune.configs import model_loader
from rwkvtune.configs.model_loader import (
    ModelConfig,
    list_available_models,
    load_model_config,
    models_dir,
    validate_config_dict,
)
from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.models.rwkv7.method_config import DPOConfig, GRPOConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "rwkvtune" / "configs" / "README.md"
SEED_README = Path("/work/shared/seed/configs-README.md")

# Reference §3 (g1 family, vocab 65536, head size 64): L, C, D_DECAY, D_AAA, D_MV, D_GATE, params.
REFERENCE = {
    "0.1b": (12, 768, 64, 64, 32, 128, 191_084_544),
    "0.4b": (24, 1024, 64, 64, 32, 128, 450_834_432),
    "1.5b": (24, 2048, 96, 96, 64, 256, 1_527_668_736),
    "2.9b": (32, 2560, 96, 96, 64, 320, 2_948_065_280),
    "7.2b": (32, 4096, 128, 128, 96, 480, 7_199_932_416),
    "13.3b": (61, 4096, 192, 192, 128, 384, 13_270_298_624),
}
# Seed README "Recommended Training Configuration": ctx, batch, lr; and the model's own ctx_len.
RECOMMENDED = {
    "0.1b": (1024, 8, 3e-4, 4096),
    "0.4b": (1024, 4, 1e-4, 4096),
    "1.5b": (1024, 2, 1e-5, 4096),
    "2.9b": (1024, 1, 5e-6, 4096),
    "7.2b": (1024, 1, 1e-6, 4096),
    "13.3b": (512, 1, 1e-6, 8192),
}
RELEASE_FILES = {
    "0.1b": "rwkv7-g1-0.1b-20250307-ctx4096.pth",
    "0.4b": "rwkv7-g1-0.4b-20250324-ctx4096.pth",
    "1.5b": "rwkv7-g1-1.5b-20250429-ctx4096.pth",
    "2.9b": "rwkv7-g1-2.9b-20250519-ctx4096.pth",
    "13.3b": "rwkv7-g1c-13.3b-20251231-ctx8192.pth",
}

# The seed document's three Python snippets, verbatim.
SNIPPET_LOAD = '''from rwkvtune.configs.model_loader import load_model_config

# Load 1.5B model configuration
config = load_model_config("1.5b")

print(f"Model: {config.model_name}")
print(f"Layers: {config.n_layer}")
print(f"Hidden dim: {config.n_embd}")
print(f"Model path: {config.model_path}")
'''
SNIPPET_LIST = '''from rwkvtune.configs.model_loader import list_available_models

available = list_available_models()
for key, path in available.items():
    print(f"{key}: {path}")
'''
SNIPPET_ANALYZE = '''import torch
ckpt = torch.load("model.pth", map_location='cpu')
# Inspect n_layer, n_embd, LORA dimensions, etc.
'''


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No user configs; models directory in tmp (so real release files never interfere)."""
    monkeypatch.delenv("RWKVTUNE_CONFIG_PATH", raising=False)
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(tmp_path / "models"))


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
    return out.getvalue()


def _valid_dict(**overrides) -> dict:
    raw = json.loads((model_loader.PACKAGE_MODELS_DIR / "rwkv7-1.5b.json").read_text())
    for dotted, value in overrides.items():
        section, _, field = dotted.rpartition("__")
        target = raw[section] if section else raw
        if value is _DELETE:
            del target[field]
        else:
            target[field] = value
    return raw


_DELETE = object()


def _write(path: Path, raw) -> Path:
    path.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return path


# ---- registry numbers ----------------------------------------------------------------------


def test_registry_has_exactly_the_six_released_sizes_in_size_order():
    available = list_available_models()
    assert list(available) == list(REFERENCE)
    for key, path in available.items():
        assert Path(path).is_file() and Path(path).name == f"rwkv7-{key}.json"


@pytest.mark.parametrize("key", list(REFERENCE))
def test_registry_entry_numbers(key):
    L, C, d_decay, d_aaa, d_mv, d_gate, params = REFERENCE[key]
    rec_ctx, rec_bs, rec_lr, ctx = RECOMMENDED[key]
    cfg = load_model_config(key)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size_a) == (L, C, 65536, 64)
    assert (cfg.dim_att_lora, cfg.dim_aaa_lora, cfg.dim_mv_lora, cfg.dim_gate_lora) == (d_decay, d_aaa, d_mv, d_gate)
    assert cfg.n_head == C // 64 and cfg.dim_ffn == 4 * C
    assert cfg.ctx_len == ctx
    assert (cfg.recommended_ctx_len, cfg.recommended_batch_size) == (rec_ctx, rec_bs)
    assert cfg.recommended_lr == pytest.approx(rec_lr)
    assert cfg.architecture_version == "x070"
    assert cfg.model_name == f"RWKV7-{key.upper()}"
    if key in RELEASE_FILES:
        assert cfg.model_file == RELEASE_FILES[key]
    # Parameter count: the reference table exactly, the closed-form formula, and the name.
    assert cfg.n_params == params
    V = 65536
    assert cfg.n_params == L * (12 * C * C + 2 * C * (d_decay + d_aaa + d_mv + d_gate) + 19 * C) + 2 * V * C + 4 * C
    nominal = float(key[:-1]) * 1e9
    if nominal >= 1e9:
        assert abs(cfg.n_params - nominal) / nominal < 0.05
    else:
        # "0.1B"/"0.4B" are release names; the real counts (embedding + head included) are larger.
        assert cfg.n_params > nominal


def test_param_shapes_layer0_v_optional():
    cfg = load_model_config("0.1b")
    with_v, without_v = cfg.param_shapes(layer0_v=True), cfg.param_shapes(layer0_v=False)
    assert set(with_v) - set(without_v) == {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    assert with_v["blocks.3.att.a1"] == (768, 64) and with_v["blocks.3.att.g2"] == (128, 768)
    assert with_v["blocks.0.att.r_k"] == (12, 64) and with_v["blocks.11.ffn.key.weight"] == (3072, 768)
    assert "blocks.12.att.w1" not in with_v
    assert sum(math.prod(s) for s in with_v.values()) == cfg.n_params


# ---- README snippets -----------------------------------------------------------------------


def test_seed_snippets_are_verbatim_in_seed_and_readme():
    readme = README.read_text()
    for snippet in (SNIPPET_LOAD, SNIPPET_LIST):
        assert snippet in readme
    if SEED_README.exists():
        seed = SEED_README.read_text()
        for snippet in (SNIPPET_LOAD, SNIPPET_LIST, SNIPPET_ANALYZE):
            assert snippet in seed


def test_snippet_load_prints_the_right_values():
    out = _run(SNIPPET_LOAD)
    expected_path = models_dir() / "rwkv7-g1-1.5b-20250429-ctx4096.pth"
    assert out.splitlines() == [
        "Model: RWKV7-1.5B",
        "Layers: 24",
        "Hidden dim: 2048",
        f"Model path: {expected_path}",
    ]


def test_snippet_list_prints_every_model(monkeypatch, tmp_path):
    out = _run(SNIPPET_LIST)
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(REFERENCE)
    for line in lines:
        key, path = line.split(": ", 1)
        assert Path(path) == model_loader.PACKAGE_MODELS_DIR / f"rwkv7-{key}.json"
    # With a user directory its configs are listed too.
    user = tmp_path / "cfg"
    user.mkdir()
    _write(user / "rwkv7-mine.json", _valid_dict(model_name="Mine"))
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(user))
    assert f"mine: {user / 'rwkv7-mine.json'}" in _run(SNIPPET_LIST).splitlines()


def test_snippet_analyze_runs_on_a_checkpoint(monkeypatch, tmp_path):
    from helpers import write_checkpoint

    write_checkpoint(tmp_path / "model.pth")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(SNIPPET_ANALYZE, "<snippet>", "exec"), ns)
    assert ns["ckpt"]["emb.weight"].shape == (256, 64)


def test_readme_python_blocks_all_run(monkeypatch, tmp_path):
    """Every ```python block of the package README runs."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        _run(block)


def test_readme_is_true_about_this_implementation():
    text = README.read_text()
    for needle in ("dim_aaa_lora", "architecture_version", "RWKVTUNE_MODEL_DIR", "RWKVTUNE_CONFIG_PATH",
                   "rwkvtune inspect", "rwkvtune models new", "rwkvtune models check", "not PEFT LoRA",
                   "| 7.2B | 4096 | 128 | 128 | 96 | 480 |", "| 13.3B | 4096 | 192 | 192 | 128 | 384 |"):
        assert needle in text, needle
    # No machine-specific absolute paths besides obvious placeholders.
    for path in re.findall(r"(?<![\w.~])/(?:[\w.-]+/)+[\w.-]*", text):
        assert path.startswith("/path/to/"), path
    # Every file path mentioned that this component owns exists.
    for name in ("model_loader.py", "detect.py", "check.py", "__init__.py", "README.md"):
        assert f"├── {name}" in text or f"└── {name}" in text, name
        assert (README.parent / name).is_file(), name
    for rel in ("examples/test_model_configs.py", "rwkvtune/cli/models.py"):
        assert rel in text and (REPO / rel).is_file()
    for name in REFERENCE:
        assert (README.parent / "models" / f"rwkv7-{name}.json").is_file()


# ---- loader input forms --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1.5b", "1.5B", "rwkv7-1.5b", "RWKV7-1.5B", "Rwkv7-1.5b", " 1.5b ",
                                  "rwkv7-1.5b.json"])
def test_load_by_name_spellings(name):
    cfg = load_model_config(name)
    assert cfg.model_name == "RWKV7-1.5B"
    assert Path(cfg.config_path) == model_loader.PACKAGE_MODELS_DIR / "rwkv7-1.5b.json"


def test_load_by_json_path_str_and_pathlike(tmp_path):
    src = model_loader.PACKAGE_MODELS_DIR / "rwkv7-2.9b.json"
    for arg in (str(src), src):
        assert load_model_config(arg).n_embd == 2560
    copy = _write(tmp_path / "any-name.json", _valid_dict(model_name="Copy"))
    cfg = load_model_config(copy)
    assert cfg.model_name == "Copy" and cfg.config_path == str(copy)


def test_load_json_in_cwd_by_bare_file_name(tmp_path, monkeypatch):
    _write(tmp_path / "local.json", _valid_dict(model_name="Local"))
    monkeypatch.chdir(tmp_path)
    assert load_model_config("local.json").model_name == "Local"


def test_load_by_checkpoint_path(tmp_path):
    from helpers import write_checkpoint

    path = write_checkpoint(tmp_path / "tiny-ctx2048.pth", n_layer=3, d_decay=16, d_aaa=8, d_mv=8, d_gate=32)
    cfg = load_model_config(path)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size_a) == (3, 64, 256, 16)
    assert (cfg.dim_att_lora, cfg.dim_aaa_lora, cfg.dim_mv_lora, cfg.dim_gate_lora) == (16, 8, 8, 32)
    assert cfg.ctx_len == 2048  # from the file name
    assert cfg.model_path == str(Path(path).resolve())
    assert load_model_config(Path(path)).n_layer == 3


def test_unknown_name_lists_available_and_closest():
    with pytest.raises(ConfigError) as e:
        load_model_config("1.6b")
    msg = str(e.value)
    assert "'1.6b'" in msg and "Closest: '1.5b'" in msg
    for key in REFERENCE:
        assert key in msg
    assert isinstance(e.value, RwkvtuneError)


def test_missing_json_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(str(tmp_path / "nope.json"))


# ---- search paths --------------------------------------------------------------------------


def test_config_path_adds_and_overrides(monkeypatch, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _write(a / "rwkv7-mine.json", _valid_dict(model_name="Mine-A"))
    _write(b / "rwkv7-mine.json", _valid_dict(model_name="Mine-B"))
    _write(b / "rwkv7-1.5b.json", _valid_dict(model_name="Override-1.5B"))
    _write(b / "other.json", _valid_dict(model_name="Other"))
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", f"{a}{model_loader.os.pathsep}{tmp_path / 'missing'}"
                                               f"{model_loader.os.pathsep}{b}")
    available = list_available_models()
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    # the missing entry is skipped, not fatal, and said once on stderr
    assert len(warned) == 1 and "does not exist" in warned[0] and str(tmp_path / "missing") in warned[0]
    assert available["mine"] == str(a / "rwkv7-mine.json")  # first directory wins
    assert available["1.5b"] == str(b / "rwkv7-1.5b.json")  # user directory wins over the package
    assert available["other"] == str(b / "other.json")
    assert available["0.1b"].startswith(str(model_loader.PACKAGE_MODELS_DIR))
    assert load_model_config("MINE").model_name == "Mine-A"
    assert load_model_config("rwkv7-1.5b").model_name == "Override-1.5B"
    assert load_model_config("other").model_name == "Other"
    shadowed = {(k, p): s for k, p, s in model_loader.all_config_files()}
    assert shadowed[("mine", str(b / "rwkv7-mine.json"))] == str(a / "rwkv7-mine.json")
    assert shadowed[("1.5b", str(model_loader.PACKAGE_MODELS_DIR / "rwkv7-1.5b.json"))] == str(b / "rwkv7-1.5b.json")
    assert shadowed[("mine", str(a / "rwkv7-mine.json"))] is None


def test_config_path_entry_that_does_not_exist_warns_once(monkeypatch, tmp_path, capsys):
    a, missing = tmp_path / "a", tmp_path / "missing"
    a.mkdir()
    _write(a / "rwkv7-mine.json", _valid_dict(model_name="Mine-A"))
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", f"{missing}{model_loader.os.pathsep}{a}")
    assert "mine" in list_available_models()  # not fatal: the other entries still count
    assert load_model_config("mine").model_name == "Mine-A"
    messages = capsys.readouterr().err.splitlines()  # a warning line on stderr (rwkvtune.log), once
    assert len(messages) == 1, messages
    assert messages[0].startswith("warning: $RWKVTUNE_CONFIG_PATH") and f"{missing} does not exist" in messages[0]


def test_model_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(tmp_path / "m"))
    cfg = load_model_config("0.4b")
    assert cfg.model_path == str(tmp_path / "m" / "rwkv7-g1-0.4b-20250324-ctx4096.pth")
    # Absolute model_file stays as is.
    cfg.model_file = str(tmp_path / "elsewhere" / "x.pth")
    assert cfg.model_path == str(tmp_path / "elsewhere" / "x.pth")
    # Unset -> ~/.rwkvtune/models.
    monkeypatch.delenv("RWKVTUNE_MODEL_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models_dir() == tmp_path / "home" / ".rwkvtune" / "models"
    assert load_model_config("0.4b").model_path == str(
        tmp_path / "home" / ".rwkvtune" / "models" / "rwkv7-g1-0.4b-20250324-ctx4096.pth")
    # A relative RWKVTUNE_MODEL_DIR is made absolute (against the current directory).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", "rel")
    assert models_dir() == tmp_path / "rel"


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field, found", [
    ({"architecture__n_layer": "24"}, "architecture.n_layer", "'24'"),
    ({"architecture__n_embd": 2048.0}, "architecture.n_embd", "2048.0"),
    ({"architecture__vocab_size": True}, "architecture.vocab_size", "True"),
    ({"model_name": None}, "model_name", "None"),
    ({"training__recommended_lr": "1e-5"}, "training.recommended_lr", "'1e-5'"),
    ({"lora_dims": [96, 256, 64]}, "lora_dims", "[96, 256, 64]"),
])
def test_validation_wrong_types(tmp_path, overrides, field, found):
    path = _write(tmp_path / "typed.json", _valid_dict(**overrides))
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    msg = str(e.value)
    assert str(path) in msg and f"{field}: found {found}" in msg and "expected" in msg


@pytest.mark.parametrize("overrides, expected", [
    ({"architecture__n_layer": _DELETE}, "architecture.n_layer: missing, expected int"),
    ({"lora_dims__dim_gate_lora": _DELETE}, "lora_dims.dim_gate_lora: missing, expected int"),
    ({"model_name": _DELETE}, "model_name: missing, expected str"),
    ({"architecture": _DELETE}, "architecture: missing, expected dict"),
    ({"architecture__n_layers": 24}, "architecture.n_layers: unknown field (did you mean 'n_layer'?)"),
    ({"extra": 1}, "extra: unknown field"),
    ({"architecture__n_layer": 0}, "architecture.n_layer: found 0, expected a positive integer"),
    ({"lora_dims__dim_mv_lora": -64}, "lora_dims.dim_mv_lora: found -64, expected a positive integer"),
    ({"architecture__n_layer": 2400}, "architecture.n_layer: found 2400, expected a positive integer in 1..512"),
    ({"architecture__n_embd": 2000}, "architecture.n_embd: found 2000, expected a multiple of head_size_a=64"),
    ({"training__recommended_lr": 3.0}, "training.recommended_lr: found 3.0, expected a positive number"),
    ({"architecture_version": "x060"}, "architecture_version: found 'x060', expected 'x070'"),
])
def test_validation_each_kind(tmp_path, overrides, expected):
    path = _write(tmp_path / "bad.json", _valid_dict(**overrides))
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    assert str(path) in str(e.value)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_validation_reports_every_problem_at_once(tmp_path):
    raw = _valid_dict(architecture__n_layer="24", architecture__n_embd=2000, lora_dims__dim_att_lora=0,
                      lora_dims__dim_gate_lora=_DELETE, training__batch=3)
    path = _write(tmp_path / "many.json", raw)
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 5 problem(s): ")
    for part in ("architecture.n_layer: found '24' (str), expected int",
                 "architecture.n_embd: found 2000, expected a multiple of head_size_a=64",
                 "lora_dims.dim_att_lora: found 0, expected a positive integer",
                 "lora_dims.dim_gate_lora: missing",
                 "training.batch: unknown field"):
        assert part in msg, part
    assert len(validate_config_dict(raw)) == 5


def test_validation_not_json_and_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        load_model_config(_write(tmp_path / "broken.json", '{"model_name": '))
    with pytest.raises(ConfigError, match=r"list\.json: 1 problem\(s\): top level: found list"):
        load_model_config(_write(tmp_path / "list.json", [1, 2]))


def test_optional_fields_default_and_valid_dict_passes():
    raw = _valid_dict(lora_dims__dim_aaa_lora=_DELETE, training=_DELETE, architecture_version=_DELETE,
                      model_file=_DELETE, description=_DELETE, source=_DELETE)
    assert validate_config_dict(raw) == []
    cfg = ModelConfig.from_dict(raw)
    assert cfg.dim_aaa_lora == cfg.dim_att_lora == 96
    assert cfg.architecture_version == "x070" and cfg.model_path == ""
    assert (cfg.recommended_ctx_len, cfg.recommended_batch_size, cfg.recommended_lr) == (1024, 1, 1e-5)
    assert ModelConfig.from_dict(_valid_dict(architecture__dim_ffn=5000)).dim_ffn == 5000


def test_dataclass_rejects_bad_values_directly():
    with pytest.raises(ConfigError, match="head_size_a"):
        ModelConfig(model_name="x", n_layer=2, n_embd=100, dim_att_lora=8, dim_gate_lora=8, dim_mv_lora=8)
    with pytest.raises(ConfigError, match="n_layer: found 0"):
        ModelConfig(model_name="x", n_layer=0, n_embd=128, dim_att_lora=8, dim_gate_lora=8, dim_mv_lora=8)


@pytest.mark.parametrize("key", list(REFERENCE))
def test_to_dict_save_round_trip(tmp_path, key):
    cfg = load_model_config(key)
    out = tmp_path / f"rwkv7-{key}.json"
    cfg.save(out)
    back = load_model_config(out)
    assert back.to_dict() == cfg.to_dict()
    assert json.loads(out.read_text()) == json.loads((model_loader.PACKAGE_MODELS_DIR / out.name).read_text())


def test_public_api_is_lazy_and_complete():
    """``import rwkvtune`` and its config names do not import torch; the model does, on demand."""
    import subprocess
    import sys

    code = ("import sys, rwkvtune\n"
            "from rwkvtune import ModelConfig, TrainConfig, load_model_config, list_available_models\n"
            "assert 'torch' not in sys.modules, 'configs imported torch'\n"
            "assert load_model_config('0.1b').n_layer == 12 and '0.1b' in list_available_models()\n"
            "assert TrainConfig(model='0.1b').mode == 'full' and ModelConfig.__name__ == 'ModelConfig'\n"
            "from rwkvtune import RWKV7\n"
            "assert 'torch' in sys.modules and RWKV7.__module__ == 'rwkvtune.models.rwkv7.model'\n"
            "assert set(rwkvtune.__all__) >= {'RWKV7', 'ModelConfig', 'TrainConfig', 'load_model_config',\n"
            "                                 'list_available_models'}\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---- method options: sections and flat keys (issue 21) --------------------------------------------
def test_method_options_from_flat_keys_and_from_sections_are_equal(tmp_path):
    from rwkvtune.models.rwkv7.config import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "examples" / "recipes" / "grpo.yaml")
    flat = TrainConfig().update(recipe, "recipe")
    keys = set(GRPOConfig.__dataclass_fields__)
    sectioned = {k: v for k, v in recipe.items() if k not in keys} | {"grpo": {k: v for k, v in recipe.items()
                                                                             if k in keys}}
    assert "grpo" not in recipe and len(sectioned["grpo"]) >= 8
    assert TrainConfig().update(sectioned, "recipe").to_dict() == flat.to_dict()
    assert flat.grpo.num_generations == 8 and flat.grpo.stop == (".",) and flat.dpo == DPOConfig()
    # in Python too, and through dataclasses.replace
    assert TrainConfig(method="grpo", num_generations=4, beta=0.04).grpo == GRPOConfig(num_generations=4, beta=0.04)
    assert dataclasses.replace(flat, reward=("regex:a",)).grpo.reward == ("regex:a",)
    assert flat.grpo.reward == ("exact_match:answer",)  # replace copied the section, never shared it


def test_shared_flat_keys_belong_to_the_method_set_last():
    """beta and loss_type mean different things per method: a flat one goes to the section of the
    run's method, also when the method comes from a later source (a recipe's beta, --method)."""
    cfg = TrainConfig().update({"beta": 0.3, "loss_type": "ipo"}, "recipe r.yaml")
    assert cfg.dpo == DPOConfig() and cfg.grpo == GRPOConfig()  # sft: neither, yet
    cfg.update({"method": "dpo"}, "command line")
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.grpo.beta) == (0.3, "ipo", 0.0)
    assert cfg.sources["dpo.beta"] == "recipe r.yaml"
    cfg.update({"method": "grpo"}, "command line (key=value)")
    assert cfg.dpo == DPOConfig() and (cfg.grpo.beta, cfg.grpo.loss_type) == (0.3, "ipo")
    with pytest.raises(ConfigError, match=r"recipe r.yaml: loss_type: found 'ipo', expected one of grpo, dapo"):
        cfg.validate()
    # an explicit section value replaces a flat one given earlier; null means the default
    cfg.update({"grpo": {"loss_type": "grpo"}, "beta": None}, "command line (key=value)")
    assert (cfg.grpo.loss_type, cfg.grpo.beta) == ("grpo", 0.0)
    assert TrainConfig().update({"grpo.epsilon": 0.3}, "command line (key=value)").grpo.epsilon == 0.3


@pytest.mark.parametrize("values, words", [
    ({"method": "dpo", "beta": 0.2, "dpo": {"beta": 0.3}}, "beta: found 0.2 as a flat key and 0.3 in the dpo section"),
    ({"num_generations": 4, "grpo": {"num_generations": 6}},
     "num_generations: found 4 as a flat key and 6 in the grpo section"),
    ({"grpo": {"num_generation": 4}}, "grpo.num_generation: unknown grpo option (did you mean 'num_generations'?)"),
    ({"dpo": [0.1]}, "dpo: found [0.1], expected a mapping of dpo options"),
    ({"grpo": {"epsilon": "wide"}}, "grpo.epsilon: found 'wide', expected a number"),
])
def test_a_method_option_given_two_ways_or_badly_is_one_line(values, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig().update(values, "recipe r.yaml")
    assert str(e.value).startswith("recipe r.yaml: ") and words in str(e.value) and "\n" not in str(e.value)
    TrainConfig().update({"method": "dpo", "beta": 0.2, "dpo": {"beta": 0.2}}, "recipe r.yaml")  # agreeing: fine


def test_method_rules_live_with_their_options():
    base = dict(model="m", data="d")
    with pytest.raises(ConfigError, match=r"training config: beta: found 0.0, expected > 0 for method dpo"):
        TrainConfig(**base, method="dpo", beta=0.0).validate()
    TrainConfig(**base, method="grpo", reward=("regex:a",), beta=0.0).validate()  # grpo: 0 = no KL term
    with pytest.raises(ConfigError, match=r"epsilon_high: found 0.1, expected >= epsilon \(0.2\)"):
        TrainConfig(**base, method="grpo", reward=("regex:a",), epsilon_high=0.1).validate()
    # another method's bad value is named with its section
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing: found 0.7"):
        TrainConfig(**base, label_smoothing=0.7).validate()


def test_data_format_is_checked_at_validation():
    with pytest.raises(ConfigError, match=r"recipe r.yaml: data_format: found 'jsonl', expected one of auto, text"):
        TrainConfig(model="m", data="d").update({"data_format": "jsonl"}, "recipe r.yaml").validate()
    for name in ("auto", "text", "chat", "messages", "prompt_response", "pr"):  # the readers' names
        TrainConfig(model="m", data="d", data_format=name).validate()


def test_help_all_shows_each_methods_defaults_from_its_options_class(capsys):
    from rwkvtune.cli import main

    assert main(["train", "--help-all"]) == 0
    text = capsys.readouterr().out
    for section, cls in (("dpo", DPOConfig), ("grpo", GRPOConfig)):
        for f in dataclasses.fields(cls):
            default = f.default
            shown = ("null" if default is None else "[]" if default == () else str(default).lower()
                     if isinstance(default, bool) else str(default))
            assert f"\n    {section}.{f.name}={shown}" in text, (section, f.name)
    # beta and loss_type: one flag each, for the run's method's section
    assert ("dpo.beta=0.1  [--beta]\n" in text and "grpo.beta=0.0  [--beta]\n" in text
            and "grpo.loss_type=dapo  [--loss-type]\n" in text)
