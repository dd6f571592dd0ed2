"""Batched generation: many prompts (and many samples per prompt) decoded together.

* Prefill: an RNN has no attention mask, so prompts are never padded. Each distinct prompt is
  run once; prompts of equal length share one parallel forward. The states are stacked into one
  batch, and a prompt's state is copied ``samples_per_prompt`` times: G samples of one prompt
  cost one prefill, and a row's memory is its fixed-size state, whatever its length.
* Decode: one batched RNN step per token for every unfinished row, and vectorised sampling over
  the [B, V] logits (see :mod:`rwkvtune.generate.sampling`). A row that finishes (end of text,
  a stop string, ``max_tokens``) is dropped from the batch, so it costs nothing afterwards.
* Per row: its own penalty counts, stop-string check, token ids, finish reason, and optionally
  the log-probabilities of its tokens under the model's raw softmax (GRPO's ``old_logps``).

Random numbers: every step draws the same count of uniform numbers for every row of the whole
batch (finished rows included), so with a seed a row's samples depend on the seed, its row
number and its own logits only, not on when or how the other rows finish.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict
from typing import Sequence

import torch

from rwkvtune.generate.config import GenerationError, SamplingConfig, resolve
from rwkvtune.generate.decoding import check_wkv_init, model_device
from rwkvtune.generate.rnn import BatchDecoder
from rwkvtune.generate.sampling import UNIFORMS_PER_ROW, apply_penalties, raw_logprobs, sample_rows
from rwkvtune.generate.text import END_OF_TEXT, encode_prompt, find_stop
from rwkvtune.tokenizer import StreamDecoder

# Tokens per prefill forward when grouping equal-length prompts: bounds the activations of one
# forward (about 40 KB per token for the 0.1B shape in fp32) without costing speed.
PREFILL_TOKENS = 4096


@dataclasses.dataclass
class Completion:
    """One generated sample. ``token_ids``: every sampled token in order, including the end-of-text
    token 0 when ``finish_reason`` is "eot" and the tokens that formed a stop string; ``text``:
    their text, cut before the stop string. ``logprobs``: log-probability of each token of
    ``token_ids`` under the model's raw softmax (temperature 1, no penalties, no top-p/top-k),
    when asked for."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string), "eot" (token 0) or "length" (max_tokens)
    logprobs: list[float] | None = None


@dataclasses.dataclass
class BatchStats:
    """Filled in by :func:`generate_batch` (pass an instance as ``stats=``)."""

    rows: int = 0
    prefill_forwards: int = 0
    prompt_tokens: int = 0  # tokens prefilled (each distinct prompt once)
    generated_tokens: int = 0  # over all rows, end-of-text tokens included
    decode_forwards: int = 0
    decode_rows: int = 0  # sum of the batch sizes of the decode forwards
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of prefill + decode (a rollout's throughput)."""
        t = self.prefill_seconds + self.decode_seconds
        return self.generated_tokens / t if t > 0 else 0.0


# ----------------------------------------------------------------------------------- prefill
def _cat_states(states: list, index: torch.Tensor):
    """Rows ``index`` of the batch made by concatenating ``states`` (RWKV7State, batch on dim 1)."""
    cls = type(states[0])
    fields = ("att_x_prev", "wkv", "ffn_x_prev")
    parts = {f: torch.cat([getattr(s, f) for s in states], 1) if len(states) > 1 else getattr(states[0], f)
             for f in fields}
    return cls(**{f: parts[f][:, index] for f in fields})


def _prefill(model, seqs: list[tuple[int, ...]], row_src: torch.Tensor, wkv_init, stats: BatchStats):
    """Logits [R, V] (fp32) and state (batch R) after each row's prompt; row r starts from
    distinct prompt ``row_src[r]``. One forward per group of equal-length prompts."""
    device = model_device(model)
    by_len = defaultdict(list)
    for d, seq in enumerate(seqs):
        by_len[len(seq)].append(d)
    order, logits, states = [], [], []
    kw = {} if wkv_init is None else {"wkv_init": wkv_init.to(device=device, dtype=torch.float32)}
    for T, members in by_len.items():
        per = max(1, PREFILL_TOKENS // T)
        for i in range(0, len(members), per):
            group = members[i:i + per]
            idx = torch.tensor([seqs[d] for d in group], dtype=torch.long, device=device)
            out, state = model(idx, return_state=True, last_only=True, **kw)
            logits.append(out[:, -1].float())
            states.append(state)
            order += group
            stats.prefill_forwards += 1
            stats.prompt_tokens += idx.numel()
    # position of each distinct prompt in the concatenation, then one row per sample
    where = torch.empty(len(order), dtype=torch.long)
    where[torch.tensor(order)] = torch.arange(len(order))
    rows = where[row_src].to(device)
    return torch.cat(logits)[rows], _cat_states(states, rows)


# ------------------------------------------------------------------------------------ decode
@functools.lru_cache(maxsize=8)
def _counted_tokens(tokenizer, V: int) -> torch.Tensor:
    """[V] 1.0 for tokens that count for the penalties (not whitespace-only), else 0.0."""
    n = min(V, getattr(tokenizer, "vocab_size", V))
    flags = [1.0 if tokenizer.id_to_bytes(i).strip() else 0.0 for i in range(n)] + [1.0] * (V - n)
    return torch.tensor(flags)


class _RowTexts:
    """Incremental text of each row, for stop strings: a row stops at the first stop string."""

    def __init__(self, tokenizer, stops: Sequence[str], rows: int):
        self.stops = stops
        self.decoders = [StreamDecoder(tokenizer) for _ in range(rows)]
        self.texts = [""] * rows

    def push(self, row: int, token: int, final: bool = False) -> bool:
        """Append the token's text (``final``: flush the decoder); True when a stop string appeared."""
        dec = self.decoders[row]
        old = self.texts[row]
        text = old + (dec.flush() if final else dec.push(token))
        cut = find_stop(text, self.stops, len(old))
        self.texts[row] = text if cut < 0 else text[:cut]
        return cut >= 0


class _Penalties:
    """Per-row decayed token counts [B, V], updated for all rows at once."""

    def __init__(self, cfg: SamplingConfig, tokenizer, B: int, V: int, device):
        self.cfg = cfg
        self.counts = torch.zeros(B, V, device=device)
        self.weight = None if cfg.penalize_whitespace else _counted_tokens(tokenizer, V).to(device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_penalties(logits, self.counts, self.cfg.presence_penalty, self.cfg.frequency_penalty)

    def update(self, tokens: torch.Tensor) -> None:
        self.counts.mul_(self.cfg.penalty_decay)
        add = torch.ones(len(tokens), device=tokens.device) if self.weight is None else self.weight[tokens]
        self.counts[torch.arange(len(tokens), device=tokens.device), tokens] += add

    def keep(self, rows: torch.Tensor) -> None:
        self.counts = self.counts[rows]


def _decode(model, tokenizer, cfg: SamplingConfig, logits: torch.Tensor, state, want_logprobs: bool,
            stats: BatchStats):
    """Token ids, finish reasons, log-probs (or None) and texts (or None: no stop strings) per row."""
    R, V = logits.shape
    device = logits.device
    gen = None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)
    alive = torch.arange(R, device=device)  # the row number of each batch position
    tokens, finish = [[] for _ in range(R)], ["length"] * R
    lps = [[] for _ in range(R)] if want_logprobs else None
    texts = _RowTexts(tokenizer, cfg.stop, R) if cfg.stop else None
    pen = _Penalties(cfg, tokenizer, R, V, device) if cfg.penalized else None
    rnn = BatchDecoder(model, state)
    for step in range(cfg.max_tokens):
        u = None if cfg.greedy else torch.rand(R, UNIFORMS_PER_ROW, generator=gen, device=device)[alive]
        tok = sample_rows(pen.apply(logits) if pen else logits, cfg, u)
        lp = raw_logprobs(logits, tok).tolist() if want_logprobs else None
        if pen:
            pen.update(tok)
        done = _record(tok.tolist(), alive.tolist(), tokens, lps, lp, finish, texts)
        stats.generated_tokens += len(tok)
        if step + 1 == cfg.max_tokens or len(done) == len(tok):
            break
        if done:  # drop finished rows: they cost nothing from now on
            keep = torch.tensor(sorted(set(range(len(tok))) - set(done)), device=device)
            alive, tok = alive[keep], tok[keep]
            rnn.keep(keep)
            if pen:
                pen.keep(keep)
        logits = rnn.step(tok)
        stats.decode_forwards += 1
        stats.decode_rows += len(tok)
    if texts is not None:
        for r in range(R):
            if finish[r] != "stop" and texts.push(r, END_OF_TEXT, final=True):
                finish[r] = "stop"
    return tokens, finish, lps, texts


def _record(toks: list[int], rows: list[int], tokens, lps, lp, finish, texts) -> list[int]:
    """Append each row's new token; the batch positions whose row has finished."""
    done = []
    for b, (r, t) in enumerate(zip(rows, toks)):
        tokens[r].append(t)
        if lps is not None:
            lps[r].append(lp[b])
        if t == END_OF_TEXT:
            finish[r] = "eot"
            done.append(b)
        elif texts is not None and texts.push(r, t):
            finish[r] = "stop"
            done.append(b)
    return done


# --------------------------------------------------------------------------------------- API
def _check_prompts(prompts) -> list:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise GenerationError(f"prompts: expected a list of prompts (texts or token-id lists), found "
                              f"{type(prompts).__name__}; pass [prompt] for one prompt")
    return list(prompts)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[str | Sequence[int]], sampling: SamplingConfig | None = None,
                   *, samples_per_prompt: int = 1, wkv_init: torch.Tensor | None = None, logprobs: bool = False,
                   stats: BatchStats | None = None, **overrides) -> list[Completion]:
    """Generate for every prompt, ``samples_per_prompt`` independent samples each, decoded together.

    prompts: texts or token-id lists, of any lengths (an empty prompt starts from token 0).
    ``sampling`` (or keyword overrides named like its fields) applies to every row; each row
    stops on its own (end of text, a stop string, ``max_tokens``). ``wkv_init`` [L, H, N, N]: a
    tuned initial state for every prompt. ``logprobs=True`` fills :attr:`Completion.logprobs`.
    Returns the completions prompt by prompt, sample by sample (``prompt_index``, ``sample_index``).
    """
    cfg = resolve(sampling, overrides)
    G = samples_per_prompt
    if not (isinstance(G, int) and not isinstance(G, bool) and G >= 1):
        raise GenerationError(f"samples_per_prompt: expected an integer >= 1, found {G!r}; pass e.g. 8")
    prompts = _check_prompts(prompts)
    if wkv_init is not None:
        check_wkv_init(model, wkv_init)
    stats = stats if stats is not None else BatchStats()
    ids = [encode_prompt(tokenizer, p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if not ids:
        return []
    distinct: dict[tuple[int, ...], int] = {}
    src = [distinct.setdefault(tuple(x), len(distinct)) for x in ids]  # identical prompts: one prefill
    row_src = torch.tensor([s for s in src for _ in range(G)])
    stats.rows = len(row_src)
    tokenizer.id_to_bytes(END_OF_TEXT)  # build the lazy id -> bytes table outside the timings
    t0 = time.perf_counter()
    logits, state = _prefill(model, list(distinct), row_src, wkv_init, stats)
    t1 = time.perf_counter()
    stats.prefill_seconds += t1 - t0
    tokens, finish, lps, texts = _decode(model, tokenizer, cfg, logits, state, logprobs, stats)
    stats.decode_seconds += time.perf_counter() - t1
    out = []
    for r in range(len(row_src)):
        text = texts.texts[r] if texts is not None else tokenizer.decode(tokens[r])
        out.append(Completion(r // G, r % G, text, tokens[r], finish[r], lps[r] if lps is not None else None))
    return out
