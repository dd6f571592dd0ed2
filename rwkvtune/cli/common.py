"""Options shared by several commands, defined once so that every command spells them alike.

* the model a command loads (:func:`add_model_arguments`): ``--model``, ``--adapter``, ``--state``,
  ``--precision`` and ``--device``, the same for ``generate`` and ``eval``;
* ``--device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``;
* ``--data-format`` and ``--on-data-error``: how data files are read (train, eval, data prepare);
* ``--save-dtype``: the storage dtype of a written model (train's final.pth, merge-lora's OUT).
"""

from __future__ import annotations

import argparse

DATA_FORMATS = ("auto", "text", "chat", "prompt_response", "alpaca", "sharegpt")
from rwkvtune.constants import BASE_QUANTS, SAVE_DTYPES
from rwkvtune.utils import check_device
from rwkvtune.errors import CheckpointError


def add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N "
                                                     "(default: auto)")


PRECISIONS = ("fp32", "bf16")
MODEL_HELP = ("registry name (e.g. 0.1b; see `rwkvtune models`), a .pth/.safetensors checkpoint, a Hugging Face "
              "RWKV-7 folder or a training run's directory (its final.pth, or its base with its adapter or state)")


def add_model_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The model a command loads and what tunes it: one set of flags for every command that loads
    a model to run it (generate, eval), read back by :func:`load_model_from_args`. A flag added
    here is one line, and every such command has it."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help=MODEL_HELP)
    g.add_argument("--adapter", metavar="FILE|RUN", help="a LoRA adapter to apply: adapter.pth (or .safetensors) "
                                                         "from `rwkvtune train --mode lora`, or that run's directory")
    g.add_argument("--state", metavar="FILE|RUN", help="a tuned initial state: state.pth (or .safetensors) from "
                                                       "`rwkvtune train --mode state`, that run's directory, or a "
                                                       "state in RWKV-PEFT's layout")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16 compute (default: fp32; the WKV state stays fp32)")
    g.add_argument("--base-quant", default="none", choices=BASE_QUANTS,
                   help="store the model's big matrices as int8 (per-channel) or nf4 (QLoRA; CPU needs torchao, "
                        "CUDA bitsandbytes), quantized at load: less memory; on CPU int8 also decodes faster, while nf4 "
                        "dequantizes every matrix per token (over 10x slower than int8) (default: none)")
    add_device(g)


def load_model_from_args(args: argparse.Namespace, dtype=None):
    """(model in eval mode, tuned initial WKV state or None) as :func:`add_model_arguments`'s flags
    name them, on the flags' device; ``dtype``: of the weights (default fp32). Errors name the flag."""
    import torch

    from rwkvtune.peft.loading import load_model  # torch: not at the CLI's startup

    return load_model(args.model, args.adapter, args.state, device=resolve_device(args.device),
                      dtype=dtype or torch.float32, flags=True, base_quant=getattr(args, "base_quant", "none"))


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda when available else cpu; then checked (one-line error if unusable)."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def add_data_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--data-format`` and ``--on-data-error``; ``defaults=False`` leaves them None (train: the
    recipe or the config's default decides)."""
    add_data_format(p, "auto" if defaults else None)
    add_on_data_error(p, "raise" if defaults else None)


def add_data_format(p, default: str | None = "auto") -> None:
    p.add_argument("--data-format", choices=DATA_FORMATS, default=default,
                   help="record format of jsonl data (default: auto, detected per record)")


def add_on_data_error(p, default: str | None = "raise") -> None:
    p.add_argument("--on-data-error", choices=("raise", "skip"), default=default,
                   help="raise: stop at the first bad record; skip: skip, count and report bad records "
                        "(default: raise)")


def add_save_dtype(p: argparse.ArgumentParser, default: str | None = "bf16") -> None:
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default=default,
                   help="storage dtype of the written model: bf16 (like released files) or fp32 (default: bf16)")


def load_state(path: str, model):
    """``--state PATH`` through the one state reader (:func:`rwkvtune.peft.state.load_state_file`),
    its errors naming the flag."""
    from rwkvtune.peft.state import load_state_file

    try:
        return load_state_file(path, model)
    except CheckpointError as e:
        raise CheckpointError(f"--state {e}") from e
