"""Reward functions for GRPO: ``--reward SPEC`` (repeatable) and their weighted sum.

Every reward function has TRL's signature, text only::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

``fields`` are the records' other fields, each a list aligned with ``prompts`` (a record
``{"prompt": ..., "answer": "72"}`` gives ``answer=[..., "72", ...]``). One float per completion.

Specs (everything after the first ``:`` is the argument, so a pattern may contain ``:``):

``exact_match:FIELD``
    1.0 if the completion's final answer equals the record's FIELD, else 0.0. The final answer of
    a text is the text after its last ``####`` if it has one; else the last number in it; else the
    whole text. Both sides are reduced this way (a GSM8K answer ``"... #### 72"`` works as it is;
    a numeric field is used as it is). When both final answers read as numbers (``72``, ``72.0``,
    ``-0.5``, ``1,234``, ``$40``, a trailing ``.``) they are compared as numbers, otherwise as
    strings with surrounding whitespace removed (case-sensitive).
``regex:PATTERN``
    1.0 if PATTERN matches anywhere in the completion (``re.search``), else 0.0. Options go inline:
    ``(?i)`` ignores case, ``(?s)`` lets ``.`` match newlines.
``format:REGEX``
    1.0 if the whole completion, stripped of leading and trailing whitespace, matches REGEX
    (``re.fullmatch`` with ``.`` matching newlines), else 0.0.
``format:@NAME``
    A named format (a pattern that must start with a literal ``@`` is written ``\\@``):
    ``@think``: ``<think>...</think>`` followed by a non-empty answer;
    ``@think_answer``: ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else.
``length_penalty:TARGET``
    0.0 for completions of at most TARGET characters, then ``-(length - TARGET) / TARGET``: -1.0
    at twice the target, growing linearly beyond. Characters, not tokens: no tokenizer needed.
``PATH.py:FUNCTION``
    FUNCTION from the Python file PATH, your own code. It is named ``STEM.FUNCTION`` in logs. The
    file's directory is not put on ``sys.path``.

In a run every function, built-in or not, runs in the reward worker process
(:mod:`rwkvtune.train.reward_worker`), which imports the user files when the run starts (a
failing import, a missing function or an import slower than ``reward_timeout`` stops there). A
function that raises, exits (``sys.exit``, ``os._exit``), hangs past ``reward_timeout`` seconds
or returns anything but one number per completion stops the run with one line naming it (and,
for a user function, its file).

:func:`compute_rewards` calls every function and sums with the weights. Numbers (booleans count as
1.0/0.0) within ``REWARD_LIMIT`` (|r| <= 1e6) are used; NaN, +-inf and larger values are
*invalid*: like TRL's None ("not applicable") they count 0 in the weighted total and are left out
of the function's mean, and GRPO logs their share as ``rewards/NAME/invalid_frac``. A function
whose every value in a call is invalid stops the run (it scores nothing). The limit keeps the
weighted sum and the advantages finite in fp32: 3e38 is a float32, twice it is inf. None, strings
and other non-numbers are refused: return 0.0 or a penalty instead.

The records' fields are passed by name, so a field may not be called like the call's own
arguments (:data:`RESERVED_FIELDS`): GRPO refuses such data before training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rwkvtune.errors import ConfigError, RwkvtuneError

BUILTINS = ("exact_match", "regex", "format", "length_penalty")
NAMED_FORMATS = {
    "think": r"<think>.*?</think>\s*\S.*",
    "think_answer": r"<think>.*?</think>\s*<answer>.*?</answer>",
}
SPEC_HELP = ("exact_match:FIELD, regex:PATTERN, format:REGEX, format:@NAME, length_penalty:TARGET or "
             "PATH.py:FUNCTION")
# The largest |reward| used: far beyond any sensible reward, and small enough that a weighted sum of
# a few of them stays finite in fp32 (max ~3.4e38), as do the advantages computed from it.
REWARD_LIMIT = 1e6
# The call's own argument names: a data field with one of these names would collide with them.
RESERVED_FIELDS = ("prompts", "completions")
# A number as people write it: sign, commas between thousands (1,234,567), decimals.
_NUM = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(_NUM)
# A final answer that is one number, allowing a leading "$" and a trailing "." ("$1,000.").
_WHOLE_NUMBER = re.compile(r"\$?\s*(" + _NUM + r")\.?")


class RewardError(RwkvtuneError, ValueError):
    """A reward function failed or returned something other than one finite number per completion."""


@dataclass(eq=False)
class RewardFunction:
    """A named reward function; ``source`` is the file of a user function (None for built-ins).

    ``fn`` is the callable when it was built in this process (built-ins); a user function is only
    imported in the worker (``fn`` None): ``worker`` is the
    :class:`~rwkvtune.train.reward_worker.RewardWorker` that runs it, once started."""

    name: str
    fn: Callable | None
    source: str | None = None
    spec: str = ""
    worker: object = None

    def __call__(self, prompts, completions, **fields):
        if self.worker is not None:
            return self.worker.call(self, list(prompts), list(completions), fields)
        if self.fn is None:
            raise RewardError(f"{self.describe()} is not loaded: user functions run in a reward worker; start one "
                              f"with rwkvtune.train.reward_worker.start_rewards")
        return self.fn(prompts, completions, **fields)

    def describe(self) -> str:
        return f"reward {self.name!r}" + (f" (from {self.source})" if self.source else "")


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ---- final answers -------------------------------------------------------------------------------


def final_answer(text: str) -> str:
    """The text after the last "####"; else the last number; else the whole text (stripped)."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    numbers_found = _NUMBER.findall(text)
    return numbers_found[-1] if numbers_found else text.strip()


def _as_number(answer) -> float | None:
    if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
        return float(answer)
    m = _WHOLE_NUMBER.fullmatch(str(answer).strip())
    return float(m.group(1).replace(",", "")) if m else None


def answers_match(completion: str, expected) -> bool:
    """exact_match's comparison of a completion with a field value (see the module docstring)."""
    got = final_answer(completion)
    want = expected if isinstance(expected, numbers.Real) and not isinstance(expected, bool) \
        else final_answer(str(expected))
    a, b = _as_number(got), _as_number(want)
    if a is not None and b is not None:
        return a == b
    return got.strip() == str(want).strip()


# ---- built-ins -----------------------------------------------------------------------------------


def _exact_match(field: str) -> Callable:
    def exact_match(prompts, completions, **fields):
        if field not in fields:
            raise RewardError(f"the records have no field {field!r} (fields: {', '.join(sorted(fields)) or 'none'}); "
                              f"add it to the data or change the spec")
        values = fields[field]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise RewardError(f"record {missing[0]} of this batch has no value for field {field!r}; every record "
                              f"needs one")
        return [1.0 if answers_match(c, v) else 0.0 for c, v in zip(completions, values)]
    return exact_match


def _compile(spec: str, pattern: str, flags: int = 0) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(f"--reward {spec!r}: invalid regular expression {pattern!r} ({e}); fix the pattern "
                          f"(escape special characters with \\)") from e


def _regex(spec: str, pattern: str) -> Callable:
    rx = _compile(spec, pattern)
    return lambda prompts, completions, **fields: [1.0 if rx.search(c) else 0.0 for c in completions]


def _format(spec: str, pattern: str) -> Callable:
    if pattern.startswith("@"):
        if pattern[1:] not in NAMED_FORMATS:
            raise ConfigError(f"--reward {spec!r}: unknown named format {pattern!r}; named formats: "
                              f"{', '.join('@' + n for n in NAMED_FORMATS)} (a regex starting with a literal @ is "
                              f"written \\@)")
        pattern = NAMED_FORMATS[pattern[1:]]
    rx = _compile(spec, pattern, re.DOTALL)
    return lambda prompts, completions, **fields: [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]


def _length_penalty(spec: str, target_text: str) -> Callable:
    # ASCII digits, at most 9 ("²".isdigit() is true, and int() refuses it or 5000 digits)
    if not re.fullmatch(r"[0-9]{1,9}", target_text) or int(target_text) < 1:
        raise ConfigError(f"--reward {spec!r}: length_penalty needs a target length in characters, an integer >= 1, "
                          f"found {target_text!r}; e.g. length_penalty:1000")
    target = int(target_text)
    return lambda prompts, completions, **fields: [-max(0, len(c) - target) / target for c in completions]


# ---- user functions ------------------------------------------------------------------------------


def _user_spec(spec: str) -> tuple[Path, str]:
    """(the file, the function name) of ``PATH.py:FUNCTION``, checked without running the file."""
    path_text, _, func_name = spec.rpartition(":")
    path = Path(path_text).expanduser().resolve()
    if not func_name.isidentifier():
        raise ConfigError(f"--reward {spec!r}: {func_name!r} is not a Python function name; give PATH.py:FUNCTION")
    if not path.is_file():
        raise ConfigError(f"--reward {spec!r}: file {path} not found; give PATH.py:FUNCTION with an existing file")
    return path, func_name


def load_user_function(spec: str) -> Callable:
    """Import the file of ``PATH.py:FUNCTION`` (in this process) and return the function. The
    reward worker calls this; the trainer's process never runs a user file."""
    path, func_name = _user_spec(spec)
    # A private module name per file, registered while it runs (dataclasses and pickling look it up).
    module_name = f"rwkvtune_user_reward_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ConfigError(f"--reward {spec!r}: importing {path} raised {type(e).__name__}: {_one_line(e)}; fix that "
                          f"file") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                       and v.__module__ == module_name)
        what = "defines no" if fn is None else "has a non-callable"
        raise ConfigError(f"--reward {spec!r}: {path} {what} {func_name!r}; functions defined there: "
                          f"{', '.join(found) or 'none'}")
    return fn


# ---- parsing -------------------------------------------------------------------------------------


def parse_reward(spec: str) -> RewardFunction:
    """One ``--reward`` spec -> a :class:`RewardFunction` (syntax in the module docstring). A
    built-in is built here; a user file is only checked to exist (it is imported by the worker)."""
    kind, sep, arg = spec.partition(":")
    if kind in BUILTINS:
        return RewardFunction(spec, build_reward(spec), spec=spec)
    path_text, _, func_name = spec.rpartition(":")
    if path_text.endswith(".py") and func_name:
        path, func_name = _user_spec(spec)
        return RewardFunction(f"{path.stem}.{func_name}", None, str(path), spec=spec)
    raise ConfigError(f"--reward {spec!r}: not a reward spec; expected {SPEC_HELP}")


def build_reward(spec: str) -> Callable:
    """The callable of a spec: a built-in's function, or a user file's function (imported here)."""
    kind, sep, arg = spec.partition(":")
    if kind in BUILTINS:
        if not arg:
            raise ConfigError(f"--reward {spec!r}: {kind} needs an argument after ':'; expected {SPEC_HELP}")
        build = {"exact_match": lambda: _exact_match(arg), "regex": lambda: _regex(spec, arg),
                 "format": lambda: _format(spec, arg), "length_penalty": lambda: _length_penalty(spec, arg)}[kind]
        return build()
    return load_user_function(spec)


def reserved_field_problem(fields, where: str) -> str | None:
    """A message if a field of the records is named like an argument of the reward call."""
    clash = [k for k in fields if k in RESERVED_FIELDS]
    if not clash:
        return None
    return (f"{where}: field {clash[0]!r} has the name of an argument every reward function is called with "
            f"(fn({', '.join(RESERVED_FIELDS)}, **fields)); rename that field in the data (and in your reward "
            f"functions)")


def parse_rewards(specs) -> list[RewardFunction]:
    """Every ``--reward`` spec, in order; at least one, no name twice."""
    if not specs:
        raise ConfigError(f"--reward: at least one reward function is needed, found none; give --reward "
                          f"{SPEC_HELP.split(', ')[0]} (repeatable)")
    funcs = [parse_reward(s) for s in specs]
    names = [f.name for f in funcs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--reward: {', '.join(repr(n) for n in twice)} given twice; give each reward once (use "
                          f"reward_weights to weigh it)")
    return funcs


# ---- computing -----------------------------------------------------------------------------------


def reward_values(out, n: int) -> list[float]:
    """A function's output as n floats (finite or not: see compute_rewards), else a RewardError
    whose message ("returned ...") follows the function's name."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # a tensor or an array
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"returned {type(out).__name__}, expected a list of {n} numbers (one per completion)")
    if len(out) != n:
        raise RewardError(f"returned {len(out)} values for {n} completions; return one number per completion")
    values = []
    for i, v in enumerate(out):
        if not isinstance(v, numbers.Real):
            raise RewardError(f"returned {v!r} ({type(v).__name__}) for completion {i}, expected a number; return "
                              f"0.0 (or a penalty) for completions it cannot score")
        values.append(float(v))
    return values


def _describe(func) -> str:
    return func.describe() if isinstance(func, RewardFunction) else f"reward {getattr(func, '__name__', func)!r}"


def _check_inputs(funcs, weights, prompts, completions, fields) -> list[float]:
    if not funcs:
        raise ConfigError("compute_rewards: no reward functions; give at least one --reward")
    if weights is None:
        weights = [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(f"reward_weights: expected {len(funcs)} weights (one per --reward), found {len(weights)}; "
                          f"give one weight per reward function, in the same order")
    if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ConfigError(f"reward_weights: found {list(weights)}, expected finite numbers")
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(f"compute_rewards: {len(prompts)} prompts for {n} completions; pass one prompt per "
                          f"completion (repeat a prompt for each of its generations)")
    problem = reserved_field_problem(fields, "compute_rewards")
    if problem:
        raise RewardError(problem)
    for key, values in fields.items():
        if len(values) != n:
            raise RewardError(f"compute_rewards: field {key!r} has {len(values)} values for {n} completions; align "
                              f"every field with the prompts")
    return [float(w) for w in weights]


def _column(func, prompts, completions, fields) -> list[float]:
    """One function's values: through its worker, or called here (a plain callable)."""
    if isinstance(func, RewardFunction) and func.worker is not None:
        return func(prompts, completions, **fields)  # the worker names the function in its errors
    try:
        out = func(list(prompts), list(completions), **fields)
    except Exception as e:
        raise RewardError(f"{_describe(func)} failed: {type(e).__name__}: {_one_line(e)}") from e
    try:
        return reward_values(out, len(completions))
    except RewardError as e:
        raise RewardError(f"{_describe(func)} {e}") from e


def compute_rewards(funcs, weights, prompts: list[str], completions: list[str],
                    fields: dict[str, list] | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Run every reward function; returns ``(total [N], per_function [N, F])`` (fp32).

    ``total = per_function @ weights`` over the valid values; ``weights`` None means 1.0 each
    (TRL's default), otherwise one per function. An invalid value (NaN, +-inf, |r| > REWARD_LIMIT)
    is NaN in ``per_function`` and counts 0 in ``total``. A function that raises, returns another
    length than N, returns non-numbers or only invalid values stops with a :class:`RewardError`
    naming it (and its file).
    """
    # torch here, not at the top: the reward worker imports this module and must start without it.
    import torch

    fields = dict(fields or {})
    w = _check_inputs(funcs, weights, prompts, completions, fields)
    columns = [_column(func, prompts, completions, fields) for func in funcs]
    per = torch.tensor(columns, dtype=torch.float64).reshape(len(funcs), len(completions)).T
    valid = per.isfinite() & (per.abs() <= REWARD_LIMIT)
    for j, func in enumerate(funcs):
        if len(completions) and not valid[:, j].any():
            raise RewardError(f"{_describe(func)} returned no usable reward for any of the {len(completions)} "
                              f"completions (e.g. {columns[j][0]!r} for completion 0): every value was NaN, +-inf or "
                              f"beyond +-{REWARD_LIMIT:g}; return finite rewards within +-{REWARD_LIMIT:g}")
    per = per.where(valid, torch.full_like(per, float("nan")))
    total = per.nan_to_num(0.0) @ torch.tensor(w, dtype=torch.float64)
    if not bool((total.abs() <= torch.finfo(torch.float32).max).all()):
        raise RewardError(f"reward_weights {w}: the weighted sum of the rewards overflows fp32 (rewards are within "
                          f"+-{REWARD_LIMIT:g}); use smaller weights")
    return total.float(), per.float()
