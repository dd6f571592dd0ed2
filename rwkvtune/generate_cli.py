"""`rwkvtune generate`: arguments and the command body (the lead wires them into the CLI).

    rwkvtune generate --model 0.1b --prompt "The Eiffel tower is in" --max-tokens 100
    rwkvtune generate --model my.pth --chat --prompt "Hello!" --state tuned-state.pth

Text streams to stdout as it is generated; a stats line (tokens, prefill and decode speed) goes
to stderr at the end.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from rwkvtune.generate import (CHAT_TURN_END, GenerationError, GenerationStats, format_chat, prepare_for_decoding,
                               stream_generate)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model", required=True,
                   help="registry name (e.g. 0.1b; see `rwkvtune models`) or path to a .pth checkpoint")
    p.add_argument("--prompt", default=None,
                   help="prompt text (default: read from stdin, less one trailing newline, so that "
                        "`echo TEXT |` equals --prompt TEXT); with --chat, the user message")
    p.add_argument("--max-tokens", type=int, default=200, help="most tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling threshold (default 0.85)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens; 0 = off (default)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token generated so far (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per (decayed) occurrence of a generated token (default 0)")
    p.add_argument("--penalty-decay", type=float, default=0.996,
                   help="occurrence counts are multiplied by this every token (default 0.996)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text is generated (not printed); repeatable")
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
    from rwkvtune.utils import check_device

    device = check_device(get("device") or "cpu")
    precision = get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise GenerationError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    model = prepare_for_decoding(RWKV7.from_checkpoint(get("model"), device=device, dtype=PRECISIONS[precision]))
    wkv_init = load_state_file(get("state"), model) if get("state") else None
    stops = list(get("stop") or [])
    chat = bool(get("chat"))
    if chat:
        prompt = format_chat(prompt, system=get("system"))
        if CHAT_TURN_END not in stops:
            stops.append(CHAT_TURN_END)
    stats = GenerationStats()
    out = sys.stdout
    first = True
    for piece in stream_generate(
            model, get_tokenizer(), prompt, max_tokens=get("max_tokens", 200),
            temperature=get("temperature", 1.0), top_p=get("top_p", 0.85), top_k=get("top_k", 0),
            presence_penalty=get("presence_penalty", 0.0), frequency_penalty=get("frequency_penalty", 0.0),
            penalty_decay=get("penalty_decay", 0.996), stop=stops, seed=get("seed"), wkv_init=wkv_init,
            stats=stats):
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
