"""Text generation with an RWKV-7 model: parallel prefill, then constant-work RNN decoding.

* The prompt is run through the model in one parallel forward (the chunked WKV path), which
  returns the RNN state after the prompt.
* Then one token at a time: ``model(last_token, state=state, return_state=True)`` (T = 1, so the
  WKV "auto" backend uses the per-token recurrence). The work per token is constant, whatever
  the length of the text so far.
* Sampling follows RWKV's usual pipeline: presence/frequency penalties on the logits (counts decay
  by ``penalty_decay`` every step), then top-p on the softmax probabilities, top-k, and the
  temperature applied to the kept probabilities (``p ** (1 / temperature)``); temperature 0 is
  greedy.
* Text is decoded with :class:`~rwkvtune.tokenizer.StreamDecoder`, so a character split over
  several byte-level tokens is emitted whole; stop strings are held back until they can be ruled
  out, and never emitted.

State tuning: ``wkv_init`` [L, H, N, N] (a tuned initial WKV state) starts the prefill from that
state instead of zeros.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvtune.errors import RwkvtuneError

END_OF_TEXT = 0
CHAT_TURN_END = "\n\n"


class GenerationError(RwkvtuneError, ValueError):
    """Bad generation settings or inputs (sampling parameters, prompt, initial state)."""


@dataclasses.dataclass
class GenerationStats:
    """Filled in by :func:`stream_generate` as it runs (pass an instance as ``stats=``)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (stop string), "eot" (token 0) or "length" (max_tokens)
    tokens: list = dataclasses.field(default_factory=list)  # generated token ids
    # RWKV7State after the last token fed to the model (made under torch.inference_mode: reuse it
    # to continue generating or in no-grad forwards, not as an input to training)
    state: object = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes from the prefill logits; each later one costs a forward.
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"[{self.generated_tokens} tokens ({self.finish_reason}) | prompt {self.prompt_tokens} tokens, "
                f"prefill {self.prefill_tokens_per_s:.1f} tok/s | decode {self.decode_tokens_per_s:.1f} tok/s]")


# ------------------------------------------------------------------------------------ sampling
def _check_sampling(temperature, top_p, top_k) -> None:
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise GenerationError(f"temperature: found {temperature!r}, expected a number >= 0 (0 = greedy)")
    if not (isinstance(top_p, (int, float)) and 0 <= top_p <= 1):
        raise GenerationError(f"top_p: found {top_p!r}, expected 0 <= top_p <= 1")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise GenerationError(f"top_k: found {top_k!r}, expected an integer >= 0 (0 = off)")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.85,
                   top_k: int = 0) -> torch.Tensor:
    """The distribution :func:`sample_logits` draws from (fp32, sums to 1). ``temperature > 0``.

    top-p keeps the most likely tokens whose cumulative probability first reaches ``top_p``
    (at least one token; ties with the cut-off probability are kept), top-k keeps the ``top_k``
    most likely; then p ** (1 / temperature), renormalised.
    """
    _check_sampling(temperature, top_p, top_k)
    if temperature == 0:
        raise GenerationError("sampling_probs: temperature 0 is greedy (argmax), it has no distribution")
    probs = torch.softmax(logits.detach().float().reshape(-1), dim=-1)
    if top_p < 1:
        sorted_p = torch.sort(probs, descending=True).values
        cum = torch.cumsum(sorted_p, dim=0)
        cut_index = min(int(torch.searchsorted(cum, torch.tensor([float(top_p)])).item()), probs.numel() - 1)
        probs = torch.where(probs < sorted_p[cut_index], torch.zeros_like(probs), probs)
    if 0 < top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:  # extreme temperature underflow: fall back to greedy
        probs = torch.zeros_like(probs)
        probs[int(torch.argmax(logits.reshape(-1)))] = 1.0
        return probs
    return probs / total


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0,
                  generator: torch.Generator | None = None) -> int:
    """Draw one token id from ``logits`` [V]. ``temperature == 0`` returns the argmax."""
    _check_sampling(temperature, top_p, top_k)
    logits = logits.detach().float().reshape(-1).cpu()
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, temperature, top_p, top_k)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0) -> torch.Tensor:
    """logits - (presence * [count > 0] + frequency * count), per token (RWKV's usual penalty).

    ``counts`` [V] holds the (decayed) number of times each token was generated so far.
    """
    if presence_penalty == 0 and frequency_penalty == 0:
        return logits
    seen = (counts > 0).to(logits.dtype)
    return logits - (presence_penalty * seen + frequency_penalty * counts.to(logits.dtype))


def update_counts(counts: torch.Tensor, token: int, penalty_decay: float = 0.996,
                  count_token: bool = True) -> torch.Tensor:
    """Decay every count by ``penalty_decay``, then add 1 for ``token`` (in place; returns counts)."""
    counts.mul_(penalty_decay)
    if count_token:
        counts[token] += 1.0
    return counts


# ---------------------------------------------------------------------------------------- chat
def _clean(text: str) -> str:
    """One chat turn's content: CRLF -> LF, stripped, blank lines collapsed ("\\n\\n" ends a turn)."""
    return re.sub(r"\n{2,}", "\n", str(text).replace("\r\n", "\n").strip())


def format_chat(message: str, history: Sequence | None = None, system: str | None = None) -> str:
    """RWKV World chat prompt: ``"User: ...\\n\\nAssistant:"`` (no trailing space).

    ``history``: earlier turns, as (user, assistant) pairs or {"role", "content"} dicts (roles
    "system", "user", "assistant"). A "\\n\\n" inside any content would end the turn early, so
    runs of newlines become one "\\n".
    """
    parts = []
    if system:
        parts.append(f"System: {_clean(system)}\n\n")
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    for turn in history or ():
        if isinstance(turn, dict):
            role = str(turn.get("role", "")).lower()
            if role not in names:
                raise GenerationError(f"chat history: unknown role {turn.get('role')!r}; expected one of "
                                      f"{', '.join(names)}")
            parts.append(f"{names[role]}: {_clean(turn.get('content', ''))}\n\n")
        else:
            user, assistant = turn
            parts.append(f"User: {_clean(user)}\n\nAssistant: {_clean(assistant)}\n\n")
    parts.append(f"User: {_clean(message)}\n\nAssistant:")
    return "".join(parts)


# ----------------------------------------------------------------------------------- generation
class _DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose one-row product, with grad disabled on
    CPU and a transposed-storage weight, is split over the torch threads.

    MKL runs a single-row x @ W_t on one core up to fairly large W, so a decoded token used about
    half of a 2-core machine's memory bandwidth. Splitting the inner dimension into one contiguous
    block of rows of W_t per thread (a view, no copy) and summing the partial products runs the
    blocks in parallel (measured on 2 cores: 768x768 1.5x, 768x3072 1.6-1.7x, the 65536x768 head
    1.9x faster). The summation order differs from one long dot product (fp32 rounding only).
    Anything else (more rows, autograd, other layouts, one thread) is plain F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        o, i = self.out_features, self.in_features
        nb = min(torch.get_num_threads(), 8)
        if (nb > 1 and self.bias is None and not torch.is_grad_enabled() and x.numel() == i and i % nb == 0
                and w.stride() == (1, o) and x.dtype == w.dtype and w.device.type == "cpu"):
            w_t = w.t().view(nb, i // nb, o)  # contiguous [in, out] buffer, split along `in`
            return torch.bmm(x.reshape(nb, 1, i // nb), w_t).sum(0).reshape(*x.shape[:-1], o)
        return F.linear(x, w, self.bias)


@torch.no_grad()
def prepare_for_decoding(model):
    """Make one-token decoding on CPU faster; values, shapes and state_dict keys do not change.

    * The matrices a decoded token multiplies (head, receptance/key/value/output, ffn key/value)
      are re-stored transposed: ``weight`` becomes a transposed view of an [in, out] buffer, so a
      single row x @ W^T streams W row by row (x @ W_t), which on CPU is faster (head ~1.5-2.5x
      on 2 cores). With one thread ffn.value (4C -> C) is faster as stored and is left alone.
    * Those plain nn.Linear modules become :class:`_DecodeLinear` (a subclass: same parameters),
      whose one-row no-grad product runs on all threads.
    Larger-T matmuls (prefill, training) run at the same speed either way, and saved checkpoints
    are unaffected (``official_state_dict`` writes contiguous tensors). Returns ``model``.
    """
    threads = torch.get_num_threads()
    mods = [getattr(model, "head", None)]
    for block in getattr(model, "blocks", ()):
        att = block.att
        mods += [att.receptance, att.key, att.value, att.output, block.ffn.key]
        if threads > 1:
            mods.append(block.ffn.value)
    for mod in mods:
        w = getattr(mod, "weight", None)
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu"):
            continue
        if w.is_contiguous():
            w.data = w.data.t().contiguous().t()
        if type(mod) is nn.Linear:
            mod.__class__ = _DecodeLinear
    return model


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _check_wkv_init(model, wkv_init: torch.Tensor) -> None:
    cfg = getattr(model, "config", None)
    if not isinstance(wkv_init, torch.Tensor):
        raise GenerationError(f"wkv_init: expected a tensor [L, H, N, N], found {type(wkv_init).__name__}")
    if cfg is None:
        return
    expect = (cfg.n_layer, cfg.n_head, cfg.head_size_a, cfg.head_size_a)
    if tuple(wkv_init.shape) != expect:
        raise GenerationError(f"wkv_init: shape {list(wkv_init.shape)} does not fit this model, expected "
                              f"[L, H, N, N] = {list(expect)}; the state was tuned for another model size")


def _split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """(safe to emit, held back, stopped). Text before the earliest stop string when one occurs;
    otherwise everything except the longest tail that could still begin a stop string."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[:len(text) - hold], text[len(text) - hold:], False


@torch.inference_mode()
def stream_generate(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = 200,
                    temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    penalty_decay: float = 0.996, stop: Sequence[str] | str | None = None,
                    seed: int | None = None, state=None, wkv_init: torch.Tensor | None = None,
                    stats: GenerationStats | None = None, penalize_whitespace: bool = False) -> Iterator[str]:
    """Yield the generated text piece by piece (never a broken character, never a stop string).

    prompt: text, or a list of token ids. An empty prompt starts from token 0 (end of text, which
    precedes every document in training data). ``state`` (RWKV7State, batch 1) continues from an
    earlier state; else ``wkv_init`` [L, H, N, N] starts from a tuned initial WKV state.
    Generation ends at token 0, at any ``stop`` string or after ``max_tokens`` tokens.
    ``penalize_whitespace=False``: tokens made only of whitespace are not counted for penalties.
    """
    _check_sampling(temperature, top_p, top_k)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise GenerationError(f"max_tokens: found {max_tokens!r}, expected an integer >= 0")
    if not 0 < penalty_decay <= 1:
        raise GenerationError(f"penalty_decay: found {penalty_decay!r}, expected 0 < penalty_decay <= 1")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise GenerationError(f"stop: found {stops!r}, expected non-empty strings")
    if wkv_init is not None and state is None:
        _check_wkv_init(model, wkv_init)
    stats = stats if stats is not None else GenerationStats()
    from rwkvtune.tokenizer import StreamDecoder

    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        ids = [END_OF_TEXT]
    device = _model_device(model)
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    stats.prompt_tokens = len(ids)
    t0 = time.perf_counter()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if state is not None:
        logits, state = model(idx, state=state, return_state=True, last_only=True)
    elif wkv_init is not None:
        logits, state = model(idx, wkv_init=wkv_init.to(device=device, dtype=torch.float32), return_state=True,
                              last_only=True)
    else:
        logits, state = model(idx, return_state=True, last_only=True)
    logits = logits[0, -1].float().cpu()
    stats.prefill_seconds = time.perf_counter() - t0
    stats.state = state

    counts = torch.zeros(logits.shape[-1])
    decoder = StreamDecoder(tokenizer)
    tokenizer.id_to_bytes(END_OF_TEXT)  # build the lazy id -> bytes table outside the decode timing
    pending = ""
    t1 = time.perf_counter()
    stats.finish_reason = "length"
    try:
        for step in range(max_tokens):
            token = sample_logits(apply_penalties(logits, counts, presence_penalty, frequency_penalty),
                                  temperature, top_p, top_k, generator)
            if token == END_OF_TEXT:
                stats.finish_reason = "eot"
                break
            stats.tokens.append(token)
            stats.generated_tokens += 1
            count = penalize_whitespace or bool(tokenizer.id_to_bytes(token).strip())
            update_counts(counts, token, penalty_decay, count_token=count)
            emit, pending, stopped = _split_stop(pending + decoder.push(token), stops)
            if emit:
                yield emit
            if stopped:
                stats.finish_reason = "stop"
                return
            if step + 1 < max_tokens:
                out, state = model(torch.tensor([[token]], dtype=torch.long, device=device), state=state,
                                   return_state=True)
                logits = out[0, -1].float().cpu()
                stats.state = state
        emit, pending, stopped = _split_stop(pending + decoder.flush(), stops)
        if stopped:
            stats.finish_reason = "stop"
        text = emit if stopped else emit + pending  # at the end, a held-back tail is plain text
        if text:
            yield text
    finally:
        stats.decode_seconds = time.perf_counter() - t1


def generate(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = 200, temperature: float = 1.0,
             top_p: float = 0.85, top_k: int = 0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             penalty_decay: float = 0.996, stop: Sequence[str] | str | None = None, seed: int | None = None,
             state=None, wkv_init: torch.Tensor | None = None, stream: Callable[[str], None] | None = None,
             stats: GenerationStats | None = None, penalize_whitespace: bool = False) -> str:
    """The generated text (see :func:`stream_generate`); ``stream(piece)`` is called as it comes."""
    pieces = []
    for piece in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                                 frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, stop=stop,
                                 seed=seed, state=state, wkv_init=wkv_init, stats=stats,
                                 penalize_whitespace=penalize_whitespace):
        pieces.append(piece)
        if stream is not None:
            stream(piece)
    return "".join(pieces)


def chat(model, tokenizer, message: str, history: Sequence | None = None, system: str | None = None,
         stop: Sequence[str] | None = None, **kwargs) -> str:
    """One assistant reply in the RWKV World chat format; ends at the turn end "\\n\\n"."""
    stops = [CHAT_TURN_END] + [s for s in (stop or []) if s != CHAT_TURN_END]
    return generate(model, tokenizer, format_chat(message, history, system), stop=stops, **kwargs).strip()
