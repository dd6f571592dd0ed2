"""``rwkvtune merge-lora BASE ADAPTER OUT``: the adapter merged into its base, official layout."""

from __future__ import annotations

import argparse
import os
import sys

from rwkvtune.cli.common import add_save_dtype
from rwkvtune.errors import ConfigError
from rwkvtune.io.checkpoint import save_state_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Merge ADAPTER into BASE in fp32 and write OUT in the official layout."
    p.add_argument("base", metavar="BASE", help="base model: registry name or .pth")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter.pth written by --mode lora")
    p.add_argument("out", metavar="OUT", help="merged official-layout .pth to write")
    add_save_dtype(p)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.peft.lora import load_adapter, merged_state_dict

    for name, path in (("BASE", args.base), ("ADAPTER", args.adapter)):
        if os.path.exists(args.out) and os.path.exists(path) and os.path.samefile(args.out, path):
            raise ConfigError(f"OUT {args.out} is the {name} file; merging must not overwrite its input: give "
                              f"another OUT path")
    if os.path.isdir(args.out):
        raise ConfigError(f"OUT {args.out}: is a directory; give a file path, e.g. {os.path.join(args.out, 'merged.pth')}")
    if os.path.exists(args.out) and not args.force:
        raise ConfigError(f"OUT {args.out}: already exists; pass --force to overwrite it, or give another OUT path")
    model = RWKV7.from_checkpoint(args.base)
    load_adapter(model, args.adapter)
    dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
    save_state_dict(merged_state_dict(model, dtype), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
