"""lm-eval's ``LM`` API for an RWKV-7 model (imports lm-eval: import this module only after
:func:`rwkvtune.evaluate.require_lm_eval`).

:class:`RwkvLM` is registered with lm-eval as ``"rwkvtune"``, so once this module is imported
``lm_eval.simple_evaluate(model="rwkvtune", model_args="model=PATH,adapter=...")`` works too.
"""

from __future__ import annotations

import contextlib

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from rwkvtune import log
from rwkvtune.evaluate import scoring
from rwkvtune.peft.loading import load_model as load_tuned
from rwkvtune.errors import ConfigError
from rwkvtune.tokenizer import get_tokenizer
from rwkvtune.generate.batch import generate_batch

# What precedes every context and document (see rwkvtune.evaluate.scoring): "newline" is the token
# RWKV's own lm-eval runs put first (the reference numbers were measured so); "eos" is token 0.
PREFIXES = {"newline": "\n", "eos": None}


def load_model(model: str, adapter: str | None = None, state: str | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32):
    """(RWKV7 in eval mode, tuned initial WKV state or None) from the names the CLI takes (a run
    directory brings its own adapter or state); each problem is one
    :class:`~rwkvtune.errors.RwkvtuneError` line naming the flag."""
    return load_tuned(model, adapter, state, device=device, dtype=dtype, flags=True)


@register_model("rwkvtune")
class RwkvLM(LM):
    """An RWKV-7 model (optionally with a LoRA adapter or a tuned initial state) for lm-eval.

    ``model``: an :class:`~rwkvtune.models.rwkv7.RWKV7` instance, or any name ``rwkvtune`` takes
    (registry name, .pth, run directory), loaded with ``adapter``/``state``. ``batch_size``: rows
    per forward. ``prefix``: "newline" (default) or "eos". ``precision``: "fp32" or "bf16"
    (autocast). ``share_prefix=False`` scores every (context, continuation) by its own full
    forward instead (the slow reference route, for checks and benchmarks). ``autocast``: a
    function returning the precision context to run under (a training run's), overriding
    ``precision``.
    """

    def __init__(self, model, tokenizer=None, wkv_init: torch.Tensor | None = None, adapter: str | None = None,
                 state: str | None = None, batch_size: int | str | None = 32, prefix: str = "newline",
                 precision: str = "fp32", device: str | None = None, share_prefix: bool = True, autocast=None,
                 **_ignored):
        super().__init__()

        if isinstance(model, str):
            model, wkv_init = load_model(model, adapter, state, device or "cpu")
        if prefix not in PREFIXES:
            raise ConfigError(f"prefix: found {prefix!r}, expected one of {', '.join(PREFIXES)}")
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision: found {precision!r}, expected fp32 or bf16")
        try:
            batch_size = 32 if batch_size in (None, "auto") else int(batch_size)
        except ValueError as e:
            raise ConfigError(f"batch_size: found {batch_size!r}, expected an integer >= 1") from e
        if batch_size < 1:
            raise ConfigError(f"batch_size: found {batch_size}, expected an integer >= 1")
        self.model = model
        self.tokenizer = tokenizer or get_tokenizer()
        self.wkv_init = wkv_init
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        text = PREFIXES[prefix]
        self.prefix = self.tokenizer.encode(text) if text is not None else [0]
        self.prefix_name = prefix
        dev = model.emb.weight.device
        self._device = dev
        self.precision = precision
        self.autocast = autocast or ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16"
                                     else contextlib.nullcontext)

    # ---- lm-eval's API ------------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context, continuation = scoring.split_whitespace(context, continuation)
        return self.prefix + self.tokenizer.encode(context), self.tokenizer.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        run = scoring.loglikelihood if self.share_prefix else _plain
        res = run(self.model, pairs, batch_size=self.batch_size, wkv_init=self.wkv_init, autocast=self.autocast)
        for r, out in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", r.args, out)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tokenizer.encode(r.args[0]) for r in requests]
        res = scoring.loglikelihood_rolling(self.model, docs, self.prefix, batch_size=self.batch_size,
                                            wkv_init=self.wkv_init, autocast=self.autocast)
        for r, out in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, out)
        return res

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with ``do_sample``, sampled) continuations that stop at the task's ``until``
        strings (cut before them), at end of text, or after ``max_gen_toks`` tokens."""

        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(_sampling_key(r.args[1]), []).append(i)
        for key, members in groups.items():
            kw = dict(key)
            for b0 in range(0, len(members), self.batch_size):
                part = members[b0:b0 + self.batch_size]
                prompts = [self.prefix + self.tokenizer.encode(requests[i].args[0]) for i in part]
                with self.autocast():
                    done = generate_batch(self.model, self.tokenizer, prompts, wkv_init=self.wkv_init, **kw)
                for i, c in zip(part, done):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
        return out

    def get_model_info(self) -> dict:
        c = self.model.config
        return {"model_name": getattr(c, "model_name", None), "n_layer": c.n_layer, "n_embd": c.n_embd,
                "prefix": self.prefix_name, "precision": self.precision, "state": self.wkv_init is not None}


def _plain(model, pairs, batch_size, wkv_init, autocast):
    return scoring.plain_loglikelihood(model, pairs, wkv_init=wkv_init, autocast=autocast)


def _sampling_key(gen_kwargs) -> tuple:
    """generate_batch's options for lm-eval's ``gen_kwargs`` (until, max_gen_toks, do_sample,
    temperature, top_p, top_k), as a hashable key; options we do not know are logged and ignored."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    stops = [until] if isinstance(until, str) else list(until or [])
    opts = {"max_tokens": int(kw.pop("max_gen_toks", 256)), "stop": tuple(s for s in stops if s)}
    do_sample = bool(kw.pop("do_sample", False))
    temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
    if do_sample and temperature > 0:
        opts.update(temperature=temperature, top_p=float(kw.pop("top_p", 1.0)), top_k=int(kw.pop("top_k", 0)))
    else:
        opts["temperature"] = 0.0
        kw.pop("top_p", None), kw.pop("top_k", None)
    if kw:
        log.warn(f"generation options not used by rwkvtune: {', '.join(sorted(kw))}")
    return tuple(sorted(opts.items()))
