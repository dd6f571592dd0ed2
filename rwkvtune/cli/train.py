"""``rwkvtune train``: flags onto TrainConfig fields, recipes, overrides, the run."""

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
    ("--precision", str, "fp32 or bf16 (default: fp32 on CPU, bf16 autocast on GPU)"),
    ("--weight-decay", float, "AdamW weight decay on 2-D weight matrices"),
    ("--grad-clip", float, "max gradient norm (0 disables)"),
    ("--lora-r", int, "LoRA rank"),
    ("--lora-alpha", float, "LoRA alpha (scaling = alpha / r)"),
    ("--lora-dropout", float, "dropout on the LoRA input"),
    ("--lora-targets", str, "comma-separated Linear names to adapt (e.g. att.key,ffn.value)"),
    ("--train-parts", str, "LoRA mode: also train ln, emb and/or head (comma-separated)"),
    ("--bptt", str, "long samples: truncated (default) or full backprop through chunks"),
    ("--strategy", str, "under torchrun: ddp (whole model per process) or fsdp (sharded)"),
    ("--wandb", str, "log to this wandb project"),
]


# Flags shared with other commands (rwkvtune.cli.common), also TrainConfig fields.
SHARED_FLAGS = ("device", "data_format", "on_data_error", "save_dtype")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from rwkvtune.cli.common import add_data_options, add_device, add_save_dtype

    for flag, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=help_)
    # default None: a recipe's value stands unless the flag is given
    add_device(p, default=None)
    add_data_options(p, defaults=False)
    add_save_dtype(p, default=None)
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of TrainConfig options (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute activations in backward")
    p.add_argument("--long-context", action="store_true", default=None,
                   help="keep samples whole; train long ones in ctx-len chunks carrying the state")
    p.add_argument("--cpu-offload", action="store_true", default=None,
                   help="fsdp on GPU: keep sharded parameters, gradients and optimizer state in host memory")
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false", default=None,
                   help="run even when the memory estimate exceeds the device's memory (recipe: memory_check: false)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved setup and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any TrainConfig option, e.g. lr=1e-4")


def config_from_args(args: argparse.Namespace):
    from rwkvtune.models.rwkv7.config import TrainConfig, load_recipe, parse_overrides

    cfg = TrainConfig()
    if args.config:
        cfg.update(load_recipe(args.config), source=f"recipe {args.config}")
    given = {flag.lstrip("-").replace("-", "_") for flag, *_ in TRAIN_FLAGS} | set(SHARED_FLAGS) | {
        "resume", "grad_checkpoint", "long_context", "memory_check", "cpu_offload"}
    cfg.update({k: getattr(args, k) for k in given if getattr(args, k) is not None}, source="command line")
    cfg.update(parse_overrides(args.overrides), source="command line (key=value)")
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from rwkvtune.train import trainer
    from rwkvtune.train.run_dir import RunDir

    cfg = config_from_args(args)
    try:
        result = trainer.train(cfg, dry_run=args.dry_run)
    except KeyboardInterrupt:
        run = RunDir(cfg.resume or cfg.out)
        if run.checkpoint_files():
            raise KeyboardInterrupt(f"the checkpoints in {run.checkpoints} are kept; continue with: "
                                    f"rwkvtune train --resume {run.path}") from None
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
