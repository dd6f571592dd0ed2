"""One prompt, streamed: :func:`stream_generate` yields text as it is decoded; :func:`generate`
collects it (or hands a list of prompts to batched generation); :func:`chat` wraps one turn.

* The prompt is run through the model in one parallel forward (the chunked WKV path), which
  returns the RNN state after the prompt.
* Then one token at a time through :class:`~rwkvtune.generate.rnn.BatchDecoder` (batch 1): the
  same maths as ``model(last_token, state=state, return_state=True)`` with the state updated in
  place (no new state tensors per token, fewer ops). The work per token is constant, whatever the
  length of the text so far.
* Text is decoded with :class:`~rwkvtune.tokenizer.StreamDecoder`, so a character split over
  several byte-level tokens is emitted whole; stop strings are held back until they can be ruled
  out, and never emitted.

State tuning: ``wkv_init`` [L, H, N, N] (a tuned initial WKV state) starts the prefill from that
state instead of zeros.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Sequence

import torch

from rwkvtune.generate.batch import generate_batch
from rwkvtune.generate.config import GenerationError, SamplingConfig, resolve
from rwkvtune.generate.decoding import check_wkv_init, model_device
from rwkvtune.generate.rnn import BatchDecoder
from rwkvtune.generate.sampling import apply_penalties, sample_logits, update_counts
from rwkvtune.generate.text import CHAT_TURN_END, END_OF_TEXT, encode_prompt, format_chat, split_stop
from rwkvtune.tokenizer import StreamDecoder
from rwkvtune.utils import plural


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
        return (f"[{plural(self.generated_tokens, 'token')} ({self.finish_reason}) | prompt "
                f"{plural(self.prompt_tokens, 'token')}, "
                f"prefill {self.prefill_tokens_per_s:.1f} tok/s | decode {self.decode_tokens_per_s:.1f} tok/s]")


def _prefill(model, ids: list[int], state, wkv_init):
    """Last-position logits [V] (fp32, CPU) and the state after the prompt."""
    idx = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    if state is not None:
        logits, state = model(idx, state=state, return_state=True, last_only=True)
    elif wkv_init is not None:
        logits, state = model(idx, wkv_init=wkv_init.to(device=idx.device, dtype=torch.float32), return_state=True,
                              last_only=True)
    else:
        logits, state = model(idx, return_state=True, last_only=True)
    return logits[0, -1].float().cpu(), state


@torch.inference_mode()
def stream_generate(model, tokenizer, prompt: str | Sequence[int], sampling: SamplingConfig | None = None, *,
                    state=None, wkv_init: torch.Tensor | None = None, stats: GenerationStats | None = None,
                    **overrides) -> Iterator[str]:
    """Yield the generated text piece by piece (never a broken character, never a stop string).

    prompt: text, or a list of token ids. An empty prompt starts from token 0 (end of text, which
    precedes every document in training data). ``sampling``: a :class:`SamplingConfig` (default
    settings when None); keyword arguments named like its fields override it
    (``temperature=0``). ``state`` (RWKV7State, batch 1) continues from an earlier state; else
    ``wkv_init`` [L, H, N, N] starts from a tuned initial WKV state. Generation ends at token 0,
    at any ``stop`` string or after ``max_tokens`` tokens.
    """
    cfg = resolve(sampling, overrides)
    if wkv_init is not None and state is None:
        check_wkv_init(model, wkv_init)
    stats = stats if stats is not None else GenerationStats()
    ids = encode_prompt(tokenizer, prompt)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    stats.prompt_tokens = len(ids)
    t0 = time.perf_counter()
    logits, state = _prefill(model, ids, state, wkv_init)
    stats.prefill_seconds = time.perf_counter() - t0
    stats.state = state

    counts = torch.zeros(logits.shape[-1])
    decoder = StreamDecoder(tokenizer)
    tokenizer.id_to_bytes(END_OF_TEXT)  # build the lazy id -> bytes table outside the decode timing
    pending = ""
    rnn = BatchDecoder(model, state)  # takes the prefill's (fresh) state over, updating it in place
    device = model_device(model)
    t1 = time.perf_counter()
    stats.finish_reason = "length"
    try:
        for step in range(cfg.max_tokens):
            token = sample_logits(apply_penalties(logits, counts, cfg.presence_penalty, cfg.frequency_penalty),
                                  cfg.temperature, cfg.top_p, cfg.top_k, generator)
            if token == END_OF_TEXT:
                stats.finish_reason = "eot"
                break
            stats.tokens.append(token)
            stats.generated_tokens += 1
            count = cfg.penalize_whitespace or bool(tokenizer.id_to_bytes(token).strip())
            update_counts(counts, token, cfg.penalty_decay, count_token=count)
            emit, pending, stopped = split_stop(pending + decoder.push(token), cfg.stop)
            if emit:
                yield emit
            if stopped:
                stats.finish_reason = "stop"
                return
            if step + 1 < cfg.max_tokens:
                logits = rnn.step(torch.tensor([token], dtype=torch.long, device=device))[0].cpu()
                stats.state = rnn.state
        emit, pending, stopped = split_stop(pending + decoder.flush(), cfg.stop)
        if stopped:
            stats.finish_reason = "stop"
        text = emit if stopped else emit + pending  # at the end, a held-back tail is plain text
        if text:
            yield text
    finally:
        stats.decode_seconds = time.perf_counter() - t1


def is_batch(prompts) -> bool:
    """A list of prompts (texts or id lists), as opposed to one text or one list of token ids."""
    return (isinstance(prompts, (list, tuple)) and len(prompts) > 0
            and all(isinstance(p, (str, list, tuple)) or (isinstance(p, torch.Tensor) and p.dim() == 1)
                    for p in prompts))


def generate(model, tokenizer, prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
             sampling: SamplingConfig | None = None, *, state=None, wkv_init: torch.Tensor | None = None,
             stream: Callable[[str], None] | None = None, stats: GenerationStats | None = None,
             samples_per_prompt: int = 1, **overrides) -> str | list[str]:
    """The generated text (see :func:`stream_generate`); ``stream(piece)`` is called as it comes.

    A list of prompts (texts or token-id lists) is decoded as one batch by
    :func:`~rwkvtune.generate.batch.generate_batch` and gives a list of texts, prompt by prompt,
    ``samples_per_prompt`` texts each (sampling settings shared by all rows).
    """
    if is_batch(prompt):
        if state is not None or stream is not None or stats is not None:
            raise GenerationError("generate: state=, stream= and stats= work with one prompt, found a list of "
                                  "prompts; use generate_batch (its stats=) or one prompt at a time")
        done = generate_batch(model, tokenizer, prompt, sampling, samples_per_prompt=samples_per_prompt,
                              wkv_init=wkv_init, **overrides)
        return [c.text for c in done]
    if samples_per_prompt != 1:
        raise GenerationError(f"samples_per_prompt: {samples_per_prompt!r} needs a list of prompts, found one "
                              f"prompt; pass [prompt]")
    pieces = []
    for piece in stream_generate(model, tokenizer, prompt, sampling, state=state, wkv_init=wkv_init, stats=stats,
                                 **overrides):
        pieces.append(piece)
        if stream is not None:
            stream(piece)
    return "".join(pieces)


def chat(model, tokenizer, message: str, history: Sequence | None = None, system: str | None = None,
         sampling: SamplingConfig | None = None, **kwargs) -> str:
    """One assistant reply in the RWKV World chat format; ends at the turn end "\\n\\n"."""
    stream_kw = {k: kwargs.pop(k) for k in ("state", "wkv_init", "stream", "stats") if k in kwargs}
    cfg = resolve(sampling, kwargs)
    stops = (CHAT_TURN_END,) + tuple(s for s in cfg.stop if s != CHAT_TURN_END)
    cfg = dataclasses.replace(cfg, stop=stops)
    return generate(model, tokenizer, format_chat(message, history, system), cfg, **stream_kw).strip()
