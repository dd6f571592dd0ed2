"""Releases of a registry size: naming scheme, resolution, records, `models releases`, and
`models download --latest/--release` against the local stand-in for the hub (tests/test_hub.py's
FakeHub, whose tree endpoint answers huggingface_hub's list_repo_tree). Nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rwkvtune.cli import main
from rwkvtune.configs import releases
from rwkvtune.configs.model_loader import load_model_config
from rwkvtune.errors import CheckpointError, ConfigError

pytest.importorskip("huggingface_hub")

from test_hub import FakeHub  # noqa: E402  (the hub stand-in, shared)

REPO = "test-org/tiny-rwkv"
PINNED = "rwkv7-g1-9.9b-20250101-ctx4096.pth"
G1A = "rwkv7-g1a-9.9b-20250601-ctx8192.pth"
G1B = "rwkv7-g1b-9.9b-20251001-ctx16384.pth"
OTHER_SIZE = "rwkv7-g1c-0.2b-20251201-ctx8192.pth"


def _write_config(directory: Path, key: str = "tiny", model_file: str = PINNED, **train) -> Path:
    raw = {"model_name": "Tiny", "model_file": model_file,
           "source": {"hf_repo": REPO, "hf_filename": model_file},
           "architecture": {"n_layer": 2, "n_embd": 64, "vocab_size": 256, "head_size_a": 16, "ctx_len": 4096},
           "lora_dims": {"dim_att_lora": 8, "dim_aaa_lora": 12, "dim_mv_lora": 4, "dim_gate_lora": 16},
           "training": {"recommended_ctx_len": 1024, **train}}
    path = directory / f"rwkv7-{key}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    from helpers import write_checkpoint

    return Path(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "t.pth")).read_bytes()


@pytest.fixture(scope="module")
def deepembed_bytes(tmp_path_factory) -> bytes:
    """A tiny RWKV-7a ("DeepEmbed") checkpoint: the x070 keys plus ffn.s_emb/s_emb_x/s0/s1/s2."""
    import torch
    from helpers import make_state_dict

    sd = make_state_dict()
    for i in range(2):
        sd[f"blocks.{i}.ffn.s_emb.weight"] = torch.zeros(256, 32)
        sd[f"blocks.{i}.ffn.s_emb_x.weight"] = torch.zeros(32, 64)
        sd[f"blocks.{i}.ffn.s0"] = torch.zeros(1, 1, 256)
    path = tmp_path_factory.mktemp("ckpt") / "7a.pth"
    torch.save(sd, path)
    return path.read_bytes()


@pytest.fixture
def fake(tiny_bytes):
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def world(tmp_path, monkeypatch, fake):
    models, configs = tmp_path / "models", tmp_path / "configs"
    models.mkdir()
    configs.mkdir()
    _write_config(configs)
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(models))
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(configs))
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    return tmp_path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- naming scheme ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("rwkv7-g1-1.5b-20250429-ctx4096.pth", ("g1", "1.5b", "20250429", 4096)),
    ("rwkv7-g1a2-0.4b-20251005-ctx8192.pth", ("g1a2", "0.4b", "20251005", 8192)),
    ("sub/rwkv7-g1k-7.2b-20260930-ctx25600.pth", ("g1k", "7.2b", "20260930", 25600)),
    ("rwkv7a-g1d-0.1b-20260129-ctx4096.pth", None),  # another variant: not this scheme
    ("rwkv7-g1-1.5b-20251340-ctx4096.pth", None),  # month 13
    ("rwkv7-g1-1.5b-20250429-ctx4096.safetensors", None),
    ("RWKV-x070-Pile-168M-20241120-ctx4096.pth", None),
    ("README.md", None),
])
def test_naming_scheme(name, expected):
    rel = releases.parse_name(name)
    assert (None if rel is None else (rel.release, rel.size, rel.date, rel.ctx_len)) == expected


def test_shipped_entries_pin_a_release_whose_ctx_is_the_configs():
    for key in ("0.1b", "0.4b", "1.5b", "2.9b", "7.2b", "13.3b"):
        cfg = load_model_config(f"{key}@{releases.parse_name(load_model_config(key).model_file).release}")
        rel = releases.parse_name(cfg.model_file)
        assert rel.size == key and cfg.ctx_len == rel.ctx_len and cfg.release == rel.label


# ---- resolution ---------------------------------------------------------------------------------


def test_size_resolves_to_newest_present_else_pinned(world):
    models = world / "models"
    assert load_model_config("tiny").model_file == PINNED  # nothing present: the pinned one
    (models / G1A).write_bytes(b"x")
    (models / OTHER_SIZE).write_bytes(b"x")  # another size: never chosen
    cfg = load_model_config("tiny")
    assert cfg.model_path == str(models / G1A)
    assert (cfg.ctx_len, cfg.release) == (8192, "g1a-20250601")  # from the file name
    assert cfg.hf_filename == G1A and cfg.hf_repo == REPO and cfg.sha256 == ""
    assert load_model_config("tiny@g1").model_file == PINNED  # named: even when a newer one is present
    assert load_model_config("tiny@g1a-20250601").model_file == G1A
    assert load_model_config(f"tiny@{G1A}").model_file == G1A


def test_unknown_and_ambiguous_releases_name_the_close_ones(world):
    models = world / "models"
    (models / G1A).write_bytes(b"x")
    (models / "rwkv7-g1a-9.9b-20250701-ctx8192.pth").write_bytes(b"x")
    with pytest.raises(ConfigError) as e:
        load_model_config("tiny@g1aa")
    assert "no release 'g1aa'" in str(e.value) and "Closest: g1a" in str(e.value)
    assert "models download tiny --release g1aa" in str(e.value)
    with pytest.raises(ConfigError, match=r"tiny@g1a: ambiguous, 2 files.*tiny@g1a-20250601.*tiny@g1a-20250701"):
        load_model_config("tiny@g1a")
    assert load_model_config("tiny").model_file == "rwkv7-g1a-9.9b-20250701-ctx8192.pth"


def test_entry_outside_the_scheme_keeps_its_file(world):
    _write_config(world / "configs", key="mine", model_file="my-model.pth")
    (world / "models" / G1A).write_bytes(b"x")
    assert load_model_config("mine").model_file == "my-model.pth"
    with pytest.raises(ConfigError, match="has no releases"):
        load_model_config("mine@g1a")


def test_ctx_from_name_caps_the_recommended_training_ctx(world):
    (world / "models" / "rwkv7-g0-9.9b-20250201-ctx512.pth").write_bytes(b"x")
    cfg = load_model_config("tiny")
    assert (cfg.ctx_len, cfg.recommended_ctx_len) == (512, 512)


# ---- records ------------------------------------------------------------------------------------


def test_records_round_trip_and_are_verified(world):
    models = world / "models"
    rel = releases.parse_name(G1B)
    import dataclasses

    releases.record(models, dataclasses.replace(rel, sha256="a" * 64, hf_repo=REPO, hf_filename=G1B,
                                                hf_revision="main"))
    (models / G1B).write_bytes(b"x")
    cfg = load_model_config("tiny")
    assert cfg.model_file == G1B and cfg.sha256 == "a" * 64  # a new download is checked against it
    path = models / releases.RECORDS_NAME
    raw = json.loads(path.read_text())
    raw["releases"][0]["ctx_len"] = 4096  # disagrees with the name's ctx16384
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"rwkvtune-releases.json: releases\[0\]: file .* disagrees"):
        load_model_config("tiny")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="rwkvtune-releases.json: not valid JSON"):
        load_model_config("tiny")


# ---- the hub ------------------------------------------------------------------------------------


def _publish(fake, tiny_bytes, names=(PINNED, G1A, G1B, OTHER_SIZE)):
    for i, name in enumerate(names):
        fake.add(REPO, name, tiny_bytes + b"\0" * i)  # distinct bytes, distinct sha256 (zip tolerates trailing data)
    fake.add(REPO, "README.md", b"# tiny")
    fake.add(REPO, "rwkv7-g1c-9.9b-latest.pth", tiny_bytes)  # not the scheme: ignored


def test_latest_downloads_the_newest_of_the_size_and_records_it(world, fake, tiny_bytes, capsys):
    _publish(fake, tiny_bytes)
    code, out, err = _run(capsys, "models", "download", "tiny", "--latest")
    assert code == 0, err
    target = world / "models" / G1B
    assert target.read_bytes() == tiny_bytes + b"\0" * 2
    assert "release g1b-20251001, ctx_len 16384" in out
    tree = [r for r in fake.requests("hub", "GET") if "/tree/" in r[2]]
    assert tree and tree[0][2].startswith(f"/api/models/{REPO}/tree/main")  # huggingface_hub's list_repo_tree
    recorded = releases.read_records(world / "models")
    assert [(r.file, r.release, r.date, r.sha256) for r in recorded] == [
        (G1B, "g1b", "20251001", hashlib.sha256(target.read_bytes()).hexdigest())]
    # Later runs resolve the same file offline: the hub is gone.
    fake.close()
    cfg = load_model_config("tiny")
    assert cfg.model_path == str(target) and cfg.ctx_len == 16384
    code, out, _ = _run(capsys, "models", "releases", "tiny")
    assert code == 0 and "* `tiny` resolves to " + G1B in out and "recorded" in out


def test_release_not_known_locally_is_asked_from_the_hub(world, fake, tiny_bytes, capsys):
    _publish(fake, tiny_bytes)
    code, out, err = _run(capsys, "models", "download", "tiny@g1a")
    assert code == 0, err
    assert (world / "models" / G1A).is_file() and not (world / "models" / G1B).exists()
    assert load_model_config("tiny").model_file == G1A
    code, out, err = _run(capsys, "models", "download", "tiny", "--release", "g9")
    assert code == 2 and err.count("\n") == 1 and "no release 'g9'" in err and "Closest" in err


def test_listing_without_the_size_names_the_sizes_it_has(world, fake, tiny_bytes, capsys):
    _publish(fake, tiny_bytes, names=(OTHER_SIZE,))
    fake.add(REPO, "rwkv7a-g1d-9.9b-20260129-ctx4096.pth", tiny_bytes)
    code, out, err = _run(capsys, "models", "download", "tiny", "--latest")
    assert code == 2 and err.count("\n") == 1
    assert "lists no file of size 9.9b" in err and "sizes it has: 0.2b" in err and "rwkv7a-/rwkv7b-" in err


def test_malformed_listing_and_missing_repo_are_one_line(world, fake, tiny_bytes, capsys):
    _publish(fake, tiny_bytes)
    fake.listing = b'[{"type": "file"}]'
    code, _, err = _run(capsys, "models", "download", "tiny", "--latest")
    assert code == 2 and err.count("\n") == 1 and "file listing is malformed" in err
    fake.listing = None
    _write_config(world / "configs", key="gone", model_file="rwkv7-g1-3.3b-20250101-ctx4096.pth")
    raw = json.loads((world / "configs" / "rwkv7-gone.json").read_text())
    raw["source"]["hf_repo"] = "test-org/absent"
    (world / "configs" / "rwkv7-gone.json").write_text(json.dumps(raw))
    code, _, err = _run(capsys, "models", "download", "gone", "--latest")
    assert code == 2 and err.count("\n") == 1 and "repository not found" in err


def test_latest_file_of_another_variant_is_named_not_recorded(world, fake, tiny_bytes, deepembed_bytes, capsys):
    fake.add(REPO, G1B, deepembed_bytes)  # published under a plain rwkv7- name, but 7a inside
    code, _, err = _run(capsys, "models", "download", "tiny", "--latest")
    assert code == 2 and err.count("\n") == 1
    assert 'RWKV-7a ("DeepEmbed")' in err and "not recorded" in err
    assert releases.read_records(world / "models") == []


def test_releases_listing_with_hub(world, fake, tiny_bytes, capsys):
    _publish(fake, tiny_bytes)
    code, out, err = _run(capsys, "models", "releases", "tiny", "--hub", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert [r["file"] for r in rec["releases"]] == [G1B, G1A, PINNED]  # newest first, this size only
    assert rec["resolves_to"] == PINNED and not any(r["present"] for r in rec["releases"])
    assert rec["releases"][2]["known_from"] == ["hub", "registry"]


# ---- detection ----------------------------------------------------------------------------------


def test_deepembed_checkpoint_is_named_in_one_line(tmp_path, deepembed_bytes, capsys):
    path = tmp_path / "m.pth"
    path.write_bytes(deepembed_bytes)
    with pytest.raises(CheckpointError, match=r'RWKV-7a \("DeepEmbed"\) checkpoint .*ffn\.s_emb.*expected RWKV-7'):
        load_model_config(path)
    code, _, err = _run(capsys, "inspect", str(path))
    assert code == 2 and err.count("\n") == 1 and "RWKV-7a" in err


def test_rwkv7b_keys_are_named():
    from rwkvtune.io.variants import other_model

    keys = ["emb.weight", "blocks.0.ffn.s_emb.weight", "blocks.0.qkv.qq.weight"]
    assert other_model(keys).startswith("an RWKV-7b checkpoint")
    assert other_model(["emb.weight", "blocks.0.att.r_k", "blocks.0.att.v0"]) is None


def test_hf_folder_of_another_model_type_is_one_line(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "rwkv6"}))
    with pytest.raises(CheckpointError, match=r"model_type is 'rwkv6': this folder holds a RWKV-6 model"):
        load_model_config(folder)


# ---- training ctx ---------------------------------------------------------------------------------


def test_training_ctx_is_capped_and_warned_by_the_models_ctx(world):
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.train.setup_checks import ctx_warnings

    (world / "models" / "rwkv7-g0-9.9b-20250201-ctx512.pth").write_bytes(b"x")
    model = load_model_config("tiny")  # ctx512 in the name; the entry recommends 1024
    resolved = TrainConfig(model="tiny", data="d", device="cpu").resolve(model)
    assert resolved.ctx_len == 512 and ctx_warnings(resolved, model) == []
    longer = TrainConfig(model="tiny", data="d", device="cpu", ctx_len=2048).resolve(model)
    (warning,) = ctx_warnings(longer, model)
    assert "ctx_len 2048 is longer than the 512 tokens" in warning and "--ctx-len" in warning


# ---- models check / examples/test_model_configs.py ---------------------------------------------


def test_check_covers_present_and_recorded_releases(world, tiny_bytes, deepembed_bytes, capsys):
    import subprocess
    import sys

    models = world / "models"
    (models / G1A).write_bytes(tiny_bytes)
    code, out, _ = _run(capsys, "models", "check")
    assert code == 0 and "tiny@g1a-20250601" in out and "matches model file" in out
    (models / G1B).write_bytes(deepembed_bytes)
    code, out, _ = _run(capsys, "models", "check")
    assert code == 1 and "FAIL  tiny@g1b-20251001" in out and "RWKV-7a" in out
    script = Path(__file__).resolve().parents[1] / "examples" / "test_model_configs.py"
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "[tiny@g1b-20251001]" in r.stdout and "ctx_len=16384" in r.stdout
    assert "[tiny@g1a-20250601]" in r.stdout


def test_check_fails_a_pinned_file_whose_name_states_another_ctx(world, capsys):
    raw = json.loads((world / "configs" / "rwkv7-tiny.json").read_text())
    raw["architecture"]["ctx_len"] = 2048
    (world / "configs" / "rwkv7-tiny.json").write_text(json.dumps(raw))
    code, out, _ = _run(capsys, "models", "check")
    assert code == 1 and "architecture.ctx_len is 2048, but its model file" in out
