"""GGUF export for llama.cpp (and what runs on it: ollama, LM Studio, node-llama-cpp).

One ``.gguf`` file, written with the ``gguf`` package (PyPI, kept by llama.cpp; an optional
dependency: ``pip install 'rwkvtune[gguf]'``), holding what llama.cpp's own converter
(``convert_hf_to_gguf.py``, class ``Rwkv7Model``) writes for an RWKV-7 model: the same tensor
names, shapes, storage types, metadata keys and World tokenizer. tests/test_gguf.py checks this
tensor for tensor against the converter run on our Hugging Face export of the same model, and
runs the file in llama.cpp (node-llama-cpp) for the same greedy tokens as rwkvtune.

Tensors (``i`` = layer, C = n_embd, D = a low-rank dim, F = dim_ffn, H x N = heads x head size;
shapes row-major as numpy and the ``gguf`` reader give them, llama.cpp lists them reversed;
"f32" = always float32, the rest in the chosen type, as the converter decides):

| official (.pth) | GGUF | transform |
|---|---|---|
| emb.weight [V, C] | token_embd.weight [V, C] | same |
| blocks.0.ln0.weight / .bias | token_embd_norm.weight / .bias [C] | f32 |
| blocks.i.ln1 / ln2 .weight / .bias | blk.i.attn_norm / attn_norm_2 .weight / .bias [C] | f32 |
| blocks.i.att.x_r, x_w, x_k, x_v, x_a, x_g [1, 1, C] | blk.i.time_mix_lerp_fused.weight [6, 1, 1, C] | stacked in that order, f32 |
| blocks.i.att.w0 / a0 / v0 [1, 1, C] | blk.i.time_mix_w0 / a0 / v0 .weight [C] | flattened, f32 |
| blocks.i.att.w1 [C, D], w2 [D, C] | blk.i.time_mix_w1 [D, C], w2 [C, D] | transposed, f32 |
| blocks.i.att.a1 / v1 / g1 [C, D] | blk.i.time_mix_a1 / v1 / g1 .weight [D, C] | transposed |
| blocks.i.att.a2 / v2 / g2 [D, C] | blk.i.time_mix_a2 / v2 / g2 .weight [C, D] | transposed |
| blocks.i.att.k_k, k_a [1, 1, C] | blk.i.time_mix_k_k / k_a .weight [C] | flattened, f32 |
| blocks.i.att.r_k [H, N] | blk.i.time_mix_r_k.weight [H * N] | flattened, f32 |
| blocks.i.att.receptance / key / value / output .weight | blk.i.time_mix_receptance / key / value / output .weight | same |
| blocks.i.att.ln_x.weight / .bias | blk.i.time_mix_ln.weight / .bias [C] | f32 |
| blocks.i.ffn.x_k [1, 1, C] | blk.i.channel_mix_lerp_k.weight [C] | flattened, f32 |
| blocks.i.ffn.key / value .weight | blk.i.channel_mix_key / value .weight | same |
| ln_out.weight / .bias | output_norm.weight / .bias [C] | f32 |
| head.weight [V, C] | output.weight [V, C] | same |

* Layer 0's value-residual tensors are never used, but llama.cpp loads them with the shapes of
  the a-tensors: like the converter, ``blk.0.time_mix_v0/v1/v2`` are copies of layer 0's
  ``a0/a1/a2`` (the source's own ``blocks.0.att.v*``, when present, are not written).
* q8_0 quantizes the 2-D tensors in the "same"/"transposed" rows above with the ``gguf``
  package's quantizer (blocks of 32 along a row); a tensor whose rows are not a multiple of 32
  long is written as float16, as the converter does.
* Metadata: ``rwkv7.*`` hyperparameters (context length 1048576: RWKV has no limit; layer-norm
  eps 1e-5; head count 0, which llama.cpp requires and does not use), ``general.file_type``,
  ``general.size_label`` from the parameter count, ``general.name`` from the output file name,
  and the World tokenizer: ``tokenizer.ggml.model`` "rwkv", 65530 tokens (id 0 ``<s>``, a control
  token; ids 1..65529 from the World vocab as Python bytes-literal escapes, e.g. ``\\x00``; ids past
  the vocab, if the model has more rows, ``[PADi]`` unused), bos = eos = padding = 0, eot = 261
  ("\\n\\n", where llama.cpp ends a chat turn) and the chat template by its llama.cpp name,
  ``rwkv-world`` (llama.cpp's built-in "User: ...\\n\\nAssistant:" format; the converter writes the
  same name when its template file is absent. We do not ship llama.cpp's Jinja file itself).

The file is streamed: the header and tensor table first, then one tensor at a time (read,
transformed, converted, written), so memory stays near the largest tensor. It is written to a
temporary name next to OUT and renamed when complete and its header has been read back and
checked: a failure (disk full, Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rwkvtune.configs.model_loader import ModelConfig
from rwkvtune.convert.hf import _check_source, open_model_source
from rwkvtune.errors import CheckpointError, ConfigError, OutputError
from rwkvtune.tensor_checks import check_tensor
from rwkvtune.tokenizer import _default_vocab_file, _parse_vocab
from rwkvtune.utils import _atomic_write
import struct

ARCH = "rwkv7"
CONTEXT_LENGTH = 1 << 20  # RWKV is not context limited; the converter writes 1048576
LAYER_NORM_EPS = 1e-5  # ln0/ln1/ln2/ln_out (ln_x's 64e-5 is built into llama.cpp's RWKV-7 graph)
EOT_TOKEN_ID = 261  # "\n\n": the converter marks it as end of turn, so chats stop there
CHAT_TEMPLATE = "rwkv-world"  # a name llama.cpp resolves to its built-in RWKV World chat format
# --save-dtype -> GGML type name. "keep" takes the source's (float32 / float16 / bfloat16).
SAVE_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
_KEEP = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# fp8 is only a storage format (llama.cpp has no fp8 type): "keep" writes it as bf16, which holds
# every fp8 value exactly.
_KEEP.update({d: "BF16" for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2")) if d})
_FILE_TYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}
_F16_MAX = 65504.0


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ConfigError("GGUF export needs the 'gguf' package (llama.cpp's GGUF library), which is not installed: "
                          "pip install 'rwkvtune[gguf]' (or pip install gguf)") from e
    return gguf


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its name, the official keys it is made of, how, and its shape."""

    name: str
    keys: tuple[str, ...]
    make: Callable[..., torch.Tensor]  # official tensors -> the GGUF tensor (row-major shape)
    shape: tuple[int, ...]
    always_f32: bool  # norms, vectors, w1/w2 and the token-shift mixes: the converter keeps them f32


def _same(t):
    return t


def _flat(t):
    return t.reshape(-1)


def _transposed(t):
    return t.t()


def _lerp_fused(*xs):
    return torch.stack([x.reshape(1, 1, -1) for x in xs])


def tensor_plan(config: ModelConfig) -> list[GGUFTensor]:
    """Every GGUF tensor of a model with ``config``, in file order (see the module's table)."""
    c = config
    C, V, F, HN = c.n_embd, c.vocab_size, int(c.dim_ffn), c.n_embd
    lora = {"w": c.dim_att_lora, "a": c.dim_aaa_lora, "v": c.dim_mv_lora, "g": c.dim_gate_lora}
    plan: list[GGUFTensor] = []

    def add(name, keys, make, shape, f32=False):
        plan.append(GGUFTensor(name, tuple(keys), make, tuple(shape), f32))

    add("token_embd.weight", ["emb.weight"], _same, (V, C))
    for p in ("weight", "bias"):
        add(f"token_embd_norm.{p}", [f"blocks.0.ln0.{p}"], _same, (C,), True)
    for i in range(c.n_layer):
        b, a = f"blk.{i}.", f"blocks.{i}.att."
        for ours, theirs in (("ln1", "attn_norm"), ("ln2", "attn_norm_2")):
            for p in ("weight", "bias"):
                add(f"{b}{theirs}.{p}", [f"blocks.{i}.{ours}.{p}"], _same, (C,), True)
        add(f"{b}time_mix_lerp_fused.weight", [a + x for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")],
            _lerp_fused, (6, 1, 1, C), True)
        for letter in "wavg":
            # llama.cpp reads layer 0's (unused) v-tensors with the a-tensors' shapes: the converter
            # writes copies of a0/a1/a2 there, and so do we.
            src = "a" if (letter == "v" and i == 0) else letter
            d = lora[src]
            if letter != "g":
                add(f"{b}time_mix_{letter}0.weight", [f"{a}{src}0"], _flat, (C,), True)
            add(f"{b}time_mix_{letter}1.weight", [f"{a}{src}1"], _transposed, (d, C), letter == "w")
            add(f"{b}time_mix_{letter}2.weight", [f"{a}{src}2"], _transposed, (C, d), letter == "w")
        for x in ("k_k", "k_a"):
            add(f"{b}time_mix_{x}.weight", [a + x], _flat, (C,), True)
        add(f"{b}time_mix_r_k.weight", [a + "r_k"], _flat, (HN,), True)
        for name in ("receptance", "key", "value", "output"):
            add(f"{b}time_mix_{name}.weight", [f"{a}{name}.weight"], _same, (C, C))
        for p in ("weight", "bias"):
            add(f"{b}time_mix_ln.{p}", [f"{a}ln_x.{p}"], _same, (C,), True)
        add(f"{b}channel_mix_lerp_k.weight", [f"blocks.{i}.ffn.x_k"], _flat, (C,), True)
        add(f"{b}channel_mix_key.weight", [f"blocks.{i}.ffn.key.weight"], _same, (F, C))
        add(f"{b}channel_mix_value.weight", [f"blocks.{i}.ffn.value.weight"], _same, (C, F))
    for p in ("weight", "bias"):
        add(f"output_norm.{p}", [f"ln_out.{p}"], _same, (C,), True)
    add("output.weight", ["head.weight"], _same, (V, C))
    return plan


def storage_type(t: GGUFTensor, file_type: str) -> str:
    """The GGML type name ``t`` is stored in within a file of ``file_type`` (F32/F16/BF16/Q8_0):
    f32 where the converter keeps it so; q8_0 only for rows a multiple of 32 long (else F16)."""
    if t.always_f32 or file_type == "F32":
        return "F32"
    if file_type == "Q8_0" and t.shape[-1] % 32:
        return "F16"
    return file_type


# ---- the World tokenizer, as llama.cpp's "rwkv" vocab ----------------------------------------------

def world_vocab(vocab_size: int, source) -> tuple[list[bytes], list[int]]:
    """(token texts, token types) for a model with ``vocab_size`` embedding rows.

    llama.cpp's rwkv tokenizer reads each token as the body of a Python bytes literal (it undoes
    the escapes), id 0 being ``<s>``. A model with fewer rows than the vocab cannot hold it."""
    gguf = _import_gguf()
    world = _world_tokens()
    n = len(world)
    if vocab_size < n:
        raise ConfigError(f"{source}: the model has vocab_size {vocab_size}, but a GGUF file carries the RWKV World "
                          f"tokenizer ({n} tokens), which needs vocab_size >= {n}; export a model with the World "
                          f"vocabulary (every released RWKV-7 model has 65536 rows)")
    tokens = list(world)
    types = [int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.NORMAL)] * (n - 1)
    tokens += [f"[PAD{i}]".encode("utf-8") for i in range(n, vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
    return tokens, types


@functools.lru_cache(maxsize=1)
def _world_tokens() -> tuple[bytes, ...]:
    """``<s>`` and the World vocab's ids 1..65529, each as the body of its Python bytes literal."""
    table = _parse_vocab(_default_vocab_file())
    n = max(i for i, tok in enumerate(table) if tok) + 1  # 65530: id 0 plus the vocab's 1..65529
    return (b"<s>",) + tuple(repr(tok)[2:-1].encode("utf-8") for tok in table[1:n])


def chat_template() -> str:
    return CHAT_TEMPLATE


# ---- writing -----------------------------------------------------------------------------------------

def file_type_of(save_dtype: str | None, source) -> str:
    """The file's GGML type name for ``--save-dtype`` (None/"keep": the source's main dtype)."""
    if save_dtype not in (None, "keep"):
        if save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save dtype {save_dtype!r} is not one GGUF export writes: expected one of "
                              f"{', '.join(SAVE_DTYPES)} or keep")
        return SAVE_DTYPES[save_dtype]
    dtype = source.dtypes.get("emb.weight")
    if dtype not in _KEEP:
        raise ConfigError(f"{source.path}: weights are {str(dtype).replace('torch.', '')}, which GGUF export does not "
                          f"keep as they are; choose --save-dtype fp32, fp16, bf16 or q8_0")
    return _KEEP[dtype]


def _to_numpy(name: str, t: torch.Tensor, qtype: str, source, gguf):
    """``t`` as the array the writer stores for ``qtype`` (F32/F16/BF16: the values; Q8_0: bytes)."""
    t = t.detach().to(torch.float32).contiguous()  # the converter also goes through float32
    if qtype == "F32":
        return t.numpy()
    if qtype == "F16":
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > _F16_MAX:
            raise ConfigError(f"{source}: tensor {name} has values up to {peak:.3g}, beyond float16's range "
                              f"(65504); export with --save-dtype bf16 or fp32")
        return t.to(torch.float16).numpy()
    if qtype == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)


def export_gguf(src: str | os.PathLike, out_path: str | os.PathLike, model_config: ModelConfig | None = None,
                save_dtype: str | None = None, name: str | None = None) -> Path:
    """Write ``src`` (official .pth/.safetensors or an HF folder) as the GGUF file ``out_path``.

    ``save_dtype``: fp32, fp16, bf16 or q8_0 (None/"keep": the source's dtype). ``model_config``
    (optional) must match the dims detected from ``src``. ``name``: general.name (default: the
    output file's name without .gguf). Refuses an existing ``out_path``. Returns its path."""
    gguf = _import_gguf()
    out = Path(out_path)
    if out.exists() or out.is_symlink():
        raise OutputError(f"{out}: already exists; choose a new file name or remove it (an export never overwrites "
                          f"files)")
    with open_model_source(src) as source:
        config = _check_source(source, model_config)
        file_type = file_type_of(save_dtype, source)
        plan = tensor_plan(config)
        missing = sorted({k for t in plan for k in t.keys if k not in source.shapes})
        if missing:
            raise CheckpointError(f"{source.path}: lacks {', '.join(missing[:5])}, which the GGUF layout needs; the "
                                  f"file is incomplete: export the full model")
        tokens, types = world_vocab(config.vocab_size, source.path)
        types_of = {t.name: storage_type(t, file_type) for t in plan}
        ggml = gguf.GGMLQuantizationType

        def nbytes(t: GGUFTensor) -> int:
            q = ggml[types_of[t.name]]
            block, size = gguf.GGML_QUANT_SIZES[q]
            n = 1
            for d in t.shape:
                n *= d
            return n // block * size

        def write(tmp: str) -> None:
            w = gguf.GGUFWriter(tmp, ARCH)
            try:
                _fill_header(w, gguf, config, plan, types_of, nbytes, file_type, name or _stem(out), tokens, types)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for t in plan:
                    parts = [_read(source, k) for k in t.keys]
                    what = f"{t.keys[0]}{'...' if len(t.keys) > 1 else ''} (GGUF {t.name})"
                    data = _to_numpy(what, t.make(*parts).reshape(t.shape), types_of[t.name], source.path, gguf)
                    del parts
                    try:
                        w.write_tensor_data(data)
                    except OSError as e:
                        if e.errno is not None:
                            raise
                        # numpy's tofile reports a short write without the errno ("N requested and M
                        # written"): said in the words of a failed write, with the space it needs.
                        raise RuntimeError(f"file write failed: {e}") from e
                w.flush()
            finally:
                w.close()
            verify_gguf(tmp, [(t.name, t.shape, types_of[t.name]) for t in plan], len(tokens))

        _atomic_write(out, write, needed=sum(nbytes(t) for t in plan) + sum(len(x) + 8 for x in tokens))
    return out


def _read(source, key: str) -> torch.Tensor:
    """One tensor of the source, refused (naming it) unless dense, floating point and finite: an
    export must not turn a damaged model into a clean-looking file."""
    t = source.read(key)
    check_tensor(key, t, source.path)
    return t


def _stem(out: Path) -> str:
    return out.name[: -len(".gguf")] if out.name.endswith(".gguf") else out.name


def _fill_header(w, gguf, config: ModelConfig, plan, types_of, nbytes, file_type, name, tokens, types) -> None:
    """Tensor table and metadata, in the converter's order."""
    ggml = gguf.GGMLQuantizationType
    for t in plan:
        q = ggml[types_of[t.name]]
        if q == ggml.Q8_0:  # the writer takes a quantized tensor's byte shape
            shape, dtype = gguf.quant_shape_to_byte_shape(t.shape, q), np.uint8
        else:
            shape, dtype = t.shape, {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[q.name]
        w.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes(t), raw_dtype=q)
    c = config
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_size_label(gguf.size_label(*w.get_total_parameter_count()))
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_wkv_head_size(c.head_size_a)
    w.add_decay_lora_rank(c.dim_att_lora)
    w.add_iclr_lora_rank(c.dim_aaa_lora)
    w.add_value_residual_mix_lora_rank(c.dim_mv_lora)
    w.add_gate_lora_rank(c.dim_gate_lora)
    w.add_feed_forward_length(int(c.dim_ffn))
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPE[file_type]])
    w.add_head_count(0)  # required by llama.cpp, unused for RWKV
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("rwkv")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_eot_token_id(EOT_TOKEN_ID)
    w.add_chat_template(chat_template())


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_HEADER_CAP = 64 << 20  # a header (metadata, token list, tensor table) is ~1 MB: read at most this


def read_gguf_header(path: str | os.PathLike) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """({key: value}, [(tensor name, row-major shape, GGML type id, offset)], data start) of a GGUF
    v3 file, parsed here from the format's spec (little-endian), apart from the ``gguf`` package
    that wrote it: a second reading of what the writer produced. ValueError if malformed."""

    with open(path, "rb") as f:
        buf = f.read(_HEADER_CAP)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("Q")
        if pos + n > len(buf):
            raise ValueError("a string runs past the header")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def value(vtype: int):
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, n = take("IQ")
            return [value(etype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown value type {vtype}")
        return take(_SCALARS[vtype])

    try:
        magic, version, n_tensors, n_kv = take("4sIQQ")
        if magic != b"GGUF" or version != 3:
            raise ValueError(f"magic {magic!r} version {version}, expected b'GGUF' version 3")
        kv = {}
        for _ in range(n_kv):
            key = string()
            kv[key] = value(take("I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("Q") for _ in range(take("I"))]
            qtype, offset = take("IQ")
            tensors.append((name, tuple(reversed(dims)), qtype, offset))
    except struct.error as e:
        raise ValueError(f"the header is cut short ({e})") from e
    align = kv.get("general.alignment", 32)
    return kv, tensors, (pos + align - 1) // align * align


def verify_gguf(path: str | os.PathLike, expect: list[tuple[str, tuple[int, ...], str]], n_tokens: int) -> None:
    """Read the written file's header back: every tensor there, in order, with its shape and
    type, its data laid out back to back (aligned) inside the file, and the token list complete."""
    gguf = _import_gguf()
    try:
        kv, tensors, data_start = read_gguf_header(path)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise OutputError(f"{path}: the written GGUF file does not read back ({e}); write it again (the disk may be "
                          f"failing)") from e
    problem = None
    if kv.get("general.architecture") != ARCH or len(kv.get("tokenizer.ggml.tokens", ())) != n_tokens:
        problem = "metadata incomplete"
    elif len(tensors) != len(expect):
        problem = f"{len(tensors)} tensors, expected {len(expect)}"
    offset = 0
    for (name, shape, qtype, at), (want_name, want_shape, want_type) in zip(tensors, expect):
        q = gguf.GGMLQuantizationType(qtype)
        if problem is None and ((name, shape, q.name) != (want_name, tuple(want_shape), want_type) or at != offset):
            problem = f"tensor {name} {list(shape)} {q.name} at {at}, expected {want_name} {list(want_shape)} " \
                      f"{want_type} at {offset}"
        block, size = gguf.GGML_QUANT_SIZES[q]
        n = 1
        for d in shape:
            n *= d
        offset += (n // block * size + 31) // 32 * 32
    if problem is None and data_start + offset > os.path.getsize(path):
        problem = f"{os.path.getsize(path)} bytes, expected {data_start + offset}"
    if problem:
        raise OutputError(f"{path}: the written GGUF file does not read back as written ({problem}); write it again "
                          f"(the disk may be failing)")
