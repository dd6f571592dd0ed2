"""Tiny RWKV-7 checkpoints in the official layout, built at test time (never committed).

Values are random but scaled like a trained model (unit-ish activations, decays in range), so
logit comparisons are meaningful; they do not come from rwkvtune's own init code, so they are an
independent fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(n_layer=2, n_embd=64, head_size=16, vocab=256, d_decay=8, d_aaa=12, d_mv=4, d_gate=16)


def make_state_dict(n_layer=2, n_embd=64, head_size=16, vocab=256, d_decay=8, d_aaa=12, d_mv=4, d_gate=16,
                    dim_ffn=None, layer0_v=True, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    C, V, N = n_embd, vocab, head_size
    H, F = C // N, dim_ffn or 4 * C

    def rn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def un(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    sd: dict[str, torch.Tensor] = {"emb.weight": rn(V, C)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = un(1, 1, C)
        sd[a + "w0"] = rn(1, 1, C, std=1.0) - 1.0
        sd[a + "a0"] = rn(1, 1, C, std=0.5)
        sd[a + "v0"] = rn(1, 1, C, std=0.5)
        sd[a + "k_k"] = un(1, 1, C, lo=0.5, hi=1.0)
        sd[a + "k_a"] = un(1, 1, C, lo=0.8, hi=1.2)
        for letter, d in (("w", d_decay), ("a", d_aaa), ("v", d_mv), ("g", d_gate)):
            sd[f"{a}{letter}1"] = rn(C, d, std=C ** -0.5)
            sd[f"{a}{letter}2"] = rn(d, C, std=d ** -0.5 * 0.5)
        if i == 0 and not layer0_v:
            for name in ("v0", "v1", "v2"):
                del sd[a + name]
        sd[a + "r_k"] = rn(H, N, std=0.2)
        for name in ("receptance", "key", "value", "output"):
            sd[f"{a}{name}.weight"] = rn(C, C, std=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
        sd[p + "ffn.x_k"] = un(1, 1, C)
        sd[p + "ffn.key.weight"] = rn(F, C, std=C ** -0.5)
        sd[p + "ffn.value.weight"] = rn(C, F, std=F ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
    sd["head.weight"] = rn(V, C, std=C ** -0.5)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_checkpoint(path, prefix: str = "", **kw) -> str:
    sd = make_state_dict(**kw)
    torch.save({prefix + k: v for k, v in sd.items()}, str(path))
    return str(path)


def train_losses(out) -> list[float]:
    """The per-step training losses of a run directory's metrics.jsonl."""
    rows = map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


def write_full_corpus(path, tokens: int, vocab: int) -> str:
    """binidx data of exactly ``tokens`` targets in documents of up to 4096 random ids, so every
    window is full (what the memory estimate assumes); returns the path prefix."""
    import numpy as np

    from rwkvtune.data.binidx import BinIdxWriter

    rng = np.random.default_rng(0)
    with BinIdxWriter(str(path)) as w:
        left = tokens + 1
        while left:
            n = min(4097, left)
            doc = rng.integers(1, vocab, n)
            doc[-1] = 0
            w.add_document(doc)
            left -= n
    return str(path)


def write_word_text(path) -> str:
    """16 jsonl {"text"} records of 6-9 words cycling alpha, beta, gamma, delta: a corpus a tiny
    model learns in a few steps."""
    lines = [" ".join(["alpha", "beta", "gamma", "delta"][(i + j) % 4] for j in range(6 + i % 4)) for i in range(16)]
    Path(path).write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return str(path)
