"""GGUF export for llama.cpp: read back with the `gguf` package, compared with llama.cpp's own
converter, and run in llama.cpp itself.

Clients: the `gguf` package (PyPI, kept by llama.cpp; in the test extra) reads every file back.
llama.cpp's converter (convert_hf_to_gguf.py) and llama.cpp (node-llama-cpp's prebuilt CPU
binaries) are fetched by tests/clients/fetch_llamacpp.sh into $RWKVTUNE_CLIENTS (default
~/.cache/rwkvtune-clients); the tests that need them are skipped, with the reason, without them.
Models are random ones from tests/helpers.py with the World vocabulary's 65536 rows (a GGUF file
carries the World tokenizer).
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_state_dict, write_checkpoint
from rwkvtune.cli import main
from rwkvtune.errors import CheckpointError, ConfigError, OutputError

gguf = pytest.importorskip("gguf")
from rwkvtune.convert import gguf_export as ge  # noqa: E402 (after the skip: it needs gguf at run time)

REPO = Path(__file__).resolve().parent.parent
CLIENTS = Path(os.environ.get("RWKVTUNE_CLIENTS") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
               / "rwkvtune-clients")
CONVERTER = CLIENTS / "llama.cpp" / "convert_hf_to_gguf.py"
NODE_MODULES = CLIENTS / "node" / "node_modules"
FETCH = "run tests/clients/fetch_llamacpp.sh (or set RWKVTUNE_CLIENTS to where it fetched them)"
# Four different low-rank dims: layer 0's copied v-tensors take a's rank (32), the others v's (16);
# v2 [C, 16] and g2 [C, 48] have rows q8_0 cannot hold (not a multiple of 32): stored as f16.
DIMS = dict(n_layer=2, n_embd=64, head_size=64, vocab=65536, d_decay=32, d_aaa=32, d_mv=16, d_gate=48)
HEAD_SIZE = DIMS["head_size"]
# The converter derives general.name from the model folder's name; ours from the output file's.
NAMED_BY_PATH = {"general.name"}
# The converter copies llama.cpp's Jinja file for RWKV World; we write that template's llama.cpp name
# ("rwkv-world"), which llama.cpp resolves to the same built-in chat format.
NOT_COMPARED = NAMED_BY_PATH | {"tokenizer.chat_template"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("gguf") / "tiny.pth", **DIMS)


@pytest.fixture(scope="module")
def ours(pth, tmp_path_factory):
    """ours(save_dtype) -> our GGUF file of the tiny model, exported once for the module."""
    d, files = tmp_path_factory.mktemp("ours"), {}

    def get(save_dtype: str) -> Path:
        if save_dtype not in files:
            files[save_dtype] = ge.export_gguf(pth, d / f"tiny-{save_dtype}.gguf", save_dtype=save_dtype)
        return files[save_dtype]

    return get


_READ: dict[str, tuple[dict, dict]] = {}


def read_gguf(path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: (type name, row-major shape, stored data)}), by the gguf
    package's reader (its token-list parsing takes seconds: each file is read once)."""
    if str(path) not in _READ:
        _READ[str(path)] = _read_gguf(path)
    return _READ[str(path)]


def _read_gguf(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = (t.tensor_type.name, shape, t.data)
    return kv, tensors


def values(entry) -> torch.Tensor:
    """A tensor's values in float32 (dequantized: exact for F32/F16/BF16)."""
    qtype, shape, data = entry
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).copy()).reshape(shape)


def expected_tensors(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """The documented transforms (rwkvtune/convert/gguf_export.py's table), written out again here."""
    out = {"token_embd.weight": sd["emb.weight"], "output.weight": sd["head.weight"]}
    for p in ("weight", "bias"):
        out[f"token_embd_norm.{p}"] = sd[f"blocks.0.ln0.{p}"]
        out[f"output_norm.{p}"] = sd[f"ln_out.{p}"]
    for i in range(n_layer):
        b, a = f"blk.{i}.", f"blocks.{i}.att."
        for p in ("weight", "bias"):
            out[f"{b}attn_norm.{p}"] = sd[f"blocks.{i}.ln1.{p}"]
            out[f"{b}attn_norm_2.{p}"] = sd[f"blocks.{i}.ln2.{p}"]
            out[f"{b}time_mix_ln.{p}"] = sd[f"{a}ln_x.{p}"]
        out[f"{b}time_mix_lerp_fused.weight"] = torch.cat([sd[a + x] for x in ("x_r", "x_w", "x_k", "x_v", "x_a",
                                                                                  "x_g")]).reshape(6, 1, 1, -1)
        for letter in "wavg":
            src = "a" if (i == 0 and letter == "v") else letter  # layer 0: copies of a0/a1/a2
            if letter != "g":
                out[f"{b}time_mix_{letter}0.weight"] = sd[f"{a}{src}0"].flatten()
            out[f"{b}time_mix_{letter}1.weight"] = sd[f"{a}{src}1"].T
            out[f"{b}time_mix_{letter}2.weight"] = sd[f"{a}{src}2"].T
        for x in ("k_k", "k_a", "r_k"):
            out[f"{b}time_mix_{x}.weight"] = sd[a + x].flatten()
        for name in ("receptance", "key", "value", "output"):
            out[f"{b}time_mix_{name}.weight"] = sd[f"{a}{name}.weight"]
        out[f"{b}channel_mix_lerp_k.weight"] = sd[f"blocks.{i}.ffn.x_k"].flatten()
        out[f"{b}channel_mix_key.weight"] = sd[f"blocks.{i}.ffn.key.weight"]
        out[f"{b}channel_mix_value.weight"] = sd[f"blocks.{i}.ffn.value.weight"]
    return out


def _f32_kept(name: str, shape) -> bool:
    """What llama.cpp's converter always stores as float32: vectors, norms, w1/w2, the lerps."""
    return len(shape) == 1 or any(s in name for s in ("time_mix_w1", "time_mix_w2", "lerp_fused"))


def check_tensors(path, sd, n_layer, file_type) -> dict:
    """Every tensor of ``path`` equals ours after the transforms, stored in the right type."""
    kv, tensors = read_gguf(path)
    want = expected_tensors(sd, n_layer)
    assert sorted(tensors) == sorted(want)
    cast = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for name, w in want.items():
        qtype, shape, _ = tensors[name]
        assert shape == tuple(w.shape), name
        expect_type = "F32" if _f32_kept(name, shape) else file_type
        if expect_type == "Q8_0" and shape[-1] % 32:
            expect_type = "F16"
        assert qtype == expect_type, name
        got = values(tensors[name])
        if qtype == "Q8_0":  # 8-bit blocks of 32, one f16 scale: half a step, plus the scale's rounding
            step = w.float().reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            assert ((got.reshape(-1, 32) - w.float().reshape(-1, 32)).abs() <= step * 0.6).all(), name
        else:
            assert torch.equal(got, w.to(cast[qtype]).float()), name
    return kv


# ---- (a) read back with the gguf package ------------------------------------------------------------


SAVE_DTYPES = [("fp32", "F32", "ALL_F32"), ("fp16", "F16", "MOSTLY_F16"), ("bf16", "BF16", "MOSTLY_BF16"),
               ("q8_0", "Q8_0", "MOSTLY_Q8_0")]


@pytest.mark.parametrize("save_dtype, ggml_type, file_type", SAVE_DTYPES)
def test_every_tensor_reads_back_equal_after_the_transforms(ours, save_dtype, ggml_type, file_type):
    sd = make_state_dict(**DIMS)
    assert "blocks.0.att.v1" in sd  # the source has real layer-0 v-tensors; the file has a's copies
    kv = check_tensors(ours(save_dtype), sd, DIMS["n_layer"], ggml_type)
    assert kv["general.file_type"] == int(gguf.LlamaFileType[file_type])


def test_keep_takes_the_source_dtype(tmp_path):
    torch.save(make_state_dict(**DIMS, dtype=torch.bfloat16), tmp_path / "bf16.pth")
    out = ge.export_gguf(tmp_path / "bf16.pth", tmp_path / "m.gguf")  # keep
    check_tensors(out, make_state_dict(**DIMS, dtype=torch.bfloat16), DIMS["n_layer"], "BF16")


def test_metadata_complete(ours):
    kv, _ = read_gguf(ours("fp32"))
    c, p = DIMS, "rwkv7."
    want = {"general.architecture": "rwkv7", "general.type": "model", "general.name": "tiny-fp32",
            p + "context_length": 1 << 20, p + "embedding_length": c["n_embd"], p + "block_count": c["n_layer"],
            p + "wkv.head_size": c["head_size"], p + "attention.decay_lora_rank": c["d_decay"],
            p + "attention.iclr_lora_rank": c["d_aaa"], p + "attention.value_residual_mix_lora_rank": c["d_mv"],
            p + "attention.gate_lora_rank": c["d_gate"], p + "feed_forward_length": 4 * c["n_embd"],
            p + "attention.head_count": 0, "general.file_type": int(gguf.LlamaFileType.ALL_F32),
            "general.quantization_version": gguf.GGML_QUANT_VERSION, "tokenizer.ggml.model": "rwkv",
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.eot_token_id": 261}
    for k, v in want.items():
        assert kv.get(k) == v, k
    assert abs(kv[p + "attention.layer_norm_epsilon"] - 1e-5) < 1e-12
    n_params = sum(t.numel() for t in expected_tensors(make_state_dict(**DIMS), DIMS["n_layer"]).values())
    assert kv["general.size_label"] == gguf.size_label(n_params, n_params, 0, 0)
    assert kv["tokenizer.chat_template"] == "rwkv-world"
    assert set(kv) == set(want) | {p + "attention.layer_norm_epsilon", "general.size_label", "tokenizer.ggml.tokens",
                                   "tokenizer.ggml.token_type", "tokenizer.chat_template"}


def test_token_list_is_the_world_vocab(ours):
    from rwkvtune.tokenizer import WorldTokenizer

    kv, _ = read_gguf(ours("fp32"))
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 65536
    assert tokens[0] == "<s>" and types[0] == gguf.TokenType.CONTROL
    tok = WorldTokenizer()
    for i in range(1, 65530):  # escaped bytes, as llama.cpp's rwkv tokenizer unescapes them
        assert codecs.escape_decode(tokens[i].encode("utf-8"))[0] == tok.id_to_bytes(i), i
        assert types[i] == gguf.TokenType.NORMAL
    assert tokens[65530:] == [f"[PAD{i}]" for i in range(65530, 65536)]
    assert set(types[65530:]) == {gguf.TokenType.UNUSED}
    assert tokens[261] == "\\n\\n"  # "\n\n", the end-of-turn token, as a literal's escapes


# ---- (b) equal to llama.cpp's own converter -----------------------------------------------------------


@pytest.fixture(scope="module")
def converter():
    if not CONVERTER.is_file():
        pytest.skip(f"llama.cpp's converter not found at {CONVERTER}: {FETCH}")
    pytest.importorskip("transformers", reason="llama.cpp's converter imports transformers")
    return CONVERTER


@pytest.fixture(scope="module")
def hf_dir(converter, pth, tmp_path_factory):
    """Our Hugging Face export of the tiny model: what llama.cpp's converter reads."""
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    assert main(["export", pth, str(out)]) == 0
    return out


@pytest.mark.parametrize("save_dtype, ggml_type, file_type", SAVE_DTYPES)
def test_equal_to_llama_cpp_converter_output(converter, hf_dir, ours, tmp_path, save_dtype, ggml_type, file_type):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own gguf-py, not ours
    theirs = tmp_path / "theirs.gguf"
    res = subprocess.run([sys.executable, str(converter), str(hf_dir), "--outfile", str(theirs), "--outtype",
                          ggml_type.lower()], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    kv_t, t_t = (dict(x) for x in read_gguf(theirs))
    kv_o, t_o = (dict(x) for x in read_gguf(ours(save_dtype)))
    assert kv_t["general.name"] == "Tiny Hf" and kv_o["general.name"] == f"tiny-{save_dtype}"
    assert "Assistant:" in kv_t["tokenizer.chat_template"] and kv_o["tokenizer.chat_template"] == "rwkv-world"
    for k in NOT_COMPARED:
        kv_t.pop(k), kv_o.pop(k)
    assert list(kv_o) == list(kv_t)  # same keys, same order
    for k in kv_t:
        assert kv_o[k] == kv_t[k], k
    assert sorted(t_o) == sorted(t_t)
    for name, (qtype, shape, data) in t_t.items():
        assert t_o[name][:2] == (qtype, shape), name
        assert t_o[name][2].tobytes() == data.tobytes(), name  # bit for bit, q8_0 included


# ---- (c) llama.cpp continues a prompt with rwkvtune's greedy tokens ----------------------------------


@pytest.fixture(scope="module")
def node():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not found: llama.cpp runs here through node-llama-cpp (node >= 20)")
    if not (NODE_MODULES / "node-llama-cpp" / "package.json").is_file():
        pytest.skip(f"node-llama-cpp not found in {NODE_MODULES}: {FETCH}")
    return node


def _llama_cpp(node: str, model: Path, ids: list[int], n: int, text: str) -> dict:
    res = subprocess.run([node, str(REPO / "tests" / "clients" / "llamacpp_greedy.mjs"), str(NODE_MODULES), str(model),
                          ",".join(map(str, ids)), str(n), text], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """rwkvtune's greedy continuation, and the smallest top-1/top-2 logit gap along it."""
    ids, gap = list(ids), float("inf")
    with torch.no_grad():
        for _ in range(n):
            top = model(torch.tensor([ids]))[0, -1].topk(2)
            gap = min(gap, float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
    return ids[-n:], gap


def test_llama_cpp_continues_with_our_greedy_tokens(node, pth, ours):
    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.tokenizer import WorldTokenizer

    text = "He said \"it's\" \\ fine.\n\n\u4f60\u597d \U0001F642\tUser: x"
    prompt = WorldTokenizer().encode("The quick brown fox")
    want, gap = _greedy(RWKV7.from_checkpoint(pth), prompt, 8)
    got = _llama_cpp(node, ours("fp32"), prompt, 8, text)
    assert gap > 1e-3  # a clear argmax at every step: the tokens are a fair comparison
    assert got["tokens"] == want
    assert got["tokenized"] == WorldTokenizer().encode(text)  # the vocab, escapes included


# ---- (d) a LoRA run's merged output exports --------------------------------------------------------------


def test_lora_run_exports(tmp_path):
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.train.trainer import train

    small = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
    base = write_checkpoint(tmp_path / "base.pth", **small)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"alpha beta {i} gamma delta"}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    train(TrainConfig(model=base, data=str(data), out=str(run), ctx_len=16, batch_size=2, max_steps=2, lr=1e-2,
                      warmup_steps=0, save_every=0, tensorboard=False, save_dtype="fp32", mode="lora", lora_r=4))
    assert main(["export", str(run), str(tmp_path / "tuned.gguf"), "--save-dtype", "fp32"]) == 0  # the run's dir
    merged = torch.load(run / "final.pth", weights_only=True)
    check_tensors(tmp_path / "tuned.gguf", merged, 2, "F32")
    _, tensors = read_gguf(tmp_path / "tuned.gguf")
    base_sd = torch.load(base, weights_only=True)
    assert not torch.equal(values(tensors["blk.1.time_mix_key.weight"]), base_sd["blocks.1.att.key.weight"])


# ---- (e) bad input: one line, nothing half written ---------------------------------------------------


def _error(capsys, argv) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_bad_format_and_dtype_are_one_line(pth, tmp_path, capsys):
    out = str(tmp_path / "m.gguf")
    assert "invalid choice: 'onnx'" in _error(capsys, ["export", pth, out, "--format", "onnx"])
    assert "invalid choice: 'int4'" in _error(capsys, ["export", pth, out, "--save-dtype", "int4"])
    assert "is for --format gguf" in _error(capsys, ["export", pth, str(tmp_path / "hf"), "--save-dtype", "q8_0"])
    assert "--max-shard-size applies to --format hf" in _error(capsys, ["export", pth, out, "--max-shard-size", "1GB"])
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_bad_dtypes_and_small_vocab(pth, tmp_path):
    with pytest.raises(ConfigError, match="save dtype 'int4' is not one GGUF export writes"):
        ge.export_gguf(pth, tmp_path / "a.gguf", save_dtype="int4")
    torch.save(make_state_dict(**DIMS, dtype=torch.float64), tmp_path / "f64.pth")
    with pytest.raises(ConfigError, match="float64, which GGUF export does not keep.*--save-dtype fp32"):
        ge.export_gguf(tmp_path / "f64.pth", tmp_path / "b.gguf")
    write_checkpoint(tmp_path / "v256.pth", n_layer=1, n_embd=64, head_size=64, vocab=256)
    with pytest.raises(ConfigError, match="vocab_size 256.*needs vocab_size >= 65530"):
        ge.export_gguf(tmp_path / "v256.pth", tmp_path / "c.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f64.pth", "v256.pth"]


def test_fp16_overflow_refused_and_nothing_written(tmp_path):
    sd = make_state_dict(**DIMS)
    sd["blocks.1.ffn.value.weight"][3, 5] = 1e5  # finite, beyond float16
    torch.save(sd, tmp_path / "big.pth")
    with pytest.raises(ConfigError, match=r"blocks.1.ffn.value.weight \(GGUF blk.1.channel_mix_value.weight\) has values up to 1e\+05, beyond float16"):
        ge.export_gguf(tmp_path / "big.pth", tmp_path / "m.gguf", save_dtype="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pth"]
    ge.export_gguf(tmp_path / "big.pth", tmp_path / "m.gguf", save_dtype="bf16")  # what the error advises


def test_non_finite_source_refused_and_nothing_written(tmp_path):
    sd = make_state_dict(**DIMS)
    sd["blocks.1.att.key.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"nan.pth: tensor blocks.1.att.key.weight holds 1 non-finite value"):
        ge.export_gguf(tmp_path / "nan.pth", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]


def test_existing_output_never_overwritten(pth, tmp_path, capsys):
    (tmp_path / "m.gguf").write_text("mine")
    line = _error(capsys, ["export", pth, str(tmp_path / "m.gguf")])
    assert "already exists" in line and str(tmp_path / "m.gguf") in line
    assert (tmp_path / "m.gguf").read_text() == "mine"


def test_disk_full_mid_write_leaves_nothing(pth, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def full_at_20th_tensor(self, tensor, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_at_20th_tensor)
    with pytest.raises(OutputError) as e:
        ge.export_gguf(pth, tmp_path / "m.gguf", save_dtype="bf16")
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "it needs about 18" in msg, msg
    assert list(tmp_path.iterdir()) == []  # no file, no temporary one


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics checked on Linux only")
def test_file_size_limit_real_write_failure_cli(pth, tmp_path):
    """A real failed write (the kernel refuses past RLIMIT_FSIZE: EFBIG), through the CLI."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # 4 MB: the file needs ~36 MB (bf16)

    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "export", pth, str(out / "m.gguf"), "--save-dtype", "bf16"],
                         capture_output=True, text=True, timeout=300, preexec_fn=limit)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "m.gguf: cannot write: " in lines[0] and "file-size limit" in lines[0], lines[0]
    assert list(out.iterdir()) == []


def test_missing_gguf_package_is_one_line(pth, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(ConfigError, match=r"needs the 'gguf' package.*pip install 'rwkvtune\[gguf\]'"):
        ge.export_gguf(pth, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
