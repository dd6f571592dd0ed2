"""``rwkvtune train``: flags onto TrainConfig fields, recipes, overrides, the run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from rwkvtune.bounds import THREADS_PER_CORE
from rwkvtune.cli.common import add_data_options, add_device, add_save_dtype
from rwkvtune.constants import MODE_DEFAULT_LR, SCRATCH_LR
from rwkvtune.errors import RwkvtuneError
from rwkvtune.models.rwkv7.config import TrainConfig, load_recipe, option_docs, parse_overrides
from rwkvtune.models.rwkv7.method_config import METHOD_SECTIONS
from rwkvtune.safe_yaml import read_yaml_file
from rwkvtune.train.run_dir import RunDir
from rwkvtune.train.signals import interrupted_message
from rwkvtune.train.memory import dry_run_text

def _e(lr: float) -> str:
    """A learning rate as people write it: 1e-4, 6e-4."""
    return f"{lr:.0e}".replace("e-0", "e-")


# Flags of `rwkvtune train` that map 1:1 onto TrainConfig fields (dest == field name).
TRAIN_FLAGS = [
    ("--model", str, "registry name (0.1b), .pth checkpoint or .json config"),
    ("--data", str, "training data: .jsonl (text/chat/prompt-response) or binidx prefix"),
    ("--out", str, "run directory (default: a new runs/<model>-<mode>-<method>-<YYYYmmdd-HHMMSS>, said at the "
                   "start); must be new, empty, or a run of this tool (it holds rwkvtune-run.json): any other "
                   "directory is refused, never overwritten"),
    ("--init", str, "pretrained (load the model file) or scratch (official init)"),
    ("--mode", str, "full, lora or state"),
    ("--ctx-len", int, "tokens per window (default: model's recommended)"),
    ("--batch-size", int, "micro-batch per process (default: model's recommended)"),
    ("--grad-accum", int, "micro-batches per optimizer step"),
    ("--lr", float, f"peak learning rate (default by --mode: lora {_e(MODE_DEFAULT_LR['lora'])}, state "
                    f"{_e(MODE_DEFAULT_LR['state'])}, full the model's recommended_lr, or {_e(SCRATCH_LR)} with "
                    f"--init scratch; the run says which it used)"),
    ("--lr-final", float, "final learning rate of the cosine (default: lr/10)"),
    ("--warmup-steps", int, "linear warmup steps"),
    ("--max-steps", int, "optimizer steps (default: --epochs over the data)"),
    ("--epochs", int, "passes over the data when --max-steps is not given"),
    ("--seed", int, "random seed (data order, init, dropout), 0..4294967295"),
    ("--save-every", int, "steps between resumable checkpoints (0: end only)"),
    ("--eval-every", int, "steps between evaluations on --eval-data (0: end only)"),
    ("--eval-data", str, "evaluation data (same formats as --data)"),
    ("--precision", str, "fp32 or bf16 (default: bf16 autocast on GPU; on CPU bf16 where it has AVX512-BF16/AMX "
                        "and a quick check finds it faster, else fp32)"),
    ("--weight-decay", float, "AdamW weight decay on 2-D weight matrices"),
    ("--grad-clip", float, "max gradient norm (0 disables)"),
    ("--lora-r", int, "LoRA rank"),
    ("--lora-alpha", float, "LoRA alpha (scaling = alpha / r)"),
    ("--lora-dropout", float, "dropout on the LoRA input"),
    ("--lora-targets", str, "comma-separated Linear names to adapt (e.g. att.key,ffn.value)"),
    ("--train-parts", str, "LoRA mode: also train ln, emb and/or head (comma-separated)"),
    ("--bptt", str, "long samples: truncated (default) or full backprop through chunks"),
    ("--wandb", str, "log to this wandb project"),
    ("--threads", int, f"CPU threads of torch's ops, at most {THREADS_PER_CORE}x the cores (default: torch's own, usually the number "
                       "of cores)"),
    ("--method", str, "training objective: sft (default), dpo (preference pairs) or grpo (rewards on samples)"),
    ("--strategy", str, "under torchrun: ddp (default) or fsdp (sharded parameters, gradients, optimizer)"),
]


# Flags shared with other commands (rwkvtune.cli.common), also TrainConfig fields.
SHARED_FLAGS = ("device", "data_format", "on_data_error", "save_dtype")


BAD_RECORD_ADVICE = "fix the record, or pass --on-data-error skip (recipe: on_data_error: skip) to skip bad records"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train an RWKV-7 model. Defaults come from the model config's recommended values; precedence: "
                     "defaults < --config recipe < flags < key=value overrides. Runs under torchrun for DDP or FSDP: "
                     "torchrun --nproc-per-node N -m rwkvtune train ...")
    defaults, choices = TrainConfig().to_dict(), TrainConfig.choices()
    for flag, typ, help_ in TRAIN_FLAGS:
        name = flag.lstrip("-").replace("-", "_")
        # default None: a recipe's value stands unless the flag is given; the help shows the
        # config's own default and, for a fixed set of values, the set.
        metavar = "{" + ",".join(choices[name]) + "}" if name in choices else None
        p.add_argument(flag, type=typ, default=None, metavar=metavar, help=_with_default(help_, defaults.get(name)))
    add_device(p, default=None)
    add_data_options(p, defaults=False)
    add_save_dtype(p, default=None)
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of TrainConfig options (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint (or from "
                                                   "DIR/checkpoints/step-N.pt: that one)")
    p.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="recompute activations in backward (default: off)")
    p.add_argument("--long-context", action="store_true", default=None,
                   help="keep samples whole; train long ones in ctx-len chunks carrying the state (default: off)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="sft on jsonl: pack short documents into shared windows with the RNN state reset at each "
                        "document's start, exactly as if each ran alone; --no-packing: one document per window, "
                        "padded (default: packing)")
    p.add_argument("--reward", action="append", metavar="SPEC",
                   help="method grpo: a reward function, repeatable: exact_match:FIELD, regex:PATTERN, format:REGEX, "
                        "length_penalty:N or path/to/file.py:function (see rwkvtune/train/rewards.py)")
    p.add_argument("--cpu-offload", action="store_true", default=None,
                   help="fsdp on GPU: keep sharded parameters, gradients and optimizer state in host memory")
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false", default=None,
                   help="run even when the memory estimate exceeds the device's memory (recipe: memory_check: false)")
    p.add_argument("--dry-run", action="store_true", help="print a verdict (ready or what would stop the run) and the "
                                                          "resolved setup, then exit; writes nothing (also not into "
                                                          "--out)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the full report (every setting, dims, "
                                                       "memory terms) as JSON on stdout, the summary on stderr")
    p.add_argument("--help-all", action=_HelpAll, help="show this help and every option settable as key=value (or "
                                                       "in a recipe), with its default and meaning, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any TrainConfig option, e.g. lr=1e-4")
    p.epilog = (f"Options without a flag, set as key=value or in a recipe: {', '.join(_unflagged())}; "
                f"`rwkvtune train --help-all` says what each one does.")


def _with_default(help_: str, default) -> str:
    if "default" in help_ or default in (None, ""):
        return help_
    shown = (",".join(map(str, default)) or "none") if isinstance(default, (list, tuple)) else default
    return f"{help_} (default: {shown})"


def _flag_names() -> set[str]:
    """TrainConfig fields that have a flag of their own."""
    return {flag.lstrip("-").replace("-", "_") for flag, *_ in TRAIN_FLAGS} | set(SHARED_FLAGS) | {
        "resume", "grad_checkpoint", "long_context", "packing", "reward", "memory_check", "cpu_offload"}


def _unflagged() -> list[str]:
    return [name for name in TrainConfig.option_names() if name not in _flag_names()]


def options_help() -> str:
    """Every TrainConfig option by section, with its default, its flag if any, and the comment that
    documents it in the dataclass: the text of ``rwkvtune train --help-all``. The options of a
    method (DPOConfig, GRPOConfig) show their section's defaults, from those classes alone."""
    defaults, flags = TrainConfig().to_dict(), _flag_names()
    lines = ["All options (recipe keys; on the command line as key=value, or with the flag shown):"]
    section = None
    for sec, name, comment in TrainConfig.field_docs():
        if name in METHOD_SECTIONS:
            lines.append(f"\n  method {name} (recipe section `{name}:` or flat keys, e.g. "
                         f"{FLAT_EXAMPLE[name]}; beta and loss_type belong to the run's method; key=value as "
                         f"{name}.NAME=VALUE or NAME=VALUE):")
            for _, sub, doc in option_docs(METHOD_SECTIONS[name]):
                flag = f"  [--{sub.replace('_', '-')}]" if sub in flags else ""
                lines.append(f"    {name}.{sub}={_shown(defaults[name][sub])}{flag}" + (f"\n        {doc}" if doc else ""))
            section = None
            continue
        if sec != section:
            section = sec
            lines.append(f"\n  {sec}:" if sec else "")
        flag = f"  [--{name.replace('_', '-')}]" if name in flags else ""
        lines.append(f"    {name}={_shown(defaults[name])}{flag}" + (f"\n        {comment}" if comment else ""))
    return "\n".join(lines)


FLAT_EXAMPLE = {"dpo": "dpo: {beta: 0.1} or beta: 0.1", "grpo": "grpo: {num_generations: 8} or num_generations: 8"}


def _shown(value) -> str:
    return "null" if value is None else ("[" + ",".join(map(str, value)) + "]" if isinstance(value, list)
                                         else str(value).lower() if isinstance(value, bool) else str(value))


class _HelpAll(argparse.Action):
    """``--help-all``: the usual help, then :func:`options_help`."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print()
        print(options_help())
        parser.exit()


def config_from_args(args: argparse.Namespace):
    cfg = TrainConfig()
    if args.config:
        cfg.update(load_recipe(args.config), source=f"recipe {args.config}")
    cfg.update({k: getattr(args, k) for k in _flag_names() if getattr(args, k) is not None}, source="command line")
    cfg.update(parse_overrides(args.overrides), source="command line (key=value)")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # a bad recipe or override fails before torch is imported
    from rwkvtune.train import trainer
    from rwkvtune.train.checkpointing import run_dir_of
    try:
        result = trainer.train(cfg, dry_run=args.dry_run)
    except KeyboardInterrupt as e:
        if str(e):  # train() named the run's directory (a default --out is only known there)
            raise
        out = run_dir_of(cfg.resume) if cfg.resume else cfg.out
        raise KeyboardInterrupt(interrupted_message(RunDir(out) if out else None)) from e
    if not _main_rank():
        return 0
    if args.dry_run:

        if args.json:  # for tools, the report on stdout; people read the summary
            print(json.dumps(result, indent=2))
        print(dry_run_text(result), file=sys.stderr if args.json else sys.stdout)
        return 0
    print(json.dumps(result, indent=2))  # for tools; people read the line below
    print(next_steps(result), file=sys.stderr)
    return 0


def next_steps(summary: dict) -> str:
    """One line for people at the end of a run: where the result is and commands that run on it.

    The run's directory is the model name (final.pth, or the base with the run's adapter or state).
    ``eval`` scores SFT data only, so it is offered after an SFT run, on the run's own (eval) data;
    after DPO (preference pairs) and GRPO (prompts) only ``generate`` is, in chat form, as those
    methods train replies to prompts."""
    try:
        saved = read_yaml_file(RunDir(summary["out"]).config, "run config", "") or {}
    except RwkvtuneError:
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    q = shlex.quote
    if "final" in summary:
        where = f"the model is in {summary['final']}" + (f" (LoRA adapter: {summary['adapter']})"
                                                          if "adapter" in summary else "")
    elif "state" in summary:
        where = f"the tuned state is in {summary['state']} (on the base model {saved.get('model') or '?'})"
    else:
        return f"done: the run is in {summary['out']}"
    use = f"--model {q(str(summary['out']))}"
    if saved.get("method", "sft") != "sft":
        return f"done: {where}; try it: rwkvtune generate {use} --chat --prompt 'Hello'"
    data = saved.get("eval_data") or saved.get("data") or "DATA.jsonl"
    fmt = saved.get("data_format")
    data_format = f" --data-format {q(fmt)}" if isinstance(fmt, str) and fmt != "auto" else ""
    return (f"done: {where}; try it: rwkvtune generate {use} --prompt 'Hello'  or score it: rwkvtune eval {use} "
            f"--data {q(str(data))}{data_format}")


def _main_rank() -> bool:
    """Whether this process is rank 0 under torchrun (every rank returns the summary; one prints it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
