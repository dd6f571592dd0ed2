"""``rwkvtune eval``: loss and perplexity of a model (optionally with an adapter or a tuned state)
on data, printed as one JSON object."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import yaml

from rwkvtune.cli.common import add_data_options, add_device, load_state, resolve_device
from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.tokenizer import get_tokenizer
from rwkvtune.train.run_dir import RunDir


BAD_RECORD_ADVICE = "fix the record, or pass --on-data-error skip to skip bad records"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name or .pth checkpoint")
    p.add_argument("--data", required=True, help=".jsonl or binidx prefix")
    p.add_argument("--state", help="state-tuning file to start from (rwkvtune train --mode state)")
    p.add_argument("--adapter", help="LoRA adapter file to apply (rwkvtune train --mode lora)")
    p.add_argument("--ctx-len", type=int, default=None,
                   help="window length (default: the training run's, from config.yaml beside --adapter, --state or "
                        "--model; else the model's recommended)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")
    p.add_argument("--long-context", action="store_true", help="score whole samples in ctx-len chunks with state")
    add_data_options(p)
    add_device(p)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (default: fp32)")


def _eval_ctx_len(args: argparse.Namespace, model) -> tuple[int, str]:
    """--ctx-len, else that of the run which wrote --adapter, --state or --model (the config.yaml
    beside it, in that order: an adapter or state was trained at its own run's ctx_len, not at that
    of the run which wrote the base), else the model's recommended_ctx_len; with where it came from."""
    if args.ctx_len is not None:
        return args.ctx_len, "--ctx-len"
    for path in (args.adapter, args.state, args.model):
        run_config = RunDir(os.path.dirname(os.path.abspath(path))).config if path and os.path.isfile(path) else None
        if run_config is None or not run_config.is_file():
            continue
        try:
            saved = yaml.safe_load(run_config.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # not a run's config after all: fall back to the model's
        ctx_len = saved.get("ctx_len") if isinstance(saved, dict) else None
        if isinstance(ctx_len, int) and not isinstance(ctx_len, bool) and ctx_len >= 1:
            return ctx_len, f"the run's {run_config}"
    return model.config.recommended_ctx_len, f"recommended_ctx_len of {model.config.model_name}"


def run(args: argparse.Namespace) -> int:
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.train.objective import TrainModule
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT
    from rwkvtune.train.runtime import autocast_factory

    for flag, value in (("--ctx-len", args.ctx_len), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: found {value}, expected an integer >= 1")
    device = resolve_device(args.device)
    model = RWKV7.from_checkpoint(args.model, device=device)
    if args.adapter:
        from rwkvtune.peft.lora import load_adapter

        load_adapter(model, args.adapter)
    wkv_init = None
    if args.state:
        wkv_init = load_state(args.state, model)
    ctx_len, origin = _eval_ctx_len(args, model)
    print(f"ctx_len {ctx_len} (from {origin})", file=sys.stderr)
    cfg = TrainConfig(model=args.model, data=args.data, ctx_len=ctx_len, batch_size=args.batch_size,
                      long_context=args.long_context, data_format=args.data_format, on_data_error=args.on_data_error)
    method = SFT(cfg)
    dataset, _ = method.build_datasets(get_tokenizer(), model.config.vocab_size)
    ctx = StepContext(cfg=cfg, device=device, autocast=autocast_factory(device, args.precision))
    result = method.evaluate(TrainModule(model, wkv_init), dataset, ctx)
    if not math.isfinite(result["eval_loss"]):
        raise RwkvtuneError(f"eval loss is {result['eval_loss']} on {args.data}: the model overflows on this data "
                            f"(try --precision fp32, or check the model file)")
    print(json.dumps(result))
    return 0
