"""The ``rwkvtune`` command line (also ``python -m rwkvtune``, which works under torchrun).

Every command lives in one module of this package (``models.py``: models and inspect,
``train.py``, ``eval.py``, ``merge.py``, ``data.py``, ...) with its arguments and handler; the
library functions they call stay where they are. This module is a thin dispatcher over the table
``COMMANDS``: each :class:`Command` names its module, which defines

* ``add_arguments(parser)``: the command's options (and may set ``parser.description``), imported
  only when that command is the one on the command line, so a command module that imports torch
  at the top never slows down ``rwkvtune models`` or ``rwkvtune --help``;
* ``run(args)``: the handler, called with the parsed ``argparse.Namespace``, returning the exit
  status;
* optionally ``BAD_RECORD_ADVICE``: how this command's user skips bad data records, appended to
  a bad record's error.

Adding a command is one entry in ``COMMANDS``. A command with actions (``models
list/show/new/check/download``, ``data prepare``) defines a nested sub-parser whose actions set
their own handlers with :func:`set_handler`. Options shared by several commands (device, data
format, bad-record policy, output dtype) are defined once in :mod:`rwkvtune.cli.common`.
Handlers raise :class:`rwkvtune.errors.RwkvtuneError` for anything the user can fix;
:func:`main` prints it as one ``error: ...`` line on stderr and returns 2 (or the error's
``exit_status``), without a traceback. This is the only place an error becomes that one line: the
library raises with the cause kept (``raise ... from e``), and ``--debug`` (before or after the
command) or ``RWKVTUNE_DEBUG=1`` prints the traceback with every cause after the line. Usage errors are one ``rwkvtune CMD: error: ...`` line
(see :class:`_Parser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import re
import sys
import time
import traceback
from typing import Callable, Sequence

from rwkvtune import __version__
from rwkvtune.errors import RwkvtuneError

PROG = "rwkvtune"
DEBUG_ENV = "RWKVTUNE_DEBUG"  # set to 1: as --debug
DEBUG_FLAG = "--debug"

@dataclasses.dataclass(frozen=True)
class Command:
    """One command: its name, the module that defines it, its one-line help (the top-level
    ``--help`` lists it without importing the module)."""

    name: str
    module: str  # "package.module": defines ``arguments(parser)`` and ``run(args)``
    help: str
    run: str | None = "run"  # None when every action sets its own handler (see set_handler)
    arguments: str = "add_arguments"

    @property
    def handler(self) -> str | None:
        return f"{self.module}:{self.run}" if self.run else None


def _resolve(target: str) -> Callable:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def set_handler(parser: argparse.ArgumentParser, target: str) -> None:
    """Attach the lazily imported handler ``"package.module:function"`` to a (sub)parser; that
    parser also reports the usage errors of its command line (see :class:`_Parser`)."""
    parser.set_defaults(_handler=target, _command_parser=parser)


class _Parser(argparse.ArgumentParser):
    """Reports usage errors in one line, through the (sub)command they were given to.

    argparse collects a sub-parser's unknown arguments and lets the top-level parser reject them,
    which would name ``rwkvtune`` for ``rwkvtune train --bogus``; the innermost parser that was
    used is in the namespace as ``_command_parser``. Sub-parsers are of this class too
    (``add_subparsers`` makes its parsers with the type of the parser it is called on).

    A prefix of a flag is not taken for the flag (``allow_abbrev=False``: ``--max-step 5`` was
    silently ``--max-steps``, and a new flag would change what a prefix means); an unknown flag is
    refused with the closest flag of its command. ``key=value`` overrides (a command's positional
    ``overrides``) are taken anywhere on the line, also after a flag, where argparse leaves them over.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if DEBUG_FLAG in extras:  # the global flag given after the command (`rwkvtune train --debug`)
            extras = [a for a in extras if a != DEBUG_FLAG]
            parsed.debug = True
        if extras and "overrides" in vars(parsed):
            # argparse gives a `nargs="*"` positional its turn once, before the first flag when the
            # line starts with one: key=value items after a flag come back unparsed
            overrides = [a for a in extras if _KEY_VALUE.match(a)]
            parsed.overrides = list(parsed.overrides or []) + overrides
            extras = [a for a in extras if not _KEY_VALUE.match(a)]
        if extras:
            parser = getattr(parsed, "_command_parser", self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{_guess_flags(parser, extras)}")
        return parsed

    def _check_value(self, action, value):
        # An unknown command or action: the closest name, then all of them (argparse's "invalid
        # choice: 'trian' (choose from ...)" leaves the reader to spot the typo).
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            raise argparse.ArgumentError(None, _unknown_command(self, value, list(action.choices)))
        super()._check_value(action, value)

    def error(self, message):
        # argparse prints the whole usage first (20 lines for train), which buries the one line
        # that matters; the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _unknown_command(parser: argparse.ArgumentParser, value: str, names: list[str]) -> str:
    """"unknown command 'trian'; did you mean 'train'? (commands: models, ...)"; an action of a
    command (``models shwo``) is called one."""
    what = "action" if parser.prog != PROG else "command"
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {value!r}{guess} ({what}s: {', '.join(names)})"


_KEY_VALUE = re.compile(r"[A-Za-z_][\w.-]*=")  # an override such as lr=1e-4 (never a flag or a path)


def _guess_flags(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """The guess for the unknown flags in ``extras`` that are close to one of ``parser``'s (typos,
    a dropped letter) or to another trainer's name for one (the parser's ``flag_aliases``):
    " (did you mean --max-steps?)", or "" when none is."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    aliases = getattr(parser, "flag_aliases", {})  # another trainer's name -> ours (train: --learning-rate)
    guesses = []
    for arg in extras:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag.lower(), known + list(aliases), n=1, cutoff=0.75)
        if close:
            guesses.append((flag, aliases.get(close[0], close[0])))
    if not guesses:
        return ""
    if len(guesses) == 1:
        return f" (did you mean {guesses[0][1]}?)"
    return " (did you mean " + ", ".join(f"{c} for {f}" for f, c in guesses) + "?)"


# Handlers and argument definitions live in one module per command group under rwkvtune/cli/;
# the strings are imported only for the command on the command line.
_CLI = "rwkvtune.cli"

COMMANDS: list[Command] = [
    Command("models", f"{_CLI}.models", "list, show, create, check and download model configs", run="cmd_list"),
    Command("inspect", f"{_CLI}.models", "detect a checkpoint's dims (reads shapes only)", run="cmd_inspect",
            arguments="add_inspect_arguments"),
    Command("generate", f"{_CLI}.generate", "generate text (streams; chat mode with --chat)"),
    Command("train", f"{_CLI}.train", "fine-tune or pretrain (full, LoRA or state tuning; sft, dpo or grpo)"),
    Command("eval", f"{_CLI}.eval", "loss and perplexity on data (JSON), or lm-eval benchmarks (--tasks)"),
    Command("merge-lora", f"{_CLI}.merge", "merge a LoRA adapter into its base model (official layout)"),
    Command("export", f"{_CLI}.export", "write a model in the Hugging Face RWKV-7 layout (safetensors)"),
    Command("data", f"{_CLI}.data", "prepare training data", run=None),
    Command("plan", f"{_CLI}.plan", "per-GPU memory of every launch of a size, and what fits 24/48/80/141 GB cards"),
]


# ---- entry point ---------------------------------------------------------------------------


def _selected(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the top level has no options taking values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; options of string-specified commands are loaded only for the command in argv."""
    parser = _Parser(
        prog=PROG,
        description="Training toolkit for RWKV-7 (x070) language models.",
        epilog="Run `rwkvtune COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"after an error's one line, print its traceback with every cause (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    selected = _selected(argv)
    for cmd in COMMANDS:
        # the command's module may set a longer description while it defines the arguments
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.set_defaults(_command_parser=p, _command_module=cmd.module)
        if cmd.handler:
            set_handler(p, cmd.handler)
        if cmd.name == selected:
            _resolve(f"{cmd.module}:{cmd.arguments}")(p)
    return parser


# Seconds the other processes of a distributed run wait before exiting on an error that every
# process raised, so that rank 0 prints it and exits first.
RANK0_FIRST_S = 1.0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fit_advice(error: Exception, args: argparse.Namespace) -> Exception:
    """A bad data record's error, advising what this command offers (its module's
    ``BAD_RECORD_ADVICE``) instead of the Python argument on_error='skip'."""
    module = sys.modules.get(getattr(args, "_command_module", ""))
    advice = getattr(module, "BAD_RECORD_ADVICE", None)
    if advice:
        from rwkvtune.data.formats import BadRecordError  # numpy: not at the CLI's startup

        if isinstance(error, BadRecordError):
            return error.with_advice(advice)
    return error


def _debug(args: argparse.Namespace | None) -> bool:
    """Whether to print an error's full chain: --debug, or RWKVTUNE_DEBUG set to anything but 0/empty."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _print_chain(error: BaseException) -> None:
    """The traceback of ``error`` with its causes (``raise ... from e``), for --debug."""
    print("".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip(), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a check failed, 2 usage or user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    target = getattr(args, "_handler", None)
    if target is None:  # no command, or a command without its action
        getattr(args, "_command_parser", parser).print_help(sys.stderr)
        return 2
    try:
        return int(_resolve(target)(args) or 0)
    except RwkvtuneError as e:
        sys.stdout.flush()
        if not e.every_rank or os.environ.get("RANK", "0") == "0":  # said once by a distributed run
            prefix = "" if getattr(e, "deliberate", False) else "error: "  # a stop the user asked for
            print(f"{prefix}{_one_line(str(_fit_advice(e, args)))}", file=sys.stderr)
            if _debug(args):
                _print_chain(e)
        else:
            # the other ranks leave after rank 0 has said it: torchrun ends every process at the
            # first exit, which must not be this one's (rank 0 could be stopped mid-sentence)
            time.sleep(RANK0_FIRST_S)
        return getattr(e, "exit_status", 2)  # e.g. 143 for training stopped by SIGTERM
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        # Ctrl-C is the user's choice, not a failure: one calm line (with what is kept, if anything)
        print(f"\nstopped by Ctrl-C{'; ' + _one_line(str(e)) if str(e) else ''}", file=sys.stderr)
        if _debug(args):
            _print_chain(e)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
