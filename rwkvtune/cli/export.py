"""``rwkvtune export MODEL OUT_DIR``: a model in the Hugging Face (flash-linear-attention) RWKV-7
layout: config.json, model.safetensors (sharded past --max-shard-size, with the index file) and
the World vocab file. Tensors are converted one at a time, so memory stays near the largest one."""

from __future__ import annotations

import argparse
import os
import re
import sys

from rwkvtune.configs.model_loader import is_model_path, load_model_config
from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.hub import missing_model_hint
from rwkvtune.train.run_dir import RunDir

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write MODEL as a Hugging Face folder in the flash-linear-attention RWKV-7 layout (config.json, "
                     "model.safetensors, the World vocab), tensor by tensor with bounded memory.")
    p.add_argument("model", metavar="MODEL", help="registry name, .pth/.safetensors file, Hugging Face folder, or a "
                                                  "training run's directory (its final.pth)")
    p.add_argument("out", metavar="OUT_DIR", help="folder to write (must not exist, or be empty)")
    p.add_argument("--save-dtype", choices=("bf16", "fp32", "keep"), default="keep",
                   help="dtype of the written tensors; keep: the source's (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest model-*.safetensors shard, e.g. 2GB or 500MB (default: 5GB, as Hugging Face)")


def _bytes(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as Hugging Face's max_shard_size)."""
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1000000")
    unit = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def resolve_source(model: str):
    """(path of the model to read, the config it must fit or None) for a name, file, folder or run."""
    if os.path.isdir(model) and not is_model_path(model):
        for save_format in ("pth", "safetensors"):
            run = RunDir(model, save_format)
            if run.final.is_file():
                return str(run.final), None
        what = "a state-tuning run (it trains no model: use its state.pth with --state)" if run.state.is_file() else \
            "neither a model folder (config.json) nor a finished run (final.pth)"
        raise ConfigError(f"{model}: is {what}")
    if is_model_path(model):
        return model, None
    config = load_model_config(model)
    return config.model_path, config


def run(args: argparse.Namespace) -> int:
    import torch

    from rwkvtune.convert.hf import export_hf
    path, expect = resolve_source(args.model)
    if expect is not None and not os.path.exists(path):
        raise CheckpointError(f"model file not found: {missing_model_hint(expect)}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "keep": None}[args.save_dtype]
    out = export_hf(path, args.out, model_config=expect, max_shard_bytes=_bytes(args.max_shard_size), dtype=dtype)
    print(f"wrote {out} (Hugging Face RWKV-7 layout: config.json, safetensors, vocab)", file=sys.stderr)
    return 0
