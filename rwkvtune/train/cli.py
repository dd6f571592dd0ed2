"""Handlers of `rwkvtune train`, `rwkvtune eval` and `rwkvtune merge-lora`."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Flags of `rwkvtune train` that map 1:1 onto TrainConfig fields (dest == field name).
TRAIN_FLAGS = [
    ("--model", str, "registry name (0.1b), .pth checkpoint or .json config"),
    ("--data", str, "training data: .jsonl (text/chat/prompt-response) or binidx prefix"),
    ("--out", str, "output directory (default: out)"),
    ("--init", str, "pretrained (load the model file) or scratch (official init)"),
    ("--mode", str, "full, lora or state"),
    ("--ctx-len", int, "tokens per window (default: model's recommended)"),
    ("--batch-size", int, "micro-batch per process (default: model's recommended)"),
    ("--grad-accum", int, "micro-batches per optimizer step"),
    ("--lr", float, "peak learning rate (default: model's recommended)"),
    ("--lr-final", float, "final learning rate of the cosine (default: lr/10)"),
    ("--warmup-steps", int, "linear warmup steps"),
    ("--max-steps", int, "optimizer steps (default: --epochs over the data)"),
    ("--epochs", int, "passes over the data when --max-steps is not given"),
    ("--seed", int, "random seed (data order, init, dropout)"),
    ("--save-every", int, "steps between resumable checkpoints (0: end only)"),
    ("--eval-every", int, "steps between evaluations on --eval-data (0: end only)"),
    ("--eval-data", str, "evaluation data (same formats as --data)"),
    ("--device", str, "auto, cpu, cuda, cuda:1"),
    ("--precision", str, "fp32 or bf16 (default: fp32 on CPU, bf16 autocast on GPU)"),
    ("--data-format", str, "auto, text, chat or prompt_response"),
    ("--on-data-error", str, "raise (stop at a bad line) or skip (count and report)"),
    ("--save-dtype", str, "dtype of final.pth: bf16 or fp32"),
    ("--weight-decay", float, "AdamW weight decay on 2-D weight matrices"),
    ("--grad-clip", float, "max gradient norm (0 disables)"),
    ("--lora-r", int, "LoRA rank"),
    ("--lora-alpha", float, "LoRA alpha (scaling = alpha / r)"),
    ("--lora-dropout", float, "dropout on the LoRA input"),
    ("--lora-targets", str, "comma-separated Linear names to adapt (e.g. att.key,ffn.value)"),
    ("--train-parts", str, "LoRA mode: also train ln, emb and/or head (comma-separated)"),
    ("--bptt", str, "long samples: truncated (default) or full backprop through chunks"),
    ("--wandb", str, "log to this wandb project"),
]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    for flag, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of TrainConfig options (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute activations in backward")
    p.add_argument("--long-context", action="store_true", default=None,
                   help="keep samples whole; train long ones in ctx-len chunks carrying the state")
    p.add_argument("--dry-run", action="store_true", help="print the resolved setup and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any TrainConfig option, e.g. lr=1e-4")


def config_from_args(args: argparse.Namespace):
    from rwkvtune.models.rwkv7.config import TrainConfig, load_recipe, parse_overrides

    cfg = TrainConfig()
    if args.config:
        cfg.update(load_recipe(args.config), source=f"recipe {args.config}")
    given = {flag.lstrip("-").replace("-", "_") for flag, *_ in TRAIN_FLAGS} | {"resume", "grad_checkpoint",
                                                                               "long_context"}
    cfg.update({k: getattr(args, k) for k in given if getattr(args, k) is not None}, source="command line")
    cfg.update(parse_overrides(args.overrides), source="command line (key=value)")
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from rwkvtune.train.trainer import train

    cfg = config_from_args(args)
    try:
        result = train(cfg, dry_run=args.dry_run)
    except KeyboardInterrupt:
        from pathlib import Path

        out = Path(cfg.resume or cfg.out)
        if any((out / "checkpoints").glob("step-*.pt")):
            raise KeyboardInterrupt(f"the checkpoints in {out / 'checkpoints'} are kept; continue with: "
                                    f"rwkvtune train --resume {out}") from None
        raise KeyboardInterrupt("no checkpoint was saved yet, so there is nothing to resume; rerun the command "
                                "to start again") from None
    if _main_rank():
        print(json.dumps(result, indent=2))
    return 0


def _main_rank() -> bool:
    """Whether this process is rank 0 under torchrun (every rank returns the summary; one prints it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _eval_ctx_len(args: argparse.Namespace, model) -> tuple[int, str]:
    """--ctx-len, else that of the run which wrote --model (or --adapter/--state): the config.yaml
    beside it, else the model's recommended_ctx_len; with where it came from."""
    if args.ctx_len is not None:
        return args.ctx_len, "--ctx-len"
    import yaml
    from pathlib import Path

    for path in (args.model, args.adapter, args.state):
        run_config = Path(path).parent / "config.yaml" if path and os.path.isfile(path) else None
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


def run_eval(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.tokenizer import get_tokenizer
    from rwkvtune.train.data import build_dataset
    from rwkvtune.train.trainer import TrainModule, evaluate

    from rwkvtune.errors import ConfigError
    from rwkvtune.utils import check_device

    for flag, value in (("--ctx-len", args.ctx_len), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: found {value}, expected an integer >= 1")
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = RWKV7.from_checkpoint(args.model, device=device)
    if args.adapter:
        from rwkvtune.peft.lora import load_adapter

        load_adapter(model, args.adapter)
    wkv_init = None
    if args.state:
        from rwkvtune.peft.state import load_state_file

        wkv_init = load_state_file(args.state, model)
    ctx_len, origin = _eval_ctx_len(args, model)
    print(f"ctx_len {ctx_len} (from {origin})", file=sys.stderr)
    cfg = TrainConfig(model=args.model, data=args.data, ctx_len=ctx_len, batch_size=args.batch_size,
                      long_context=args.long_context, data_format=args.data_format)
    dataset = build_dataset(args.data, get_tokenizer(), cfg, model.config.vocab_size)
    module = TrainModule(model, wkv_init)
    bf16 = args.precision == "bf16"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def autocast():
        return torch.autocast(dev_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    result = evaluate(module, dataset, cfg, device, autocast)
    print(json.dumps(result))
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name or .pth checkpoint")
    p.add_argument("--data", required=True, help=".jsonl or binidx prefix")
    p.add_argument("--state", help="state-tuning file to start from (rwkvtune train --mode state)")
    p.add_argument("--adapter", help="LoRA adapter file to apply (rwkvtune train --mode lora)")
    p.add_argument("--ctx-len", type=int, default=None,
                   help="window length (default: the training run's, from config.yaml beside --model, "
                        "--adapter or --state; else the model's recommended)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--long-context", action="store_true", help="score whole samples in ctx-len chunks with state")
    p.add_argument("--data-format", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE", help="base model: registry name or .pth")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter.pth written by --mode lora")
    p.add_argument("out", metavar="OUT", help="merged official-layout .pth to write")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="storage dtype of OUT")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def run_merge(args: argparse.Namespace) -> int:
    import torch

    from rwkvtune.errors import ConfigError
    from rwkvtune.models.rwkv7 import RWKV7
    from rwkvtune.peft.lora import load_adapter, merged_state_dict
    from rwkvtune.utils import atomic_torch_save

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
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    atomic_torch_save(merged_state_dict(model, dtype), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
