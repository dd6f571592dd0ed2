"""``rwkvtune export MODEL OUT``: a model in the Hugging Face (flash-linear-attention) RWKV-7
layout: config.json, model.safetensors (sharded past --max-shard-size, with the index file) and
the World vocab file; or, with ``--format gguf``, one GGUF file for llama.cpp (see
rwkvtune.convert.gguf_export). Tensors are converted one at a time, so memory stays near the
largest one."""

from __future__ import annotations

import argparse
import os
import re
import sys

from rwkvtune.bounds import clip
from rwkvtune.configs.model_loader import is_model_path, load_model_config
from rwkvtune.configs.run_source import run_weights
from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.hub import missing_model_hint

FORMATS = ("hf", "gguf")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE | re.ASCII)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write MODEL as a Hugging Face folder in the flash-linear-attention RWKV-7 layout (config.json, "
                     "model.safetensors, the World vocab), or with --format gguf as one GGUF file for llama.cpp "
                     "(ollama, LM Studio), tensor by tensor with bounded memory.")
    p.add_argument("model", metavar="MODEL", help="registry name, .pth/.safetensors file, Hugging Face folder, or a "
                                                  "training run's directory (its final.pth)")
    p.add_argument("out", metavar="OUT", help="folder to write (must not exist, or be empty); with --format gguf, "
                                              "the .gguf file to write (must not exist)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="hf: Hugging Face folder; gguf: one llama.cpp GGUF file (needs the gguf package: pip install "
                        "'rwkvtune[gguf]') (default: gguf when OUT ends in .gguf, else hf)")
    p.add_argument("--save-dtype", choices=("bf16", "fp32", "fp16", "q8_0", "keep"), default="keep",
                   help="dtype of the written tensors; fp16 and q8_0 (8-bit blocks) for --format gguf only; keep: the "
                        "source's (default: keep)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="largest model-*.safetensors shard, e.g. 2GB or 500MB (default: 5GB, as Hugging Face); "
                        "--format hf only")


def _bytes(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as Hugging Face's max_shard_size)."""
    m = _SIZE.match(text)
    unit = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}[m.group(2).upper()] if m else 0
    size = float(m.group(1)) * unit if m else 0.0  # inf for 400 digits: refused below
    if not 1 <= size <= 10 ** 15:
        raise ConfigError(f"--max-shard-size {clip(text)!r}: expected a size from 1 byte to 1000TB, such as 5GB, "
                          f"500MB or 1000000")
    return int(size)


def resolve_source(model: str):
    """(path of the model to read, the config it must fit or None) for a name, file, folder or run."""
    final = run_weights(model, ConfigError, "export writes model weights only: export the base model, and use "
                                            "the run directory itself as --model with generate and eval")
    if final is not None:
        return final, None
    if is_model_path(model):
        return model, None
    config = load_model_config(model)
    return config.model_path, config


def run(args: argparse.Namespace) -> int:
    import torch

    from rwkvtune.convert.hf import export_hf
    # a bad flag fails before anything is read
    max_shard_bytes = _bytes(args.max_shard_size or "5GB")
    path, expect = resolve_source(args.model)
    if expect is not None and not os.path.exists(path):
        raise CheckpointError(f"model file not found: {missing_model_hint(expect)}")
    fmt = args.format or ("gguf" if args.out.endswith(".gguf") else "hf")
    if fmt == "gguf":
        if args.max_shard_size is not None:
            raise ConfigError("--max-shard-size applies to --format hf; a GGUF export is one file: drop the option")
        from rwkvtune.convert.gguf_export import export_gguf

        out = export_gguf(path, args.out, model_config=expect, save_dtype=args.save_dtype)
        print(f"wrote {out} (GGUF for llama.cpp; run it with: llama-cli -m {out})", file=sys.stderr)
        return 0
    if args.save_dtype in ("fp16", "q8_0"):
        raise ConfigError(f"--save-dtype {args.save_dtype} is for --format gguf; a Hugging Face export writes bf16, "
                          f"fp32 or keep")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "keep": None}[args.save_dtype]
    out = export_hf(path, args.out, model_config=expect, max_shard_bytes=max_shard_bytes, dtype=dtype)
    print(f"wrote {out} (Hugging Face RWKV-7 layout: config.json, safetensors, vocab)", file=sys.stderr)
    return 0
