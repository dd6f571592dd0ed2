"""``rwkvtune generate``: sampling flags from SamplingConfig, chat wrapping, streaming output.

    rwkvtune generate --model 0.1b --prompt "The Eiffel tower is in" --max-tokens 100
    rwkvtune generate --model my.pth --chat --prompt "Hello!" --state tuned-state.pth
    rwkvtune generate --model 0.1b --adapter runs/my-lora --prompt "Hello"

Text streams to stdout as it is generated; a stats line (tokens, prefill and decode speed) goes
to stderr at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from rwkvtune.cli.common import add_model_arguments, load_model_from_args
from rwkvtune.generate.config import GenerationError, SamplingConfig
from rwkvtune.generate.text import CHAT_TURN_END, format_chat
from rwkvtune.tokenizer import get_tokenizer

PRECISIONS = ("fp32", "bf16")  # --precision: the weights' and activations' dtype


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingConfig field, with its default and help text from the dataclass."""
    for f in dataclasses.fields(SamplingConfig):
        kind, help = f.metadata["cli"], f.metadata["help"]
        if kind in ("int", "float"):
            shown = "" if f.default is None else f" (default {f.default})"
            parser.add_argument(_flag(f.name), type=int if kind == "int" else float, default=f.default,
                                help=help + shown)
        elif kind == "append":
            parser.add_argument(_flag(f.name), action="append", default=None, metavar="TEXT", help=help)
        elif kind == "flag":
            parser.add_argument(_flag(f.name), action="store_true", default=f.default, help=help)


def sampling_from_args(args: argparse.Namespace, extra_stops: tuple[str, ...] = ()) -> SamplingConfig:
    """The SamplingConfig of parsed flags (missing ones keep the defaults); a bad value is refused
    with the flag's name."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)
              if f.metadata["cli"] and getattr(args, f.name, None) is not None}
    stops = tuple(values.get("stop") or ())
    values["stop"] = stops + tuple(s for s in extra_stops if s not in stops)
    try:
        return SamplingConfig(**values)
    except GenerationError as e:
        name = str(e).split(":", 1)[0]
        raise GenerationError(_flag(name) + str(e)[len(name):].replace(f" {name} ", f" {_flag(name)} ")) from e


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "Prefill the prompt in parallel, then decode token by token with the RNN state."
    p = parser
    add_model_arguments(p, required=True)
    p.add_argument("--prompt", default=None,
                   help="prompt text (default: read from stdin, less one trailing newline, so that "
                        "`echo TEXT |` equals --prompt TEXT); with --chat, the user message")
    add_sampling_arguments(p)
    p.add_argument("--chat", action="store_true",
                   help='wrap the prompt as "User: ...\\n\\nAssistant:" and stop at the turn end "\\n\\n"')
    p.add_argument("--system", default=None, help="with --chat: a system message before the user turn")
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the generated text to stdout; returns the exit code.

    Bad input raises :class:`RwkvtuneError`, which ``rwkvtune``'s main prints as one
    ``error: ...`` line (exit status 2), as for every other command.
    """
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    prompt = get("prompt")
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise GenerationError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GenerationError(f"the prompt on stdin is not valid UTF-8 (byte {e.start}); pass UTF-8 "
                                  f"text") from e
        # `echo hi | rwkvtune generate` must equal --prompt hi: drop the line end that echo (or an
        # editor saving the file) adds; only one, so a prompt that ends in a blank line keeps it.
        if prompt.endswith("\n"):
            prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt[:-1]
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes in argv arrive as surrogates
        raise GenerationError(f"--prompt is not valid UTF-8 (character {e.start}); pass UTF-8 text") from e
    chat = bool(get("chat"))
    if get("system") is not None and not chat:
        raise GenerationError("--system is a chat system message: add --chat (it has no place in a plain prompt)")
    if chat:
        prompt = format_chat(prompt, system=get("system"))
    sampling = sampling_from_args(args, (CHAT_TURN_END,) if chat else ())  # refused before the model loads
    precision = get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise GenerationError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    # Imported here, not at the top: the flags and their checks above need no torch, so --help and
    # a bad flag answer at once (importing torch takes seconds).
    import torch

    from rwkvtune.generate.decoding import prepare_for_decoding
    from rwkvtune.generate.stream import GenerationStats, stream_generate

    # a run directory brings its own adapter or state (or final.pth)
    model, wkv_init = load_model_from_args(args, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    model = prepare_for_decoding(model)
    stats = GenerationStats()
    out = sys.stdout
    first = True
    for piece in stream_generate(model, get_tokenizer(), prompt, sampling=sampling, wkv_init=wkv_init, stats=stats):
        if chat and first:  # the reply starts after "Assistant:" with a space
            piece = piece.lstrip()
            if not piece:
                continue
        first = False
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    print(stats.summary(), file=sys.stderr, flush=True)
    return 0
