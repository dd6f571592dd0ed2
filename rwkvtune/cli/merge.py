"""``rwkvtune merge-lora BASE ADAPTER OUT``: the adapter merged into its base, official layout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

from rwkvtune.cli.common import add_save_dtype
from rwkvtune.errors import ConfigError
from rwkvtune.io.checkpoint import save_state_dict
from rwkvtune.tokenizer import get_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Merge ADAPTER into BASE in fp32 and write OUT in the official layout."
    p.add_argument("base", metavar="BASE", help="base model: registry name or .pth")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter.pth written by --mode lora")
    p.add_argument("out", metavar="OUT", help="merged official-layout .pth to write")
    add_save_dtype(p)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--no-quant-report", dest="quant_report", action="store_false",
                   help="an adapter trained on a quantized base (--base-quant): skip the comparison of the merged "
                        "full-precision model with the quantized base + adapter the training saw (default: printed)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.peft.lora import load_adapter, merged_state_dict

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
    dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
    save_state_dict(merged_state_dict(model, dtype), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    kind = adapter_base_quant(args.adapter)
    if kind != "none" and args.quant_report:
        print(quant_report(model, args.base, args.adapter, kind), file=sys.stderr)
    return 0


# Tokens of the bundled sample text the quality report scores (a few seconds on CPU up to 1.5B).
REPORT_TOKENS = 256


def adapter_base_quant(path) -> str:
    """The --base-quant an adapter was trained with ("none" for adapters that predate the field)."""
    from rwkvtune.io.artifacts import load_artifact

    state = load_artifact(path, "adapter", "adapter.pth from --mode lora")
    return str(state.get("base_quant", "none")) if isinstance(state, dict) else "none"


def quant_report(merged, base: str, adapter: str, kind: str) -> str:
    """One line: what merging an adapter trained on a ``kind`` base into the full-precision base
    changes, on REPORT_TOKENS tokens of the bundled sample text: the next-token loss of the
    quantized base + adapter (the model training optimised) and of the merged full-precision model
    (``merged``: the base with the adapter applied, which equals the merged file's maths), the
    mean KL between them and their top-1 agreement."""
    import torch
    import torch.nn.functional as F

    from rwkvtune.models.rwkv7.model import RWKV7
    from rwkvtune.peft.lora import load_adapter

    V = merged.config.vocab_size
    text = resources.files("rwkvtune").joinpath("assets/sample.jsonl").read_text(encoding="utf-8")
    ids = [t for line in text.splitlines()[:40] for t in get_tokenizer().encode(json.loads(line)["text"])]
    if V < 65536:  # a model without the World vocabulary (a test model): the ids folded into its range
        ids = [t % V for t in ids]
    idx = torch.tensor(ids[: REPORT_TOKENS + 1])[None]
    quantized = load_adapter(RWKV7.from_checkpoint(base, quant=kind), adapter)
    with torch.no_grad():
        logp_m = merged(idx[:, :-1]).float().log_softmax(-1)
        logp_q = quantized(idx[:, :-1]).float().log_softmax(-1)
    target = idx[:, 1:]
    loss_m = float(F.nll_loss(logp_m[0], target[0]))
    loss_q = float(F.nll_loss(logp_q[0], target[0]))
    kl = float((logp_q.exp() * (logp_q - logp_m)).sum(-1).mean())
    top1 = float((logp_q.argmax(-1) == logp_m.argmax(-1)).float().mean())
    return (f"quality: the adapter was trained on a {kind} base; on {idx.shape[1] - 1} tokens of the bundled sample "
            f"text the {kind} base + adapter (what training optimised) has loss {loss_q:.4f}, the merged "
            f"full-precision model {loss_m:.4f} ({loss_m - loss_q:+.4f}); KL {kl:.4f} nats/token, top-1 agreement "
            f"{top1:.1%} (--no-quant-report skips this)")
