"""The ``rwkvtune`` command line (also ``python -m rwkvtune``, which works under torchrun).

This module is a thin dispatcher over the table ``COMMANDS``. Each :class:`Command` names

* ``handler``: ``"package.module:function"``, called with the parsed ``argparse.Namespace`` and
  returning the exit status; its module is imported only when that command runs;
* ``arguments``: what defines the command's options: a function here, or a
  ``"package.module:function(parser)"`` string that is imported only when that command is the
  one on the command line (so a command module that imports torch at the top never slows
  down ``rwkvtune models`` or ``rwkvtune --help``).

Adding a command is one entry in ``COMMANDS``. A command with actions (``models
list/show/new/download/check``, ``data prepare``) defines a nested sub-parser whose actions set their own
handlers, as ``_models_arguments`` shows.
Handlers raise :class:`rwkvtune.errors.RwkvtuneError` for anything the user can fix;
:func:`main` prints it as one ``error: ...`` line on stderr and returns 2 (or the error's
``exit_status``), without a traceback. Usage errors are one ``rwkvtune CMD: error: ...`` line
(see :class:`_Parser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Callable, Sequence, Union

from rwkvtune import __version__

PROG = "rwkvtune"

ArgumentsSpec = Union[str, Callable[[argparse.ArgumentParser], None], None]


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: str | None  # "module:function"; None when every action sets its own
    arguments: ArgumentsSpec = None
    description: str | None = None
    # The end of a bad data record's error: how this command's user skips bad records (the data
    # layer's own advice names the Python argument on_error='skip'); see _fit_advice.
    bad_record_advice: str | None = None


def _resolve(target: str) -> Callable:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _handler(parser: argparse.ArgumentParser, target: str) -> None:
    """Attach the lazily imported handler ``"package.module:function"`` to a (sub)parser; that
    parser also reports the usage errors of its command line (see :class:`_Parser`)."""
    parser.set_defaults(_handler=target, _command_parser=parser)


class _Parser(argparse.ArgumentParser):
    """Reports usage errors in one line, through the (sub)command they were given to.

    argparse collects a sub-parser's unknown arguments and lets the top-level parser reject them,
    which would name ``rwkvtune`` for ``rwkvtune train --bogus``; the innermost parser that was
    used is in the namespace as ``_command_parser``. Sub-parsers are of this class too
    (``add_subparsers`` makes its parsers with the type of the parser it is called on).
    """

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            getattr(parsed, "_command_parser", self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message):
        # argparse prints the whole usage first (20 lines for train), which buries the one line
        # that matters; the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


# ---- arguments of the commands that live in this package's config registry -----------------

_MODELS = "rwkvtune.configs.cli_models"


def _models_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    ls = actions.add_parser("list", help="registry table (the default action)")
    _handler(ls, f"{_MODELS}:cmd_list")

    show = actions.add_parser("show", help="every field of one config",
                              description="Every field of a config: a registry name, a .json path or a .pth path.")
    show.add_argument("name", metavar="NAME", help='registry name ("1.5b", "rwkv7-1.5b"), .json config or .pth file')
    show.add_argument("--json", action="store_true", help="print one JSON object")
    _handler(show, f"{_MODELS}:cmd_show")

    new = actions.add_parser(
        "new", help="write a config JSON for a checkpoint",
        description="Detect a checkpoint's dims and write a registry config for it. Default output: "
                    "rwkv7-NAME.json in the first $RWKVTUNE_CONFIG_PATH directory if set, else the current "
                    "directory.")
    new.add_argument("checkpoint", metavar="CKPT", help="the .pth file")
    new.add_argument("--name", required=True, help="registry name for it, e.g. my-1.5b (file rwkv7-NAME.json)")
    new.add_argument("-o", "--output", metavar="FILE", help="where to write the .json (default: see above)")
    new.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _handler(new, f"{_MODELS}:cmd_new")

    download = actions.add_parser(
        "download", help="download a model file from its source (Hugging Face) into the models directory",
        description="Download the model file of a config from the Hugging Face repository its \"source\" names, "
                    "into the models directory ($RWKVTUNE_MODEL_DIR, default ~/.rwkvtune/models). Resumes an "
                    "interrupted download, verifies the sha256, and does nothing if the file is already there. "
                    "Honours HF_ENDPOINT and HF_TOKEN. Needs huggingface_hub: pip install \"rwkvtune[hub]\".")
    download.add_argument("name", metavar="NAME", help='registry name ("1.5b", "rwkv7-1.5b") or .json config')
    download.add_argument("--force", action="store_true", help="download again even if the file is present")
    download.add_argument("--models-dir", dest="models_dir", metavar="DIR",
                          help="download into DIR instead of the models directory")
    _handler(download, f"{_MODELS}:cmd_download")

    check = actions.add_parser(
        "check", help="validate every config; compare with model files that are present",
        description="Validate every config in reach (package and $RWKVTUNE_CONFIG_PATH) and compare each with "
                    "its model file where that file is present. Exit status 1 if any problem.")
    _handler(check, f"{_MODELS}:cmd_check")


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="the .pth file")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _data_arguments(p: argparse.ArgumentParser) -> None:
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
    _handler(prep, "rwkvtune.data.prepare:main")
    prep.set_defaults(_bad_record_advice="fix the record, or pass --on-error skip to skip bad records")


_TRAIN = "rwkvtune.train.cli"

COMMANDS: list[Command] = [
    Command("models", "list, show, create, download and check model configs", f"{_MODELS}:cmd_list", _models_arguments,
            "Model config registry. Without an action: the registry table (same as `models list`)."),
    Command("inspect", "detect a checkpoint's dims (reads shapes only)", f"{_MODELS}:cmd_inspect",
            _inspect_arguments,
            "Detect every dimension of an RWKV-7 .pth from its tensor shapes, without loading tensor data, "
            "and name the registry entry it matches."),
    Command("generate", "generate text (streams; chat mode with --chat)", "rwkvtune.generate_cli:run",
            "rwkvtune.generate_cli:add_arguments",
            "Prefill the prompt in parallel, then decode token by token with the RNN state."),
    Command("train", "fine-tune or pretrain (full, LoRA or state tuning)", f"{_TRAIN}:run_train",
            f"{_TRAIN}:add_train_arguments",
            "Train an RWKV-7 model. Defaults come from the model config's recommended values; precedence: "
            "defaults < --config recipe < flags < key=value overrides. Runs under torchrun for DDP: "
            "torchrun --nproc-per-node N -m rwkvtune train ...",
            "fix the record, or pass --on-data-error skip (recipe: on_data_error: skip) to skip bad records"),
    Command("eval", "loss and perplexity of a model on data (prints JSON)", f"{_TRAIN}:run_eval",
            f"{_TRAIN}:add_eval_arguments",
            bad_record_advice="fix or remove the record (eval scores every record; it has no option to skip "
                              "bad ones)"),
    Command("merge-lora", "merge a LoRA adapter into its base model (official layout)", f"{_TRAIN}:run_merge",
            f"{_TRAIN}:add_merge_arguments",
            "Merge ADAPTER into BASE in fp32 and write OUT in the official layout."),
    Command("data", "prepare training data", None, _data_arguments),
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    selected = _selected(argv)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        p.set_defaults(_command_parser=p, _bad_record_advice=cmd.bad_record_advice)
        if cmd.handler:
            _handler(p, cmd.handler)
        if callable(cmd.arguments):
            cmd.arguments(p)
        elif isinstance(cmd.arguments, str) and cmd.name == selected:
            _resolve(cmd.arguments)(p)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fit_advice(error: Exception, args: argparse.Namespace) -> Exception:
    """A bad data record's error, advising what this command offers instead of the Python
    argument on_error='skip'."""
    advice = getattr(args, "_bad_record_advice", None)
    if advice:
        from rwkvtune.data.formats import BadRecordError

        if isinstance(error, BadRecordError):
            return error.with_advice(advice)
    return error


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a check failed, 2 usage or user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from rwkvtune.errors import RwkvtuneError

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
        print(f"error: {_one_line(str(_fit_advice(e, args)))}", file=sys.stderr)
        return getattr(e, "exit_status", 2)  # e.g. 143 for training stopped by SIGTERM
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        print(f"\nerror: interrupted{'; ' + _one_line(str(e)) if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
