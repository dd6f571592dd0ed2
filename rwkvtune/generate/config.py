"""SamplingConfig: the one home of the generation settings, their defaults and their checks.

Everything that needs a default (``stream_generate``, ``generate``, ``generate_batch``, ``chat``,
the single-row sampling helpers and the ``rwkvtune generate`` flags with their help texts) reads
it from here, so a default is written exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from rwkvtune.bounds import Bound, shown
from rwkvtune.errors import RwkvtuneError


class GenerationError(RwkvtuneError, ValueError):
    """Bad generation settings or inputs (sampling parameters, prompt, initial state)."""


def _field(default, help: str, cli: str | None = None):
    """A dataclass field with its CLI help text; ``cli`` is how rwkvtune.cli.generate builds the flag
    ("int", "float", "append" or "flag"; None: not a flag)."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


# The bounds of the numeric settings (see rwkvtune/bounds.py: finite, of the field's type, in
# range), with what to do and the conversion. A nan temperature or penalty would silently turn
# every logit into nan; an inf or 1e308 penalty overflows them (0 * inf) and ends the text at once;
# a seed beyond 63 bits overflows torch's generator.
MAX_SEED = 2 ** 63 - 1
_CHECKS: dict[str, tuple[Bound, str, Callable]] = {
    "max_tokens": (Bound(int, 0, 2 ** 31 - 1), "pass e.g. 200", int),
    "temperature": (Bound(float, 0, 1e4), "use 0 for greedy decoding or e.g. 1.0 to sample", float),
    "top_p": (Bound(float, 0, 1), "use 1 to turn it off", float),
    "top_k": (Bound(int, 0, 2 ** 31 - 1), "use 0 to turn it off", int),
    "presence_penalty": (Bound(float, -1e4, 1e4), "use 0 to turn it off (a penalty of 100 already bans a token)",
                         float),
    "frequency_penalty": (Bound(float, -1e4, 1e4), "use 0 to turn it off (a penalty of 100 already bans a token)",
                          float),
    "penalty_decay": (Bound(float, 0, 1, lo_open=True), "use 1 to never forget earlier tokens", float),
    "seed": (Bound(int, 0, MAX_SEED, optional=True), "pass e.g. 0, or None for a random seed",
             lambda v: None if v is None else int(v)),
}


def check_option(name: str, value):
    """``value`` converted to the option's type, or :class:`GenerationError` in one line."""
    if name == "penalize_whitespace":
        if not isinstance(value, bool):
            raise GenerationError(f"{name}: expected True or False, found {shown(value)}; pass a bool")
        return value
    bound, todo, convert = _CHECKS[name]
    if not bound.accepts(value):
        # flag=True: no "(or null ...)"; the advice says what None does where it is accepted
        raise GenerationError(f"{name}: expected {bound.expected(name, flag=True)}, found {shown(value)}; {todo}")
    return convert(value)


def _check_stop(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else stop
    try:
        stops = tuple(stops or ())
    except TypeError:
        stops = None
    if stops is None or any(not isinstance(s, str) or not s for s in stops):
        raise GenerationError(f"stop: expected a non-empty string or a list of them, found {shown(stop)}; "
                              f"pass e.g. stop=['\\n\\n']")
    return stops


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to generate: sampling settings, stopping rules and seed. Checked on construction.

    Sampling follows RWKV's usual pipeline: presence/frequency penalties on the logits (counts
    decay by ``penalty_decay`` every step), then top-p on the softmax probabilities, top-k, and
    the temperature applied to the kept probabilities (``p ** (1 / temperature)``).
    ``dataclasses.replace(cfg, temperature=0)`` makes a checked variant.
    """

    max_tokens: int = _field(200, "most tokens to generate", "int")
    temperature: float = _field(1.0, "sampling temperature; 0 = greedy", "float")
    top_p: float = _field(0.85, "nucleus sampling threshold", "float")
    top_k: int = _field(0, "keep only the k most likely tokens; 0 = off", "int")
    presence_penalty: float = _field(0.0, "subtracted from the logit of every token generated so far", "float")
    frequency_penalty: float = _field(0.0, "subtracted per (decayed) occurrence of a generated token", "float")
    penalty_decay: float = _field(0.996, "occurrence counts are multiplied by this every token", "float")
    stop: tuple[str, ...] = _field((), "stop when this text is generated (not printed); repeatable", "append")
    seed: int | None = _field(None, "random seed for reproducible sampling", "int")
    # Tokens made only of whitespace are not counted for the penalties unless this is set.
    penalize_whitespace: bool = _field(False, "count tokens made only of whitespace for the penalties", "flag")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _check_stop(self.stop) if f.name == "stop" else check_option(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: normalise in place once

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or top-k 1."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


DEFAULTS = SamplingConfig()


def resolve(sampling: SamplingConfig | None, overrides: dict) -> SamplingConfig:
    """``sampling`` (or the defaults) with keyword overrides applied and checked."""
    if sampling is None:
        sampling = DEFAULTS
    elif not isinstance(sampling, SamplingConfig):
        raise GenerationError(f"sampling: expected a SamplingConfig or None, found {type(sampling).__name__}; "
                              f"build one with SamplingConfig(temperature=..., ...)")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SamplingConfig)})
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; sampling options are "
                        f"{', '.join(f.name for f in dataclasses.fields(SamplingConfig))}")
    return dataclasses.replace(sampling, **overrides) if overrides else sampling
