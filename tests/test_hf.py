"""Hugging Face (fla) layout, safetensors and RWKV-PEFT state files: round trips and oracles.

Independent checks: the `rwkv7-hf` package (a separate pure-PyTorch implementation of the HF
layout, optional: importorskip) runs our exports and converts official files with its own
converter; the `safetensors` library (optional) reads our files and writes files we read; the
`rwkv` package runs tuned states exactly the way RWKV Runner feeds them. Checkpoints are random
files in the official layout from tests/helpers.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers import make_state_dict, write_checkpoint
from rwkvtune.configs.detect import detect
from rwkvtune.io.checkpoint import load_state_dict, read_shapes
from rwkvtune.io.layout import LAYER0_V_KEYS
from rwkvtune.convert import hf, state_formats as sf
from rwkvtune.io import hf_layout as hfl, safetensors_io as st
from rwkvtune.errors import CheckpointError, OutputError
from rwkvtune.models.rwkv7 import RWKV7

# Four different low-rank dims (decay, aaa, mv, gate), head size 64 (see hf.py on ln_x eps).
DIMS = dict(n_layer=3, n_embd=128, head_size=64, vocab=300, d_decay=8, d_aaa=12, d_mv=4, d_gate=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same(a: dict, b: dict) -> None:
    """Identical keys, shapes, dtypes and values."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and tuple(a[k].shape) == tuple(b[k].shape), k
        assert torch.equal(a[k], b[k]), k


def _one_line_error(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src") / "m.pth", **DIMS)


@pytest.fixture(scope="module")
def exported(pth, tmp_path_factory):
    return hf.export_hf(pth, tmp_path_factory.mktemp("hf") / "out")


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layer0_v", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_pth_hf_pth_identical(tmp_path, layer0_v, dtype):
    src = write_checkpoint(tmp_path / "m.pth", **DIMS, layer0_v=layer0_v, dtype=dtype)
    sd = torch.load(src, weights_only=True)
    out = hf.export_hf(src, tmp_path / "hf")
    assert (out / hfl.EXTRA_NAME).is_file() == layer0_v
    _same(hfl.load_hf_state_dict(out), sd)
    assert hfl.hf_shapes(out) == {k: tuple(v.shape) for k, v in sd.items()}
    hf.convert_to_official(out, tmp_path / "back.pth")
    _same(torch.load(tmp_path / "back.pth", weights_only=True), sd)
    # The side file is what restores layer-0 v: without it the keys are simply absent.
    if layer0_v:
        (out / hfl.EXTRA_NAME).unlink()
        assert set(sd) - set(hfl.load_hf_state_dict(out)) == set(LAYER0_V_KEYS)


def test_export_folder_config_and_vocab(exported):
    from rwkvtune.tokenizer import _default_vocab_file

    cfg = json.loads((exported / "config.json").read_text())
    want = {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "vocab_size": DIMS["vocab"],
            "hidden_size": DIMS["n_embd"], "num_hidden_layers": DIMS["n_layer"], "head_dim": DIMS["head_size"],
            "num_heads": DIMS["n_embd"] // DIMS["head_size"], "intermediate_size": 4 * DIMS["n_embd"],
            "decay_low_rank_dim": DIMS["d_decay"], "a_low_rank_dim": DIMS["d_aaa"], "v_low_rank_dim": DIMS["d_mv"],
            "gate_low_rank_dim": DIMS["d_gate"], "norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": "float32"}
    assert {k: cfg[k] for k in want} == want
    assert type(cfg["intermediate_size"]) is int
    assert (exported / hfl.VOCAB_NAME).read_bytes() == Path(_default_vocab_file()).read_bytes()
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        ["config.json", "model.safetensors", hfl.VOCAB_NAME, hfl.EXTRA_NAME])


def test_export_from_every_source_kind_is_byte_identical(pth, exported, tmp_path):
    """.pth, official .safetensors and an HF folder (re-export) give the same files."""
    official_st = tmp_path / "m.safetensors"
    hf.convert_to_official(pth, official_st)
    for i, src in enumerate((official_st, exported)):
        out = hf.export_hf(src, tmp_path / f"again{i}")
        for name in ("model.safetensors", hfl.EXTRA_NAME, "config.json"):
            assert (out / name).read_bytes() == (exported / name).read_bytes(), (src, name)


def test_sharding_gives_same_tensors_and_valid_index(pth, exported, tmp_path):
    out = hf.export_hf(pth, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / st.INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    assert sorted(set(index["weight_map"].values())) == shards
    single = st.load_safetensors(exported / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for name, file in index["weight_map"].items():
        assert name in st.safetensors_specs(out / file)
    _same(st.load_folder(out), single)
    _same(hfl.load_hf_state_dict(out), hfl.load_hf_state_dict(exported))
    # Every shard except those holding one oversized tensor respects the limit.
    for s in shards:
        specs = st.safetensors_specs(out / s)
        assert len(specs) == 1 or sum(x.nbytes for x in specs.values()) <= 100_000


@pytest.mark.parametrize("fused_shape", [(6, -1), (6, 1, 1, -1)])
def test_older_fused_token_shift_layout_is_read(pth, exported, tmp_path, fused_shape):
    """fla before April 2025: x_r..x_g fused into attn.x_x [6, C] (rows r, w, k, v, a, g; some
    published files hold [6, 1, 1, C]), and vectors stored [1, 1, C] instead of [C]."""
    sd = torch.load(pth, weights_only=True)
    tensors = st.load_safetensors(exported / "model.safetensors", mmap_file=False)
    for i in range(DIMS["n_layer"]):
        p = f"model.layers.{i}.attn."
        rows = [tensors.pop(p + x).reshape(1, -1) for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]
        tensors[p + "x_x"] = torch.cat(rows).reshape(fused_shape)
        tensors[p + "k_k"] = tensors[p + "k_k"].reshape(1, 1, -1)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((exported / "config.json").read_text())
    st.save_safetensors(tensors, old / "model.safetensors", metadata={"format": "pt"})
    loaded = hfl.load_hf_state_dict(old)
    _same(loaded, {k: v for k, v in sd.items() if k not in LAYER0_V_KEYS})
    assert detect(hfl.hf_shapes(old)).dim_aaa_lora == DIMS["d_aaa"]
    with hf.HFSource(old) as src:  # the streaming reader agrees with the mapped one
        _same({k: src.read(k) for k in src.shapes}, loaded)


def test_official_safetensors_and_pth_load_identically(pth, tmp_path):
    sd = make_state_dict(**{**DIMS, "dtype": torch.bfloat16})
    torch.save(sd, tmp_path / "a.pth")
    st.save_safetensors(sd, tmp_path / "a.safetensors")
    hf.convert_to_official(tmp_path / "a.pth", tmp_path / "b.safetensors")
    from_pth, _ = load_state_dict(tmp_path / "a.pth")
    for f in ("a.safetensors", "b.safetensors"):
        _same(load_state_dict(tmp_path / f)[0], from_pth)
        assert read_shapes(tmp_path / f) == read_shapes(tmp_path / "a.pth")
    # Streaming .pth reader (no mmap) gives the same tensors, views into shared storages included.
    views = {"a": torch.arange(24.).reshape(4, 6)[1:3, ::2], "b": torch.arange(5, dtype=torch.bfloat16)}
    torch.save(views, tmp_path / "v.pth")
    from rwkvtune.convert.sources import open_official

    with open_official(tmp_path / "v.pth") as s:
        _same({k: s.read(k) for k in s.shapes}, {k: v.contiguous() for k, v in views.items()})


def test_wrapper_prefix_is_stripped_from_every_source(tmp_path):
    """Trainer files carry `_forward_module.` on every key, in .pth and .safetensors alike."""
    sd = make_state_dict(**DIMS)
    pre = {"_forward_module." + k: v for k, v in sd.items()}
    torch.save(pre, tmp_path / "p.pth")
    st.save_safetensors(pre, tmp_path / "p.safetensors")
    for f in ("p.pth", "p.safetensors"):
        shapes, _, prefix = read_shapes(tmp_path / f)
        assert prefix == "_forward_module." and shapes == {k: tuple(v.shape) for k, v in sd.items()}
        _same(load_state_dict(tmp_path / f)[0], sd)
        _same(hfl.load_hf_state_dict(hf.export_hf(tmp_path / f, tmp_path / f"hf-{f}")), sd)


# --------------------------------------------------------------------- safetensors library
def test_our_safetensors_read_by_library_and_back(tmp_path):
    lib = pytest.importorskip("safetensors.torch")
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
               "f16": torch.randn(2, 2, 2).half(), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
               "bool": torch.tensor([True, False, True])}
    st.save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"k": "v"})
    _same(lib.load_file(str(tmp_path / "ours.safetensors")), tensors)
    lib.save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    _same(st.load_safetensors(tmp_path / "lib.safetensors"), tensors)
    _same(st.load_safetensors(tmp_path / "lib.safetensors", mmap_file=False), tensors)
    assert st.read_header(tmp_path / "ours.safetensors")[1] == {"k": "v"}


def test_exported_shards_read_by_library(pth, tmp_path):
    lib = pytest.importorskip("safetensors.torch")
    out = hf.export_hf(pth, tmp_path / "sh", max_shard_bytes=100_000)
    for f in out.glob("*.safetensors"):
        _same(lib.load_file(str(f)), st.load_safetensors(f))


def test_mapped_tensors_are_private_copies(tmp_path):
    """Copy-on-write mapping: writing to a loaded tensor never changes the file."""
    st.save_safetensors({"x": torch.zeros(8)}, tmp_path / "x.safetensors")
    before = (tmp_path / "x.safetensors").read_bytes()
    st.load_safetensors(tmp_path / "x.safetensors")["x"].add_(1)
    assert (tmp_path / "x.safetensors").read_bytes() == before


# ------------------------------------------------------------------ independent HF implementation
def test_rwkv7_hf_runs_our_export_with_equal_logits(pth, exported):
    rwkv7_hf = pytest.importorskip("rwkv7_hf")
    theirs, info = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    theirs = theirs.float()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = RWKV7.from_checkpoint(pth)
    idx = torch.randint(0, DIMS["vocab"], (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(idx)
        got = theirs.eval()(input_ids=idx).logits
    assert want.abs().max() > 1  # real logits, not a degenerate model
    assert (got - want).abs().max().item() < 1e-5


def test_reads_folder_written_by_rwkv7_hf_converter(pth, tmp_path):
    converter = pytest.importorskip("rwkv7_hf.converter")
    out = tmp_path / "theirs"
    converter.main(["--input", str(pth), "--output", str(out), "--precision", "fp32"])
    sd = torch.load(pth, weights_only=True)
    _same(hfl.load_hf_state_dict(out), {k: v for k, v in sd.items() if k not in LAYER0_V_KEYS})
    info = detect(hfl.hf_shapes(out))
    assert (info.dim_att_lora, info.dim_aaa_lora, info.dim_mv_lora, info.dim_gate_lora) == (8, 12, 4, 16)


# ------------------------------------------------------------------------------ bad input
def _write_raw(path: Path, header, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header,data,words", [
    (b"{not json", b"", ["not UTF-8 JSON"]),
    ([1, 2], b"", ["JSON list"]),
    ({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, ["'x'", "dtype 'Q9'"]),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, ["'x'", "needs 8"]),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, ["non-negative"]),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, ["without gaps"]),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, ["ends at byte"]),
    ({"x": {"dtype": "F32", "shape": [1]}}, b"", ["exactly dtype, shape and data_offsets"]),
    ({"__metadata__": {"a": 1}}, b"", ["__metadata__"]),
    ((b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
      b'"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'), b"\0\0", ["'x' twice"]),
    # json.loads would recurse 200k levels: RecursionError before; refused before parsing now.
    (b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"", ["more than 16 levels deep"]),
])
def test_malformed_safetensors_refused(tmp_path, header, data, words):
    p = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        st.load_safetensors(p)
    _one_line_error(e, str(p), *words)


def test_json_depth_counts_brackets_outside_strings_only():
    assert st.json_depth("") == 0 and st.json_depth('"[[["') == 0
    assert st.json_depth('{"a": {"shape": [1, 2]}, "b": "]]]{{{"}') == 3
    assert st.json_depth('{"a\\"[[": [[["x\\\\"]]]}') == 4  # escaped quote inside a name, escaped backslash
    assert st.json_depth("[" * 200_000) == 200_000


def test_deeply_nested_artifact_metadata_is_one_line(tmp_path):
    from rwkvtune.io.artifacts import load_artifact

    p = tmp_path / "adapter.safetensors"
    st.save_safetensors({"x": torch.zeros(2)}, p, metadata={st.ARTIFACT_META: "[" * 200_000 + "]" * 200_000})
    with pytest.raises(CheckpointError) as e:
        load_artifact(p, "LoRA adapter", "rwkvtune train --lora")
    _one_line_error(e, str(p), "nests more than 64 levels deep")
    assert sorted(load_state_dict(p)[0]) == ["x"]  # not taken for an adapter or a state: the model checks decide


def test_truncated_or_huge_header_refused(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x05\0")
    with pytest.raises(CheckpointError) as e:
        st.read_header(p)
    _one_line_error(e, "shorter than the 8-byte header length")
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError) as e:
        st.read_header(p)
    _one_line_error(e, "header length")


def test_bad_hf_folders_refused(exported, tmp_path):
    def folder(name, cfg=None, files=()):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg or {"model_type": "rwkv7"}))
        for f in files:
            (d / f).write_bytes((exported / "model.safetensors").read_bytes() if f.endswith("safetensors") else b"x")
        return d

    cases = [
        (folder("llama", {"model_type": "llama"}, ["model.safetensors"]), ["model_type is 'llama'", "RWKV-7"]),
        (folder("bin", None, ["pytorch_model.bin"]), ["pytorch_model.bin", "safetensors"]),
        (folder("none"), ["no weights"]),
    ]
    d = folder("unknown", None, [])
    st.save_safetensors({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, d / "model.safetensors")
    cases.append((d, ["'model.layers.0.mlp.up_proj.weight'", "not part of the RWKV-7"]))
    for name, wmap in (("escape", {"lm_head.weight": "../model.safetensors"}),
                       ("absent", {"nope.weight": "model.safetensors"})):
        d = folder(name, None, ["model.safetensors"])
        (d / st.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        cases.append((d, ["plain file name"] if name == "escape" else ["'nope.weight'", "no such tensor"]))
    for d, words in cases:
        assert hfl.is_hf_folder(d)
        with pytest.raises(CheckpointError) as e:
            hfl.hf_shapes(d)
        _one_line_error(e, *words)


def test_export_refuses_nonempty_target_and_leaves_nothing_on_failure(pth, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError) as e:
        hf.export_hf(pth, tmp_path / "full")
    _one_line_error(e, "not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

    calls = {"n": 0}
    real = st._write_tensor

    def disk_full_at_20th_tensor(f, t):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(f, t)

    monkeypatch.setattr(st, "_write_tensor", disk_full_at_20th_tensor)
    with pytest.raises(OutputError) as e:
        hf.export_hf(pth, tmp_path / "out")
    _one_line_error(e, "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no out/, no temp folder
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()  # an existing empty folder is a fine target
    assert hf.export_hf(pth, tmp_path / "empty") == tmp_path / "empty"
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_export_refuses_truncated_and_foreign_sources(pth, tmp_path):
    data = Path(pth).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    torch.save({"format": "rwkvtune-lora-v1", "r": 4}, tmp_path / "adapter.pth")
    st.save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-3])
    (tmp_path / "plain").mkdir()
    for name, words in (("cut.pth", ["truncated"]), ("adapter.pth", ["LoRA adapter"]),
                        ("x.safetensors", ["not an RWKV-7 state dict"]), ("cut.safetensors", ["ends at byte"]),
                        ("plain", ["directory without config.json"])):
        with pytest.raises(CheckpointError) as e:
            hf.export_hf(tmp_path / name, tmp_path / f"out-{name}")
        _one_line_error(e, name, *words)
        assert not (tmp_path / f"out-{name}").exists()


def test_export_refuses_config_that_does_not_fit(pth, tmp_path):
    from rwkvtune.configs.model_loader import ModelConfig

    wrong = ModelConfig(model_name="wrong", n_layer=3, n_embd=128, vocab_size=300, head_size_a=64,
                        dim_att_lora=8, dim_aaa_lora=12, dim_mv_lora=4, dim_gate_lora=32)
    with pytest.raises(CheckpointError) as e:
        hf.export_hf(pth, tmp_path / "o", model_config=wrong)
    _one_line_error(e, "dim_gate_lora: expected 32, found 16")
    assert not (tmp_path / "o").exists()


def _hf_copy(exported: Path, to: Path, change: Callable[[dict], None], name: str = "model.safetensors") -> Path:
    """A copy of an exported folder whose ``name`` file has its tensors passed through ``change``."""
    to.mkdir()
    for f in exported.iterdir():
        if f.name != name:
            (to / f.name).write_bytes(f.read_bytes())
    tensors = {k: v.clone() for k, v in st.load_safetensors(exported / name, mmap_file=False).items()}
    meta = st.read_header(exported / name)[1]
    change(tensors)
    st.save_safetensors(tensors, to / name, metadata=meta)
    return to


def test_fp8_tensors_in_an_hf_folder_export_upcast(exported, tmp_path):
    e4, e5 = "model.layers.0.attn.r_proj.weight", "model.layers.1.ffn.key.weight"

    def to_fp8(t):
        t[e4], t[e5] = t[e4].to(torch.float8_e4m3fn), t[e5].to(torch.float8_e5m2)

    fp8 = _hf_copy(exported, tmp_path / "fp8", to_fp8)
    stored = st.load_safetensors(fp8 / "model.safetensors", mmap_file=False)
    out = hf.export_hf(fp8, tmp_path / "out")
    got = st.load_safetensors(out / "model.safetensors", mmap_file=False)
    for name in (e4, e5):  # the dtype of the other tensors (float32 here), values exactly the fp8 ones
        assert got[name].dtype == torch.float32 and torch.equal(got[name], stored[name].float()), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in load_state_dict(out)[0].values()} == {torch.float32}
    hf.convert_to_official(fp8, tmp_path / "o.pth")
    assert torch.load(tmp_path / "o.pth", weights_only=True)["blocks.0.att.receptance.weight"].dtype == torch.float32
    out16 = hf.export_hf(fp8, tmp_path / "out16", dtype=torch.bfloat16)
    got16 = st.load_safetensors(out16 / "model.safetensors", mmap_file=False)
    assert torch.equal(got16[e5], stored[e5].to(torch.bfloat16))  # every fp8 value is exact in bfloat16

    def nan_fp8(t):  # 0x7F is NaN in float8_e4m3fn (it has no inf)
        t[e4] = t[e4].to(torch.float8_e4m3fn)
        t[e4].view(torch.uint8).view(-1)[5] = 0x7F

    bad = _hf_copy(exported, tmp_path / "nan8", nan_fp8)
    with pytest.raises(CheckpointError) as e:
        hf.export_hf(bad, tmp_path / "out-nan8")
    _one_line_error(e, str(bad / "model.safetensors"), "blocks.0.att.receptance.weight", "1 non-finite")
    assert not (tmp_path / "out-nan8").exists()


def test_nan_in_the_layer0_v_side_file_is_refused_at_export(pth, exported, tmp_path):
    def poison(t):
        t["blocks.0.att.v1"].view(-1)[3] = float("nan")

    folder = _hf_copy(exported, tmp_path / "nan", poison, name=hfl.EXTRA_NAME)
    with pytest.raises(CheckpointError) as e:
        hf.export_hf(folder, tmp_path / "out")
    _one_line_error(e, str(folder / hfl.EXTRA_NAME), "blocks.0.att.v1", "1 non-finite")
    assert not (tmp_path / "out").exists()
    # From a .pth as well: the side file is written from the same checked tensors.
    sd = torch.load(pth, weights_only=True)
    sd["blocks.0.att.v2"].view(-1)[1] = float("inf")
    torch.save(sd, tmp_path / "inf.pth")
    with pytest.raises(CheckpointError) as e:
        hf.export_hf(tmp_path / "inf.pth", tmp_path / "out2")
    _one_line_error(e, "inf.pth", "blocks.0.att.v2")
    assert not (tmp_path / "out2").exists()


def test_export_to_a_narrower_dtype_refuses_overflow(pth, tmp_path):
    sd = torch.load(pth, weights_only=True)
    sd["blocks.1.ffn.value.weight"][0, 0] = 1e6  # fine in float32 and bfloat16, inf in float16
    torch.save(sd, tmp_path / "big.pth")
    with pytest.raises(CheckpointError) as e:
        hf.export_hf(tmp_path / "big.pth", tmp_path / "out", dtype=torch.float16)
    _one_line_error(e, "blocks.1.ffn.value.weight", "beyond the range of float16")
    assert not (tmp_path / "out").exists()
    hf.export_hf(tmp_path / "big.pth", tmp_path / "out", dtype=torch.bfloat16)


# --------------------------------------------------------------------------- bounded memory
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux /proc/self/status")
def test_export_peak_memory_stays_near_one_tensor(tmp_path):
    """A ~190 MB checkpoint whose largest tensor is 4 MB: exporting it raises the peak resident
    memory by far less than the file size (mapped reading would add the whole file)."""
    src = write_checkpoint(tmp_path / "big.pth", n_layer=16, n_embd=512, head_size=64, vocab=2048, d_decay=32,
                           d_aaa=32, d_mv=32, d_gate=64)
    size = os.path.getsize(src)
    # VmRSS / VmHWM of the child itself (ru_maxrss would carry the parent's peak across exec).
    code = (
        "import sys\n"
        "from rwkvtune.convert.hf import export_hf\n"
        "def kb(field):\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])\n"
        "before = kb('VmRSS:')\n"
        "export_hf(sys.argv[1], sys.argv[2])\n"
        "print((kb('VmHWM:') - before) * 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, src, str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split()[-1])
    assert size > 150e6 and growth < 60e6, (size, growth)


# ---------------------------------------------------------------------------- tuned states
def test_state_layouts_convert_both_ways(tmp_path):
    wkv = torch.randn(3, 2, 16, 16)
    peft = sf.wkv_init_to_peft(wkv)
    assert sorted(peft) == [f"blocks.{i}.att.time_state" for i in range(3)]
    assert all(peft[f"blocks.{i}.att.time_state"].shape == (2, 16, 16) for i in range(3))
    assert sf.detect_state_layout(peft) == "rwkv-peft"
    assert torch.equal(sf.peft_to_wkv_init(peft), wkv)
    ours = {"format": "rwkvtune-state-v1", "wkv_init": wkv, "n_embd": 32}
    assert sf.detect_state_layout(ours) == "rwkvtune"
    assert torch.equal(sf.to_wkv_init(ours), wkv) and torch.equal(sf.to_wkv_init(peft), wkv)
    # bf16 files (what RWKV-PEFT writes) read as fp32 of the same values.
    assert torch.equal(sf.peft_to_wkv_init(sf.wkv_init_to_peft(wkv, torch.bfloat16)), wkv.bfloat16().float())
    sf.save_peft_state(tmp_path / "s.pth", wkv)
    assert torch.equal(sf.load_state_any(tmp_path / "s.pth"), wkv)
    torch.save(ours, tmp_path / "o.pth")
    assert torch.equal(sf.load_state_any(tmp_path / "o.pth"), wkv)
    st.save_safetensors(peft, tmp_path / "s.safetensors")
    assert torch.equal(sf.load_state_any(tmp_path / "s.safetensors"), wkv)
    # A merged model carrying time_state keys: the state is extracted, the weights ignored.
    assert torch.equal(sf.peft_to_wkv_init({**peft, "emb.weight": torch.zeros(2, 2)}), wkv)


@pytest.mark.parametrize("obj,words", [
    ({"blocks.0.att.time_state": torch.zeros(2, 4, 4), "blocks.2.att.time_state": torch.zeros(2, 4, 4)},
     ["layers [1]"]),
    ({"blocks.0.att.time_state": torch.zeros(2, 4, 4), "blocks.1.att.time_state": torch.zeros(2, 4, 5)},
     ["blocks.1.att.time_state is [2, 4, 5]"]),
    ({"emb.weight": torch.zeros(2)}, ["not a state file", "emb.weight"]),
    ([1, 2], ["found a list"]),
])
def test_bad_state_files_refused(obj, words):
    with pytest.raises(CheckpointError) as e:
        sf.to_wkv_init(obj, "s.pth")
    _one_line_error(e, "s.pth", *words)


@pytest.fixture(scope="module")
def state_model(tmp_path_factory):
    os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV

    kw = dict(n_layer=2, n_embd=64, head_size=16, vocab=256, d_decay=8, d_aaa=12, d_mv=4, d_gate=16)
    path = write_checkpoint(tmp_path_factory.mktemp("state") / "m.pth", **kw)
    return RWKV7.from_checkpoint(path), RWKV(path[:-4], "cpu fp32"), kw


@pytest.mark.parametrize("direction", ["tuned-here-runs-there", "tuned-there-runs-here"])
def test_state_runs_the_same_in_rwkv_package_as_rwkv_runner_feeds_it(state_model, tmp_path, direction):
    """RWKV Runner (v7) puts each time_state, unchanged and as fp32, at index 3i+1 of the `rwkv`
    package's state list, zeros elsewhere. Our model takes wkv_init. Logits must agree."""
    model, oracle, kw = state_model
    L, C, N = kw["n_layer"], kw["n_embd"], kw["head_size"]
    g = torch.Generator().manual_seed(5)
    wkv = torch.randn(L, C // N, N, N, generator=g) * 0.5
    if direction == "tuned-here-runs-there":
        sf.save_peft_state(tmp_path / "s.pth", wkv)
        time_state = torch.load(tmp_path / "s.pth", weights_only=True)  # what RWKV Runner reads
        ours_wkv = wkv
    else:
        time_state = sf.wkv_init_to_peft(wkv, torch.bfloat16)  # what RWKV-PEFT writes
        torch.save(time_state, tmp_path / "s.pth")
        ours_wkv = sf.load_state_any(tmp_path / "s.pth")
    ids = torch.randint(0, kw["vocab"], (1, 19), generator=g)

    def runner_logits(transpose: bool):
        state = []
        for i in range(L):
            s = time_state[f"blocks.{i}.att.time_state"].float()
            state += [torch.zeros(C), (s.transpose(1, 2) if transpose else s).contiguous(), torch.zeros(C)]
        return oracle.forward(ids[0].tolist(), state, full_output=True)[0].float()

    with torch.no_grad():
        ours = model(ids, wkv_init=ours_wkv)[0]
    assert (ours - runner_logits(False)).abs().max().item() < 1e-4
    # The test can tell the orientations apart: a transposed state runs clearly differently.
    assert (ours - runner_logits(True)).abs().max().item() > 1e-2


# ---- everything that takes a model takes an HF folder; safetensors outputs ----------------------


def test_every_command_takes_an_hf_folder(tmp_path, capsys):
    from rwkvtune.cli import main
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.train.trainer import train

    small = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=12, d_mv=4, d_gate=16)
    pth = write_checkpoint(tmp_path / "m.pth", **small)
    folder = hf.export_hf(pth, tmp_path / "hf")
    ids = torch.tensor([[5, 300, 2000, 17, 42]])
    with torch.no_grad():
        assert torch.equal(RWKV7.from_checkpoint(folder)(ids), RWKV7.from_checkpoint(pth)(ids))
    assert main(["inspect", str(folder), "--json"]) == 0
    dims = json.loads(capsys.readouterr().out)
    assert main(["inspect", pth, "--json"]) == 0
    assert dims == json.loads(capsys.readouterr().out)  # the same dims, detected from the folder
    assert main(["models", "new", str(folder), "--name", "from-hf", "-o", str(tmp_path / "c.json")]) == 0
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"red blue {i} green"}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    train(TrainConfig(model=str(folder), data=str(text), out=str(out), mode="lora", ctx_len=16, batch_size=2,
                      max_steps=1, tensorboard=False, save_every=0))
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--data", str(text), "--ctx-len", "16",
                 "--adapter", str(out / "adapter.pth")]) == 0
    assert json.loads(capsys.readouterr().out)["eval_tokens"] > 0


def test_save_format_safetensors_outputs_equal_pth(tmp_path):
    from rwkvtune.io.checkpoint import load_state_dict as load
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.peft.lora import load_adapter
    from rwkvtune.peft.state import load_state_file
    from rwkvtune.train.trainer import train

    small = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
    pth = write_checkpoint(tmp_path / "m.pth", **small)
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"red blue {i} green cat"}) + "\n" for i in range(8)))
    runs = {}
    for mode in ("full", "lora", "state"):
        for fmt in ("pth", "safetensors"):
            out = tmp_path / f"{mode}-{fmt}"
            train(TrainConfig(model=pth, data=str(text), out=str(out), mode=mode, ctx_len=16, batch_size=2,
                              max_steps=2, lr=1e-2, tensorboard=False, save_every=0, save_format=fmt))
            runs[mode, fmt] = out
    for mode in ("full", "lora"):
        a, b = load(runs[mode, "pth"] / "final.pth")[0], load(runs[mode, "safetensors"] / "final.safetensors")[0]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = RWKV7.from_checkpoint(pth)
    merged = [load_adapter(RWKV7.from_checkpoint(pth), runs["lora", fmt] / f"adapter.{fmt}") for fmt in
              ("pth", "safetensors")]
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(merged[0](ids), merged[1](ids)) and not torch.equal(merged[0](ids), base(ids))
    states = [load_state_file(runs["state", "pth"] / "state.pth", base),
              load_state_file(runs["state", "safetensors"] / "state.safetensors", base),
              load_state_file(runs["state", "pth"] / "state.rwkv-peft.pth", base)]  # RWKV-PEFT's layout
    assert states[0].abs().max() > 0 and all(torch.equal(states[0], s) for s in states[1:])
    peft = torch.load(runs["state", "pth"] / "state.rwkv-peft.pth", weights_only=True)
    assert sorted(peft) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
