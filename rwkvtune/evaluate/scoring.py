"""Exact scoring of text with an RWKV-7 model, written for the RNN: no padding, no windows.

An RNN's whole past is its state, so

* a context is run once and every continuation of it is scored from the context's state (a
  multiple-choice item with four answers costs one context plus four short continuations, not
  four full sequences); a continuation of one token costs nothing beyond the context itself;
* contexts of different lengths are prefilled together in *segments* (:func:`advance`): rows
  sorted by length, every live row runs the next stretch of tokens up to the shortest live row's
  end (at most ``token_budget`` tokens per forward), that row's state is taken and it leaves the
  batch. No context is padded, so each state is exactly that of its own tokens;
* continuations are right-padded into one forward per batch from their contexts' states
  (:func:`score_padded`): exact, since an RNN's output at a position never depends on what comes
  after it, and one large forward costs far less than many small ones (a CPU forward at small
  batch is bound by reading the weights). Each row's numbers are those of that row alone (the
  tests check batched against one row at a time);
* a document of any length is scored in one pass of the recurrence (perplexity with no windowing
  loss: every token sees the whole document before it).

Every sequence starts with ``prefix`` (by default the token of ``"\\n"``, as in RWKV's own lm-eval
runs; ``[0]``, the end-of-text token that precedes every training document, is the other usual
choice), so an empty context is well defined.

:func:`plain_loglikelihood` is the per-item full forward (the baseline ``bench/bench_lm_eval.py``
times against, and an independent route the tests compare with).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Sequence

import torch
from rwkvtune.models.rwkv7.model import RWKV7State

# Tokens per forward (rows x segment length): bounds the activations of one forward. The head's
# logits are taken in slices of HEAD_ROWS positions (HEAD_ROWS x V fp32 = 128 MB at V = 65536).
TOKEN_BUDGET = 8192
HEAD_ROWS = 512
NOT_SCORED = -1  # a target position that counts nothing (e.g. the prefix's own tokens)


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context moves to the continuation (lm-eval's own convention for
    its Hugging Face model): "Answer: " + "B" is scored as "Answer:" + " B", the way the text was
    tokenized in training (the World tokenizer keeps a space with the word after it)."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


@dataclasses.dataclass
class Scored:
    """Per-row results of :func:`advance`, in the order of its ``seqs``."""

    logprob: list[float]         # sum of log p(target) over the row's targets (0.0 without targets)
    greedy: list[bool]           # every target was the argmax
    last_logits: torch.Tensor | None  # [N, V] fp32: logits after each row's last token (want_last)
    state: object | None         # RWKV7State (batch N) after each row's last token (want_state)


def _select(state, rows: torch.Tensor):
    return None if state is None else state.select(rows)


def _cat_rows(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """Stack per-group tensors (rows on dim 0) back into the order 0..n-1."""
    rows = torch.tensor([r for idx, _ in parts for r in idx])
    out = torch.cat([t for _, t in parts])
    where = torch.empty(n, dtype=torch.long)
    where[rows] = torch.arange(n)
    return out[where.to(out.device)]


def _cat_states(parts: list, n: int):
    fields = {}
    for f in ("att_x_prev", "wkv", "ffn_x_prev"):
        fields[f] = _cat_rows([(idx, getattr(s, f).transpose(0, 1)) for idx, s in parts], n).transpose(0, 1)
    return RWKV7State(**{k: v.contiguous() for k, v in fields.items()})


def _score(model, h: torch.Tensor, targets: torch.Tensor):
    """Summed log-probability [B] and all-greedy flags [B] of ``targets`` [B, T] given hidden states
    h [B, T, C]; a target of -1 (NOT_SCORED) counts nothing."""
    B, T, C = h.shape
    mask = targets >= 0
    flat_h, flat_t = h.reshape(B * T, C), targets.clamp(min=0).reshape(B * T)
    lp = torch.empty(B * T, dtype=torch.float32, device=h.device)
    hit = torch.empty(B * T, dtype=torch.bool, device=h.device)
    for s in range(0, B * T, HEAD_ROWS):
        logits = model.head(flat_h[s:s + HEAD_ROWS]).float()
        t = flat_t[s:s + HEAD_ROWS]
        lp[s:s + HEAD_ROWS] = torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0]
        hit[s:s + HEAD_ROWS] = logits.argmax(-1) == t
    lp, hit = lp.view(B, T).masked_fill(~mask, 0.0), hit.view(B, T) | ~mask
    return lp.double().sum(1), hit.all(1)


@torch.inference_mode()
def advance(model, seqs: Sequence[Sequence[int]], *, targets: Sequence[Sequence[int]] | None = None,
            state=None, wkv_init: torch.Tensor | None = None, want_last: bool = False,
            want_state: bool = False, token_budget: int = TOKEN_BUDGET,
            autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> Scored:
    """Run every row of ``seqs`` (non-empty token lists) through the model, rows of different
    lengths together in segments (see the module docstring).

    ``state``: RWKV7State with one row per sequence to start from (else ``wkv_init`` [L, H, N, N],
    else zeros). ``targets[i]``: token ids scored at the positions of ``seqs[i]`` (same length:
    ``targets[i][t]`` is the token that should follow ``seqs[i][:t + 1]``, or NOT_SCORED). ``want_last``: the
    logits after each row's last token; ``want_state``: the state after it.
    """
    n = len(seqs)
    if any(len(s) == 0 for s in seqs):
        raise ValueError("advance: every sequence needs at least one token")
    if targets is not None and any(len(t) != len(s) for s, t in zip(seqs, targets)):
        raise ValueError("advance: targets[i] must be as long as seqs[i]")
    device = model.emb.weight.device
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    logprob, greedy = [0.0] * n, [True] * n
    lasts, finals = [], []
    live = order  # rows still running, shortest first
    cur = _select(state, torch.tensor(live, device=device)) if state is not None else None
    kw = {} if wkv_init is None else {"wkv_init": wkv_init.to(device=device, dtype=torch.float32)}
    pos = 0
    while live:
        end = min(len(seqs[live[0]]), pos + max(1, token_budget // len(live)))
        idx = torch.tensor([list(seqs[r][pos:end]) for r in live], dtype=torch.long, device=device)
        with autocast():
            h, st = model(idx, state=cur, return_state=True, hidden=True, **({} if cur is not None else kw))
            if targets is not None:
                tg = torch.tensor([list(targets[r][pos:end]) for r in live], dtype=torch.long, device=device)
                lp, ok = _score(model, h, tg)
                for r, v, g in zip(live, lp.tolist(), ok.tolist()):
                    logprob[r] += v
                    greedy[r] = greedy[r] and g
            done = [b for b, r in enumerate(live) if len(seqs[r]) == end]
            if done:
                done_t = torch.tensor(done, device=device)
                rows = [live[b] for b in done]
                if want_last:
                    lasts.append((rows, model.head(h[done_t, -1]).float()))
                if want_state:
                    finals.append((rows, st.select(done_t)))
        keep = [b for b in range(len(live)) if len(seqs[live[b]]) > end]
        live = [live[b] for b in keep]
        cur = st.select(torch.tensor(keep, device=device)) if keep else None
        pos = end
    return Scored(logprob, greedy, _cat_rows(lasts, n) if want_last else None,
                  _cat_states(finals, n) if want_state else None)


@torch.inference_mode()
def score_padded(model, state, seqs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *,
                 token_budget: int = TOKEN_BUDGET,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[list[float], list[bool]]:
    """Like :func:`advance` with targets, from ``state`` (one row per sequence), but the rows are
    right-padded into one forward (split in time only beyond ``token_budget`` tokens, carrying
    the state). Exact: a row's outputs depend only on the tokens before them, never on the pads
    after its end, whose targets count nothing. Fewer, larger forwards than :func:`advance`'s
    segments; the padding is paid for in compute, which is what short continuations want (a
    forward on a CPU or a small batch costs reading every weight once, whatever its rows)."""
    device = model.emb.weight.device
    T = max(len(s) for s in seqs)
    idx = torch.tensor([list(s) + [0] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    tgt = torch.tensor([list(t) + [NOT_SCORED] * (T - len(t)) for t in targets], dtype=torch.long, device=device)
    lps = torch.zeros(len(seqs), dtype=torch.float64, device=device)
    oks = torch.ones(len(seqs), dtype=torch.bool, device=device)
    step = max(1, token_budget // len(seqs))
    for t0 in range(0, T, step):
        with autocast():
            h, state = model(idx[:, t0:t0 + step], state=state, return_state=True, hidden=True)
            lp, ok = _score(model, h, tgt[:, t0:t0 + step])
        lps += lp
        oks &= ok
    return lps.tolist(), oks.tolist()


@torch.inference_mode()
def loglikelihood(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32,
                  wkv_init: torch.Tensor | None = None, token_budget: int = TOKEN_BUDGET,
                  autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding produces it) per (context ids,
    continuation ids) pair. Each distinct context runs once; its continuations start from its
    state. ``batch_size``: contexts per prefill, continuation rows per forward."""
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0:
            raise ValueError(f"request {i}: empty context (the prefix token(s) must come first)")
        by_ctx.setdefault(tuple(ctx), []).append(i)
    contexts = sorted(by_ctx, key=len)
    for c0 in range(0, len(contexts), batch_size):
        chunk = contexts[c0:c0 + batch_size]
        pre = advance(model, chunk, wkv_init=wkv_init, want_last=True, want_state=True, token_budget=token_budget,
                      autocast=autocast)
        logp0 = torch.log_softmax(pre.last_logits, -1)
        first = pre.last_logits.argmax(-1)
        rows = []  # (request, context row) of continuations longer than one token
        for k, ctx in enumerate(chunk):
            for i in by_ctx[ctx]:
                cont = requests[i][1]
                if len(cont) == 0:
                    out[i] = (0.0, True)
                    continue
                out[i] = (float(logp0[k, cont[0]]), bool(first[k] == cont[0]))
                if len(cont) > 1:
                    rows.append((i, k))
        rows.sort(key=lambda ik: len(requests[ik[0]][1]))
        for r0 in range(0, len(rows), batch_size):
            part = rows[r0:r0 + batch_size]
            conts = [list(requests[i][1]) for i, _ in part]
            st = pre.state.select(torch.tensor([k for _, k in part], device=pre.state.wkv.device))
            lps, oks = score_padded(model, st, [c[:-1] for c in conts], [c[1:] for c in conts],
                                    token_budget=token_budget, autocast=autocast)
            for (i, _), lp, g in zip(part, lps, oks):
                out[i] = (out[i][0] + lp, out[i][1] and g)
    return out


@torch.inference_mode()
def loglikelihood_rolling(model, docs: Sequence[Sequence[int]], prefix: Sequence[int], *, batch_size: int = 8,
                          wkv_init: torch.Tensor | None = None, token_budget: int = TOKEN_BUDGET,
                          autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> list[float]:
    """log p(document | prefix) of each document's token ids, the whole document in one pass of
    the recurrence (no windows: every token is predicted from everything before it)."""
    out = [0.0] * len(docs)
    live = [i for i, d in enumerate(docs) if len(d)]
    for b0 in range(0, len(live), batch_size):
        part = live[b0:b0 + batch_size]
        seqs = [list(prefix) + list(docs[i][:-1]) for i in part]
        tgts = [[NOT_SCORED] * (len(prefix) - 1) + list(docs[i]) for i in part]
        res = advance(model, seqs, targets=tgts, wkv_init=wkv_init, token_budget=token_budget, autocast=autocast)
        for i, lp in zip(part, res.logprob):
            out[i] = lp
    return out


@torch.inference_mode()
def plain_loglikelihood(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        wkv_init: torch.Tensor | None = None,
                        autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> list[tuple[float, bool]]:
    """The same numbers as :func:`loglikelihood` by the plain route: for each pair, one full
    forward of context + continuation and the log-softmax at the continuation's positions."""
    device = model.emb.weight.device
    kw = {} if wkv_init is None else {"wkv_init": wkv_init.to(device=device, dtype=torch.float32)}
    out = []
    for ctx, cont in requests:
        if not cont:
            out.append((0.0, True))
            continue
        seq = list(ctx) + list(cont)
        with autocast():
            logits = model(torch.tensor([seq[:-1]], device=device), **kw)[0, len(ctx) - 1:].float()
        tgt = torch.tensor(list(cont), device=device)
        lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0].double().sum()
        out.append((float(lp), bool((logits.argmax(-1) == tgt).all())))
    return out
