"""Options shared by several commands, defined once so that every command spells them alike.

* ``--device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``;
* ``--data-format`` and ``--on-data-error``: how data files are read (train, eval, data prepare);
* ``--save-dtype``: the storage dtype of a written model (train's final.pth, merge-lora's OUT).
"""

from __future__ import annotations

import argparse

DATA_FORMATS = ("auto", "text", "chat", "prompt_response", "alpaca", "sharegpt")
from rwkvtune.constants import SAVE_DTYPES
from rwkvtune.utils import check_device
from rwkvtune.errors import CheckpointError


def add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N "
                                                     "(default: auto)")


def add_base_quant(p: argparse.ArgumentParser) -> None:
    """--base-quant of generate and eval (train's is a TrainConfig field of the same name)."""
    p.add_argument("--base-quant", default="none", choices=["none", "int8", "nf4"],
                   help="store the model's big matrices as int8 (per-channel) or nf4 (QLoRA; CPU needs torchao, "
                        "CUDA bitsandbytes), quantized at load: less memory, int8 decodes faster on CPU (default: none)")


def resolve_device(device: str | None) -> str:
    """``auto`` -> cuda when available else cpu; then checked (one-line error if unusable)."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def add_data_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--data-format`` and ``--on-data-error``; ``defaults=False`` leaves them None (train: the
    recipe or the config's default decides)."""
    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto" if defaults else None,
                   help="record format of jsonl data (default: auto, detected per record)")
    p.add_argument("--on-data-error", choices=("raise", "skip"), default="raise" if defaults else None,
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
