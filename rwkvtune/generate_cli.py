"""`rwkvtune generate`: arguments and the command body (the lead wires them into the CLI).

    rwkvtune generate --model 0.1b --prompt "The Eiffel tower is in" --max-tokens 100
    rwkvtune generate --model my.pth --chat --prompt "Hello!" --state tuned-state.pth

Text streams to stdout as it is generated; a stats line (tokens, prefill and decode speed) goes
to stderr at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from rwkvtune.generate import (CHAT_TURN_END, GenerationError, GenerationStats, SamplingConfig, format_chat,
                               prepare_for_decoding, stream_generate)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
        raise GenerationError(_flag(name) + str(e)[len(name):]) from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model", required=True,
                   help="registry name (e.g. 0.1b; see `rwkvtune models`) or path to a .pth checkpoint")
    p.add_argument("--prompt", default=None,
                   help="prompt text (default: read from stdin, less one trailing newline, so that "
                        "`echo TEXT |` equals --prompt TEXT); with --chat, the user message")
    add_sampling_arguments(p)
    p.add_argument("--chat", action="store_true",
                   help='wrap the prompt as "User: ...\\n\\nAssistant:" and stop at the turn end "\\n\\n"')
    p.add_argument("--system", default=None, help="with --chat: a system message before the user turn")
    p.add_argument("--state", default=None, metavar="FILE",
                   help="state-tuning file: a torch file with key 'wkv_init' [L, H, N, N], or that tensor")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="weights and activations dtype (default fp32; the WKV state is always fp32)")
    return parser


def load_state_file(path: str, model) -> torch.Tensor:
    """The wkv_init tensor [L, H, N, N] of a state-tuning file, checked against ``model``."""
    if not os.path.isfile(path):
        raise GenerationError(f"--state {path}: {'is a directory' if os.path.isdir(path) else 'file not found'}; "
                              f"expected the state.pth written by `rwkvtune train --mode state`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GenerationError(f"--state {path}: cannot read as a torch file ({type(e).__name__}); expected the "
                              f"state.pth written by `rwkvtune train --mode state`") from None
    if isinstance(obj, dict):
        if "wkv_init" not in obj or not isinstance(obj["wkv_init"], torch.Tensor):
            raise GenerationError(f"--state {path}: a dict without a 'wkv_init' tensor (keys: "
                                  f"{', '.join(map(str, list(obj)[:8])) or 'none'}); expected a state-tuning "
                                  f"file with key 'wkv_init' [L, H, N, N]")
        obj = obj["wkv_init"]
    if not isinstance(obj, torch.Tensor):
        raise GenerationError(f"--state {path}: found a {type(obj).__name__}, expected a tensor [L, H, N, N] or a "
                              f"dict with key 'wkv_init'")
    c = model.config
    expect = (c.n_layer, c.n_head, c.head_size_a, c.head_size_a)
    t = obj
    if t.dim() == 5 and t.shape[1] == 1:  # [L, 1, H, N, N]: a batch-1 state
        t = t[:, 0]
    if tuple(t.shape) != expect:
        raise GenerationError(f"--state {path}: wkv_init has shape {list(obj.shape)}, but this model "
                              f"(L={c.n_layer}, H={c.n_head}, N={c.head_size_a}) needs [L, H, N, N] = "
                              f"{list(expect)}; the state was tuned for another model")
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise GenerationError(f"--state {path}: wkv_init must be finite floats (found {t.dtype})")
    return t.float()


def run(args: argparse.Namespace) -> int:
    """Load the model, stream the generated text to stdout; returns the exit code.

    Bad input raises :class:`RwkvtuneError`, which ``rwkvtune``'s main prints as one
    ``error: ...`` line (exit status 2), as for every other command.
    """
    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.tokenizer import get_tokenizer

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
                                  f"text") from None
        # `echo hi | rwkvtune generate` must equal --prompt hi: drop the line end that echo (or an
        # editor saving the file) adds; only one, so a prompt that ends in a blank line keeps it.
        if prompt.endswith("\n"):
            prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt[:-1]
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes in argv arrive as surrogates
        raise GenerationError(f"--prompt is not valid UTF-8 (character {e.start}); pass UTF-8 text") from None
    chat = bool(get("chat"))
    if chat:
        prompt = format_chat(prompt, system=get("system"))
    sampling = sampling_from_args(args, (CHAT_TURN_END,) if chat else ())  # refused before the model loads
    from rwkvtune.utils import check_device

    device = check_device(get("device") or "cpu")
    precision = get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise GenerationError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    model = prepare_for_decoding(RWKV7.from_checkpoint(get("model"), device=device, dtype=PRECISIONS[precision]))
    wkv_init = load_state_file(get("state"), model) if get("state") else None
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
