"""The ``rwkvtune`` command line (also ``python -m rwkvtune``, which works under torchrun).

This module is a thin dispatcher. Each command is declared by a small ``_add_<command>``
function that defines its arguments and names its handler as a ``"module:function"`` string;
the handler's module is imported only when that command runs. So ``rwkvtune models`` starts
fast and never imports torch or the training stack, and a broken optional dependency of one
command cannot break the others.

Adding a command (the lead's recipe):

1. write the handler ``def run(args: argparse.Namespace) -> int`` in the command's own module
   (e.g. ``rwkvtune/train/cli.py``); import heavy modules (torch, ...) inside it;
2. write ``_add_<command>(sub)`` below: ``sub.add_parser(...)``, its arguments, and
   ``_handler(parser, "rwkvtune.train.cli:run")``;
3. append it to ``COMMANDS``.

A command with actions (``models list/show/new/check``, later ``data prepare``) gets a nested
sub-parser, as ``_add_models`` shows. Handlers raise :class:`rwkvtune.errors.RwkvtuneError` for
anything the user can fix; :func:`main` prints it as one ``error: ...`` line and returns 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from rwkvtune import __version__

PROG = "rwkvtune"


def _handler(parser: argparse.ArgumentParser, target: str) -> None:
    """Attach the lazily imported handler ``"package.module:function"`` to a (sub)parser."""
    parser.set_defaults(_handler=target)


# ---- commands ------------------------------------------------------------------------------


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list, show, create and check model configs",
        description="Model config registry. Without an action: the registry table (same as `models list`).",
    )
    _handler(p, "rwkvtune.configs.cli_models:cmd_list")
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    ls = actions.add_parser("list", help="registry table (default action)")
    _handler(ls, "rwkvtune.configs.cli_models:cmd_list")

    show = actions.add_parser("show", help="every field of one config",
                              description="Every field of a config: a registry name, a .json path or a .pth path.")
    show.add_argument("name", metavar="NAME", help='registry name ("1.5b", "rwkv7-1.5b"), .json config or .pth file')
    show.add_argument("--json", action="store_true", help="print one JSON object")
    _handler(show, "rwkvtune.configs.cli_models:cmd_show")

    new = actions.add_parser(
        "new", help="write a config JSON for a checkpoint",
        description="Detect a checkpoint's dims and write a registry config for it. Default output: "
                    "rwkv7-NAME.json in the first $RWKVTUNE_CONFIG_PATH directory if set, else the current "
                    "directory.")
    new.add_argument("checkpoint", metavar="CKPT", help="the .pth file")
    new.add_argument("--name", required=True, help="registry name for it, e.g. my-1.5b (file rwkv7-NAME.json)")
    new.add_argument("-o", "--output", metavar="FILE", help="where to write the .json (default: see above)")
    new.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _handler(new, "rwkvtune.configs.cli_models:cmd_new")

    check = actions.add_parser(
        "check", help="validate every config; compare with model files that are present",
        description="Validate every config in reach (package and $RWKVTUNE_CONFIG_PATH) and compare each with "
                    "its model file where that file is present. Exit status 1 if any problem.")
    _handler(check, "rwkvtune.configs.cli_models:cmd_check")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="detect a checkpoint's dims (reads shapes only)",
                       description="Detect every dimension of an RWKV-7 .pth from its tensor shapes, without "
                                   "loading tensor data, and name the registry entry it matches.")
    p.add_argument("checkpoint", metavar="CKPT", help="the .pth file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _handler(p, "rwkvtune.configs.cli_models:cmd_inspect")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from rwkvtune.train.cli import add_train_arguments

    p = sub.add_parser("train", help="fine-tune or pretrain (full, LoRA or state tuning)",
                       description="Train an RWKV-7 model. Defaults come from the model config's recommended "
                                   "values; precedence: defaults < --config recipe < flags < key=value overrides. "
                                   "Runs under torchrun for DDP: torchrun --nproc-per-node N -m rwkvtune train ...")
    add_train_arguments(p)
    _handler(p, "rwkvtune.train.cli:run_train")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from rwkvtune.train.cli import add_eval_arguments

    p = sub.add_parser("eval", help="loss and perplexity of a model on data (prints JSON)")
    add_eval_arguments(p)
    _handler(p, "rwkvtune.train.cli:run_eval")


def _add_merge_lora(sub: argparse._SubParsersAction) -> None:
    from rwkvtune.train.cli import add_merge_arguments

    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base model (official layout)",
                       description="Merge ADAPTER into BASE in fp32 and write OUT in the official layout.")
    add_merge_arguments(p)
    _handler(p, "rwkvtune.train.cli:run_merge")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from rwkvtune.generate_cli import add_arguments

    p = sub.add_parser("generate", help="generate text (streams; chat mode with --chat)",
                       description="Prefill the prompt in parallel, then decode token by token with the RNN state.")
    add_arguments(p)
    _handler(p, "rwkvtune.generate_cli:run")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training data")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    prep = actions.add_parser("prepare", help="tokenize jsonl into binidx (RWKV-LM's format)",
                              description="Tokenize IN.jsonl (text, chat or prompt/response) into PREFIX.bin/.idx "
                                          "(uint16 tokens, documents ending with 0), in parallel.")
    prep.add_argument("input", metavar="IN.jsonl")
    prep.add_argument("--out", required=True, metavar="PREFIX", help="output prefix (writes PREFIX.bin, PREFIX.idx)")
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="tokenizer processes")
    prep.add_argument("--fmt", default="auto", help="auto, text, chat or prompt_response")
    prep.add_argument("--on-error", dest="on_error", default="raise", choices=["raise", "skip"],
                      help="stop at a bad line, or skip and count bad lines")
    _handler(prep, "rwkvtune.data.prepare:cli_prepare")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_inspect,
    # _add_generate,  (enabled once rwkvtune.generate_cli lands)
    _add_train,
    _add_eval,
    _add_merge_lora,
    _add_data,
]


# ---- entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Training toolkit for RWKV-7 (x070) language models.",
        epilog="Run `rwkvtune COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a check failed, 2 usage or user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    target = getattr(args, "_handler", None)
    if target is None:
        parser.print_help(sys.stderr)
        return 2

    from rwkvtune.errors import RwkvtuneError

    module_name, func_name = target.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except RwkvtuneError as e:
        sys.stdout.flush()
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
