"""``rwkvtune eval``: loss and perplexity of a model (optionally with an adapter or a tuned state)
on data, printed as one JSON object; with ``--tasks``/``--compare``, lm-eval benchmarks
(:mod:`rwkvtune.cli.eval_tasks`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


from rwkvtune.cli.common import add_data_options, add_device, load_state, resolve_device
from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.models.rwkv7.config import TRAIN_BOUNDS, TrainConfig
from rwkvtune.safe_yaml import read_yaml_file
from rwkvtune.tokenizer import get_tokenizer
from rwkvtune.train.run_dir import RunDir
from rwkvtune.cli.eval_tasks import add_task_arguments
from rwkvtune.bounds import check_flag
from rwkvtune.models.rwkv7.config import TRAIN_BOUNDS
from rwkvtune.cli.eval_tasks import run_tasks


BAD_RECORD_ADVICE = "fix the record, or pass --on-data-error skip to skip bad records"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registry name, .pth checkpoint or run directory")
    p.add_argument("--data", help=".jsonl or binidx prefix (loss and perplexity; or use --tasks)")
    p.add_argument("--state", help="state-tuning file to start from (rwkvtune train --mode state)")
    p.add_argument("--adapter", help="LoRA adapter file to apply (rwkvtune train --mode lora)")
    p.add_argument("--ctx-len", type=int, default=None,
                   help="window length (default: the training run's, from config.yaml beside --adapter, --state or "
                        "--model; else the model's recommended)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default: 4); with --tasks, rows per forward (default: 32)")
    p.add_argument("--long-context", action="store_true", help="score whole samples in ctx-len chunks with state")
    add_data_options(p)
    add_device(p)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (default: fp32)")

    add_task_arguments(p)


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
            saved = read_yaml_file(run_config, "run config", "")
        except RwkvtuneError:
            continue  # not a run's config after all: fall back to the model's
        ctx_len = saved.get("ctx_len") if isinstance(saved, dict) else None
        if TRAIN_BOUNDS["ctx_len"].accepts(ctx_len) and ctx_len is not None:
            return ctx_len, f"the run's {run_config}"
    return model.config.recommended_ctx_len, f"recommended_ctx_len of {model.config.model_name}"


def run(args: argparse.Namespace) -> int:
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.train.objective import TrainModule
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT
    from rwkvtune.train.runtime import autocast_factory

    if args.tasks or args.compare:

        return run_tasks(args)
    if not args.model or not args.data:
        raise ConfigError("rwkvtune eval needs --model MODEL and --data FILE (loss and perplexity), or --tasks "
                          "TASKS (benchmarks through lm-eval)")
    args.batch_size = 4 if args.batch_size is None else args.batch_size

    for name in ("ctx_len", "batch_size"):  # the bounds of the training options of these names
        check_flag("--" + name.replace("_", "-"), getattr(args, name), TRAIN_BOUNDS[name], ConfigError)
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
