"""``rwkvtune train``: flags onto TrainConfig options, recipes, overrides, the run.

The flags are built from rwkvtune.models.rwkv7.flags (which options have one; name, type, choices,
default and help section from the option itself); this module only turns each into argparse.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from rwkvtune.cli.common import add_data_format, add_device, add_on_data_error, add_save_dtype
from rwkvtune.errors import RwkvtuneError
from rwkvtune.models.rwkv7.config import ALIASES, TrainConfig, load_recipe, option_docs, parse_overrides
from rwkvtune.models.rwkv7.flags import TRAIN_FLAGS, FlagOption, flag_options
from rwkvtune.models.rwkv7.method_config import METHOD_SECTIONS
from rwkvtune.safe_yaml import read_yaml_file
from rwkvtune.train.run_dir import RunDir
from rwkvtune.train.signals import interrupted_message
from rwkvtune.train.memory import dry_run_text

# Options whose flag other commands share, defined once in rwkvtune.cli.common (same spelling and
# help everywhere); every other flag of TRAIN_FLAGS is built here from its option.
SHARED = {"device": lambda g: add_device(g, default=None),
          "data_format": lambda g: add_data_format(g, default=None),
          "on_data_error": lambda g: add_on_data_error(g, default=None),
          "save_dtype": lambda g: add_save_dtype(g, default=None)}


BAD_RECORD_ADVICE = "fix the record, or pass --on-data-error skip (recipe: on_data_error: skip) to skip bad records"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train an RWKV-7 model. Defaults come from the model config's recommended values; precedence: "
                     "defaults < --config recipe < flags < key=value overrides. Runs under torchrun for DDP or FSDP: "
                     "torchrun --nproc-per-node N -m rwkvtune train ...")
    # the usage line names what a run needs; every flag is in its section below
    p.usage = "%(prog)s [--config RECIPE.yaml] [--model MODEL] [--data DATA] [FLAG ...] [key=value ...]"
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of TrainConfig options (flags override it)")
    p.add_argument("--dry-run", action="store_true", help="print a verdict (ready or what would stop the run) and the "
                                                          "resolved setup, then exit; writes nothing (also not into "
                                                          "--out)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the full report (every setting, dims, "
                                                       "memory terms) as JSON on stdout, the summary on stderr")
    p.add_argument("--help-all", action=_HelpAll, help="show this help and every option settable as key=value (or "
                                                       "in a recipe), with its default and meaning, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any TrainConfig option, e.g. lr=1e-4")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in flag_options():
        if opt.group not in groups:
            groups[opt.group] = p.add_argument_group(opt.group)
        add_flag(groups[opt.group], opt)
    unflagged = _unflagged()
    every = (f"Options without a flag, set as key=value or in a recipe: {', '.join(unflagged)}; " if unflagged
             else "Every option has a flag and can also be set as key=value or in a recipe; ")
    p.epilog = (f"{every}`rwkvtune train --help-all` says what each one does. Another trainer's name for an "
                f"option (--learning-rate, --gradient-accumulation-steps) is answered with ours.")
    p.flag_aliases = {"--" + other.replace("_", "-"): "--" + ours.replace("_", "-")
                      for other, ours in ALIASES.items() if ours in TRAIN_FLAGS}


def add_flag(group, opt: FlagOption) -> None:
    """The argparse option of one flag. Every default is None, so that a recipe's value stands
    unless the flag is given; the help shows the option's own default. A value outside the
    choices is refused by TrainConfig.validate, naming the option and where it was set."""
    if opt.name in SHARED:
        SHARED[opt.name](group)
        return
    metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices else None)
    help_ = _with_default(opt.help, opt.default).replace("%", "%%")  # argparse formats help with %
    if opt.kind is bool:  # --x and --no-x: a flag can also turn off what a recipe turned on
        group.add_argument(opt.flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
    elif opt.kind == "repeat":
        group.add_argument(opt.flag, action="append", default=None, metavar=metavar, help=help_)
    else:  # a list is one comma-separated value, split by the config (as lora_targets=a,b)
        typ = opt.kind if opt.kind in (int, float) else str
        group.add_argument(opt.flag, type=typ, default=None, metavar=metavar, help=help_)


def _with_default(help_: str, default: str) -> str:
    return help_ if "default" in help_ or not default else f"{help_} (default: {default})"


def _flag_names() -> set[str]:
    """The options that have a flag of their own."""
    return set(TRAIN_FLAGS)


def _unflagged() -> list[str]:
    return [name for name in TrainConfig.option_names() if name not in _flag_names()]


def options_help() -> str:
    """Every TrainConfig option by section, with its default, its flag if any, and the comment that
    documents it in the dataclass: the text of ``rwkvtune train --help-all``. The options of a
    method (DPOConfig, GRPOConfig) show their section's defaults, from those classes alone."""
    defaults = TrainConfig().to_dict()
    flags = {o.name: o.flag + (f"/--no-{o.flag[2:]}" if o.kind is bool else "") for o in flag_options()}
    lines = ["All options (recipe keys; on the command line as key=value, or with the flag shown):"]
    section = None
    for sec, name, comment in TrainConfig.field_docs():
        if name in METHOD_SECTIONS:
            lines.append(f"\n  method {name} (recipe section `{name}:` or flat keys, e.g. "
                         f"{FLAT_EXAMPLE[name]}; beta and loss_type belong to the run's method; key=value as "
                         f"{name}.NAME=VALUE or NAME=VALUE):")
            for _, sub, doc in option_docs(METHOD_SECTIONS[name]):
                flag = f"  [{flags[sub]}]" if sub in flags else ""
                lines.append(f"    {name}.{sub}={_shown(defaults[name][sub])}{flag}" + (f"\n        {doc}" if doc else ""))
            section = None
            continue
        if sec != section:
            section = sec
            lines.append(f"\n  {sec}:" if sec else "")
        flag = f"  [{flags[name]}]" if name in flags else ""
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
