"""``rwkvtune eval``: loss and perplexity of a model (optionally with an adapter or a tuned state)
on data, printed as one JSON object; with ``--tasks``/``--compare``, lm-eval benchmarks
(:mod:`rwkvtune.cli.eval_tasks`)."""

from __future__ import annotations

import argparse
import json
import math

from rwkvtune.bounds import check_flag
from rwkvtune.cli.common import add_base_quant, add_data_options, add_device, resolve_device
from rwkvtune.cli.eval_tasks import add_task_arguments, run_tasks
from rwkvtune.errors import ConfigError, RwkvtuneError
from rwkvtune.models.rwkv7.config import TRAIN_BOUNDS, TrainConfig
from rwkvtune.tokenizer import get_tokenizer


BAD_RECORD_ADVICE = "fix the record, or pass --on-data-error skip to skip bad records"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registry name, .pth checkpoint or a training run's directory (its final.pth, or "
                                   "its base with its adapter or state)")
    p.add_argument("--data", help=".jsonl or binidx prefix (loss and perplexity; or use --tasks)")
    p.add_argument("--state", help="state-tuning file to start from (rwkvtune train --mode state)")
    p.add_argument("--adapter", help="LoRA adapter file to apply (rwkvtune train --mode lora)")
    p.add_argument("--ctx-len", type=int, default=None,
                   help="window length in tokens (default: the model's ctx_len, as `rwkvtune inspect`/`models show` "
                        "report it; never taken from a config.yaml nearby, so scores of two models compare); "
                        "printed in the result")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default: 4); with --tasks, rows per forward (default: 32)")
    p.add_argument("--long-context", action="store_true", help="score whole samples in ctx-len chunks with state")
    add_data_options(p)
    add_device(p)
    add_base_quant(p)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (default: fp32)")

    add_task_arguments(p)


def run(args: argparse.Namespace) -> int:
    from rwkvtune.peft.loading import load_model
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
    model, wkv_init = load_model(args.model, args.adapter, args.state, device=device, flags=True,
                                 base_quant=args.base_quant)
    # The model's own ctx_len unless --ctx-len: the loss depends on the window length (a longer
    # window scores more tokens with more context), so it must not follow a config.yaml that happens
    # to sit beside a file; it is printed in the result.
    ctx_len = model.config.ctx_len if args.ctx_len is None else args.ctx_len
    cfg = TrainConfig(model=args.model, data=args.data, ctx_len=ctx_len, batch_size=args.batch_size,
                      long_context=args.long_context, data_format=args.data_format, on_data_error=args.on_data_error)
    method = SFT(cfg)
    dataset, _ = method.build_datasets(get_tokenizer(), model.config.vocab_size)
    ctx = StepContext(cfg=cfg, device=device, autocast=autocast_factory(device, args.precision))
    result = method.evaluate(TrainModule(model, wkv_init), dataset, ctx)
    if not math.isfinite(result["eval_loss"]):
        raise RwkvtuneError(f"eval loss is {result['eval_loss']} on {args.data}: the model overflows on this data "
                            f"(try --precision fp32, or check the model file)")
    print(json.dumps({**result, "ctx_len": ctx_len}))
    return 0
