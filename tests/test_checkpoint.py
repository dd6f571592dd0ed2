"""Checkpoint detection, refusals, and config-vs-checkpoint comparison."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import make_state_dict, write_checkpoint

from rwkvtune.configs import detect as det
from rwkvtune.configs.check import check_config_against, mismatch_error
from rwkvtune.configs.detect import CheckpointInfo, compare_shapes, detect, inspect_checkpoint
from rwkvtune.io import checkpoint as ck
from rwkvtune.io.checkpoint import load_state_dict
from rwkvtune.io.layout import SHAPE_FIELDS
from rwkvtune.configs.model_loader import (
    ModelConfig,
    list_available_models,
    load_model_config,
    matching_registry_entry,
)
from rwkvtune.errors import CheckpointError

SUMMARY_KEYS = ["n_layer", "n_embd", "vocab_size", "head_size_a", "n_head", "dim_att_lora", "dim_aaa_lora",
                "dim_mv_lora", "dim_gate_lora", "dim_ffn", "n_params", "dtype", "has_layer0_v"]

# Four different sets of low-rank dims (decay, aaa, mv, gate) and shapes around them.
DIM_SETS = [
    dict(d_decay=8, d_aaa=12, d_mv=4, d_gate=16),
    dict(d_decay=16, d_aaa=16, d_mv=8, d_gate=32, n_layer=3),
    dict(d_decay=32, d_aaa=8, d_mv=16, d_gate=8, n_embd=128, head_size=32, vocab=300),
    dict(d_decay=4, d_aaa=4, d_mv=4, d_gate=4, n_layer=1, dim_ffn=96),
]


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RWKVTUNE_CONFIG_PATH", raising=False)
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(tmp_path / "models"))


def _tiny_config_json(directory: Path, name: str = "tiny", **dims) -> Path:
    """A registry JSON for helpers.make_state_dict's default tiny model."""
    d = dict(n_layer=2, n_embd=64, vocab_size=256, head_size_a=16, dim_att_lora=8, dim_aaa_lora=12, dim_mv_lora=4,
             dim_gate_lora=16)
    d.update(dims)
    raw = {
        "model_name": f"Tiny-{name}",
        "model_file": "tiny.pth",
        "architecture": {k: d[k] for k in ("n_layer", "n_embd", "vocab_size", "head_size_a")} | {"ctx_len": 512},
        "lora_dims": {k: d[k] for k in ("dim_att_lora", "dim_aaa_lora", "dim_mv_lora", "dim_gate_lora")},
        "training": {"recommended_ctx_len": 256, "recommended_batch_size": 3, "recommended_lr": 2e-4},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rwkv7-{name}.json"
    path.write_text(json.dumps(raw))
    return path


# ---- detection -----------------------------------------------------------------------------


@pytest.mark.parametrize("dims", DIM_SETS)
@pytest.mark.parametrize("layer0_v", [True, False])
def test_detect_dims(tmp_path, dims, layer0_v):
    path = write_checkpoint(tmp_path / "m.pth", layer0_v=layer0_v, **dims)
    sd = make_state_dict(layer0_v=layer0_v, **dims)
    info = inspect_checkpoint(path)
    C = dims.get("n_embd", 64)
    N = dims.get("head_size", 16)
    assert info.n_layer == dims.get("n_layer", 2)
    assert (info.n_embd, info.head_size_a, info.n_head) == (C, N, C // N)
    assert info.vocab_size == dims.get("vocab", 256)
    # One layer without layer-0 v has no v1 at all: D_MV is unknowable, the reference formula fills it.
    d_mv = dims["d_mv"] if layer0_v or info.n_layer > 1 else 32
    assert (info.dim_att_lora, info.dim_aaa_lora, info.dim_mv_lora, info.dim_gate_lora) == (
        dims["d_decay"], dims["d_aaa"], d_mv, dims["d_gate"])
    assert info.dim_ffn == (dims.get("dim_ffn") or 4 * C)
    assert info.has_layer0_v is layer0_v
    assert info.n_params == sum(t.numel() for t in sd.values())
    assert info.dtype == "float32" and info.key_prefix == "" and info.extra_keys == ()
    assert info.path == str(Path(path).resolve())
    assert list(info.summary()) == SUMMARY_KEYS
    # The config built from it describes the same file (n_params counts layer-0 v always).
    cfg = ModelConfig.from_checkpoint(info)
    assert check_config_against(cfg, {k: tuple(v.shape) for k, v in sd.items()}) == []
    extra_v = 0 if layer0_v else (2 * C * d_mv + C)
    assert cfg.n_params == info.n_params + extra_v


def test_detect_bf16_and_prefixes(tmp_path):
    for prefix in ("_forward_module.", "module."):
        path = write_checkpoint(tmp_path / "p.pth", prefix=prefix, dtype=torch.bfloat16, layer0_v=False)
        info = inspect_checkpoint(path)
        assert info.dtype == "bfloat16" and info.key_prefix == prefix
        assert (info.n_layer, info.dim_aaa_lora, info.has_layer0_v) == (2, 12, False)
        sd, stripped = load_state_dict(path)
        assert stripped == prefix and "emb.weight" in sd and not any(k.startswith(prefix) for k in sd)


def test_mixed_dtype_and_extra_keys(tmp_path):
    sd = make_state_dict()
    sd["head.weight"] = sd["head.weight"].to(torch.bfloat16)
    sd["blocks.0.att.time_state"] = torch.zeros(4, 16, 16)  # e.g. a state-tuning tensor
    torch.save(sd, tmp_path / "x.pth")
    info = inspect_checkpoint(tmp_path / "x.pth")
    assert info.dtype == "mixed(bfloat16,float32)"
    assert info.extra_keys == ("blocks.0.att.time_state",)


@pytest.mark.parametrize("key", ["0.1b", "0.4b", "1.5b", "2.9b", "7.2b", "13.3b"])
@pytest.mark.parametrize("layer0_v", [True, False])
def test_detect_full_size_shapes_of_every_release(key, layer0_v):
    """Detection on the exact key/shape set of each release (no file needed) finds its entry."""
    cfg = load_model_config(key)
    shapes = cfg.param_shapes(layer0_v=layer0_v)
    shapes = dict(reversed(list(shapes.items())))  # released files' key order differs; must not matter
    info = detect(shapes, {k: "bfloat16" for k in shapes})
    for f in SHAPE_FIELDS:
        assert getattr(info, f) == getattr(cfg, f), f
    assert info.n_params == sum(math.prod(s) for s in shapes.values())
    if layer0_v:
        assert info.n_params == cfg.n_params
    assert matching_registry_entry(info) == key
    assert check_config_against(cfg, shapes) == []


def test_to_config_takes_recommended_settings_from_matching_user_entry(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfg"
    _tiny_config_json(cfg_dir)
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(cfg_dir))
    info = inspect_checkpoint(write_checkpoint(tmp_path / "m.pth"))
    assert matching_registry_entry(info) == "tiny"
    cfg = load_model_config(tmp_path / "m.pth")
    assert cfg.model_name == "Tiny-tiny" and cfg.ctx_len == 512
    assert (cfg.recommended_ctx_len, cfg.recommended_batch_size, cfg.recommended_lr) == (256, 3, 2e-4)


# ---- refusals ------------------------------------------------------------------------------


def test_refuse_missing_path_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        inspect_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        inspect_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model_config(tmp_path / "nope.pth")


def test_refuse_rwkv6_and_older(tmp_path):
    C = 64
    v6 = {"emb.weight": torch.zeros(256, C), "blocks.0.att.time_maa_x": torch.zeros(1, 1, C),
          "blocks.0.att.time_faaaa": torch.zeros(4, 16), "blocks.0.att.time_decay": torch.zeros(1, 1, C),
          "head.weight": torch.zeros(256, C)}
    torch.save(v6, tmp_path / "v6.pth")
    with pytest.raises(CheckpointError, match=r"RWKV-6 \(x060\).*expected RWKV-7"):
        inspect_checkpoint(tmp_path / "v6.pth")
    v5 = {k: v for k, v in v6.items() if "maa" not in k}
    torch.save(v5, tmp_path / "v5.pth")
    with pytest.raises(CheckpointError, match=r"RWKV-5 \(x052\).*expected RWKV-7"):
        inspect_checkpoint(tmp_path / "v5.pth")
    v4 = {"emb.weight": torch.zeros(256, C), "blocks.0.att.time_mix_k": torch.zeros(1, 1, C),
          "blocks.0.att.time_first": torch.zeros(C)}
    torch.save(v4, tmp_path / "v4.pth")
    with pytest.raises(CheckpointError, match="RWKV-4"):
        inspect_checkpoint(tmp_path / "v4.pth")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_refuse_truncated_file(tmp_path, keep):
    path = Path(write_checkpoint(tmp_path / "full.pth"))
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(cut)
    assert str(cut) in str(e.value) and "truncated" in str(e.value)


def test_refuse_empty_garbage_and_non_dicts(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        inspect_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="cannot read as a torch checkpoint"):
        inspect_checkpoint(tmp_path / "junk.pth")
    torch.save([torch.zeros(2), torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="found a list, expected a state dict"):
        inspect_checkpoint(tmp_path / "list.pth")
    torch.save({"state_dict": make_state_dict(), "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="key 'state_dict' holds a dict, not a tensor"):
        inspect_checkpoint(tmp_path / "nested.pth")
    torch.save({1: torch.zeros(2)}, tmp_path / "intkey.pth")
    with pytest.raises(CheckpointError, match="expected str keys"):
        inspect_checkpoint(tmp_path / "intkey.pth")


def _save(tmp_path, sd, name="x.pth"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def test_refuse_missing_keys(tmp_path):
    sd = make_state_dict()
    del sd["emb.weight"], sd["blocks.0.att.a1"]
    with pytest.raises(CheckpointError, match="not an RWKV-7 state dict: missing emb.weight, blocks.0.att.a1"):
        inspect_checkpoint(_save(tmp_path, sd))
    sd = make_state_dict()
    del sd["blocks.1.att.key.weight"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.key\.weight: missing \(expected \[64, 64\]\)"):
        inspect_checkpoint(_save(tmp_path, sd))
    sd = make_state_dict(n_layer=3)
    for k in [k for k in sd if k.startswith("blocks.1.")]:
        del sd[k]
    with pytest.raises(CheckpointError, match=r"blocks \[1\] missing"):
        inspect_checkpoint(_save(tmp_path, sd))
    sd = make_state_dict()
    del sd["blocks.1.att.v1"]
    with pytest.raises(CheckpointError, match="missing blocks.1.att.v1"):
        inspect_checkpoint(_save(tmp_path, sd))


def test_refuse_inconsistent_shapes(tmp_path):
    sd = make_state_dict()
    sd["blocks.1.att.w2"] = torch.zeros(9, 64)
    sd["blocks.0.ffn.value.weight"] = torch.zeros(64, 200)
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(_save(tmp_path, sd))
    msg = str(e.value)
    assert "inconsistent RWKV-7 state dict" in msg
    assert "blocks.1.att.w2: expected [8, 64], found [9, 64]" in msg
    assert "blocks.0.ffn.value.weight: expected [64, 256], found [64, 200]" in msg
    sd = make_state_dict()
    sd["blocks.0.att.r_k"] = torch.zeros(4, 8)
    with pytest.raises(CheckpointError, match=r"r_k is \[4, 8\] but emb.weight has n_embd=64"):
        inspect_checkpoint(_save(tmp_path, sd))
    sd = make_state_dict()
    sd["emb.weight"] = torch.zeros(256 * 64)
    with pytest.raises(CheckpointError, match=r"emb.weight has shape \[16384\], expected 2 positive dims"):
        inspect_checkpoint(_save(tmp_path, sd))


# ---- comparison ----------------------------------------------------------------------------


def test_compare_shapes_and_format():
    exp = {"a": (2, 3), "blocks.0.x": (4,), "blocks.1.x": (4,), "gone": (1,)}
    found = {"a": (2, 3), "blocks.0.x": (5,), "blocks.1.x": (5,), "new": (7,)}
    diffs = compare_shapes(exp, found)
    assert ("blocks.0.x", (4,), (5,)) in diffs and ("gone", (1,), None) in diffs and ("new", None, (7,)) in diffs
    assert compare_shapes(exp, {"a": (2, 3), "blocks.0.x": (4,), "blocks.1.x": (4,)}, optional=("gone",)) == []
    text = det.format_mismatches(diffs)
    assert "blocks.0-1.x: expected [4], found [5]" in text
    assert "gone: missing (expected [1])" in text and "new: unexpected key (shape [7])" in text


def test_mismatch_lists_every_difference_and_names_matching_entry(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfg"
    _tiny_config_json(cfg_dir, "tiny")  # matches the checkpoint
    other = _tiny_config_json(cfg_dir, "other", dim_gate_lora=32, dim_mv_lora=8)  # does not
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(cfg_dir))
    path = write_checkpoint(tmp_path / "m.pth", layer0_v=False)
    sd, _ = load_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}

    good = load_model_config("tiny")
    assert check_config_against(good, shapes) == []  # layer-0 v is optional
    bad = load_model_config("other")
    diffs = check_config_against(bad, shapes)
    assert {k for k, *_ in diffs} == {"blocks.0.att.g1", "blocks.0.att.g2", "blocks.1.att.g1", "blocks.1.att.g2",
                                      "blocks.1.att.v1", "blocks.1.att.v2"}
    assert ("blocks.1.att.v1", (64, 8), (64, 4)) in diffs

    msg = str(mismatch_error(bad, path, shapes))
    assert path in msg and "'Tiny-other'" in msg and str(other) in msg
    assert "dim_mv_lora: expected 8, found 4" in msg and "dim_gate_lora: expected 32, found 16" in msg
    assert "6 tensor mismatch(es)" in msg
    for part in ("blocks.0-1.att.g1: expected [64, 32], found [64, 16]",
                 "blocks.0-1.att.g2: expected [32, 64], found [16, 64]",
                 "blocks.1.att.v1: expected [64, 8], found [64, 4]",
                 "blocks.1.att.v2: expected [8, 64], found [4, 64]"):
        assert part in msg, part
    assert "matches registry entry 'tiny'" in msg

    # With no matching entry the message says how to make one.
    (cfg_dir / "rwkv7-tiny.json").unlink()
    msg = str(mismatch_error(bad, path, shapes))
    assert "No registry entry matches" in msg and "rwkvtune models new" in msg


def test_mismatch_whole_layers_collapsed():
    cfg = load_model_config("0.1b")
    shapes = load_model_config("0.4b").param_shapes()
    msg = str(mismatch_error(cfg, "big.pth", shapes))
    assert "n_layer: expected 12, found 24" in msg and "n_embd: expected 768, found 1024" in msg
    assert "blocks.12-23: unexpected (whole layers)" in msg
    assert "matches registry entry '0.4b'" in msg


# ---- speed: shapes only, tensor data never read ----------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def test_inspect_200mb_file_is_fast_and_reads_no_tensor_data(tmp_path):
    """Stand-in for the 13.3B claim: cost does not grow with the data (mmap, shapes only)."""
    sd = make_state_dict(vocab=256)
    V = 400_000  # emb + head = 2 * 400000 * 64 * 4 bytes = 205 MB
    sd["emb.weight"] = torch.zeros(V, 64)
    sd["head.weight"] = torch.zeros(V, 64)
    path = tmp_path / "big.pth"
    torch.save(sd, path)
    del sd
    assert path.stat().st_size > 200e6

    can_reset_peak = os.path.exists("/proc/self/clear_refs")
    if can_reset_peak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        except OSError:
            can_reset_peak = False
    before = _status_kb("VmRSS") if can_reset_peak else 0
    t0 = time.perf_counter()
    info = inspect_checkpoint(path)
    elapsed = time.perf_counter() - t0
    assert info.vocab_size == V and info.n_params > 51_000_000
    assert elapsed < 1.0, f"inspect took {elapsed:.2f}s"
    if can_reset_peak:
        growth_mb = (_status_kb("VmHWM") - before) / 1024
        assert growth_mb < 40, f"peak RSS grew {growth_mb:.0f} MB: tensor data was read"

    # The tensors load_state_dict hands out are views of a memory map of the file, not copies.
    sd, _ = load_state_dict(path)
    ptr = sd["emb.weight"].data_ptr()
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            regions = [line.split() for line in f]
        mapped = [r for r in regions if len(r) >= 6 and r[5] == str(path.resolve())]
        inside = any(int(r[0].split("-")[0], 16) <= ptr < int(r[0].split("-")[1], 16) for r in mapped)
        assert inside, "emb.weight is not memory-mapped from the checkpoint file"


def test_checkpoint_info_is_a_dataclass_with_summary():
    info = detect(load_model_config("1.5b").param_shapes(layer0_v=False))
    assert isinstance(info, CheckpointInfo)
    assert list(info.summary()) == SUMMARY_KEYS and info.dtype == "unknown"
    assert "1.5b" in list_available_models() and isinstance(ModelConfig.from_checkpoint(info), ModelConfig)


# ---- the torch-free shape reader agrees with torch.load ------------------------------------


def test_read_shapes_matches_torch_load(tmp_path):
    sd = make_state_dict(dtype=torch.bfloat16)
    sd["extra.f16"] = torch.zeros(3, 5, dtype=torch.float16)
    sd["extra.i64"] = torch.arange(7)
    sd["extra.bool"] = torch.ones(2, dtype=torch.bool)
    sd["extra.param"] = torch.nn.Parameter(torch.ones(4, 4))
    sd["extra.view"] = torch.zeros(10, 10)[2:5, :3]  # non-contiguous view of a bigger storage
    torch.save(sd, tmp_path / "m.pth")
    shapes, dtypes, prefix = ck.read_shapes(tmp_path / "m.pth")
    ref = torch.load(tmp_path / "m.pth", map_location="cpu", weights_only=True)
    assert list(shapes) == list(ref) and prefix == ""
    for k, v in ref.items():
        assert shapes[k] == tuple(v.shape), k
        assert dtypes[k] == str(v.dtype).replace("torch.", ""), k


def test_legacy_format_falls_back_to_torch(tmp_path):
    sd = make_state_dict()
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    info = inspect_checkpoint(tmp_path / "legacy.pth")
    assert (info.n_layer, info.dim_aaa_lora, info.n_params) == (2, 12, sum(v.numel() for v in sd.values()))


def test_missing_data_record_is_reported(tmp_path):
    import zipfile

    path = Path(write_checkpoint(tmp_path / "m.pth"))
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("/data/3"):
                dst.writestr(item, src.read(item.filename))
    with pytest.raises(CheckpointError, match="corrupt torch archive: tensor data record '3' is missing"):
        inspect_checkpoint(broken)
