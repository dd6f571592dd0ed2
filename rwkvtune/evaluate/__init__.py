"""Benchmark evaluation through EleutherAI's lm-evaluation-harness (``pip install "rwkvtune[eval]"``).

* ``scoring.py``: the RNN-shaped maths (torch only): each distinct context runs once and its
  continuations are scored from its state; rows of different lengths run together without
  padding; documents are scored in one pass (perplexity without windows).
* ``lm.py``: :class:`~rwkvtune.evaluate.lm.RwkvLM`, lm-eval's ``LM`` API (``loglikelihood``,
  ``loglikelihood_rolling``, ``generate_until``) over ``scoring.py`` and
  :func:`rwkvtune.generate.generate_batch`, registered with lm-eval as ``"rwkvtune"``.
* ``harness.py``: task names (suites such as ``rwkv7-paper``, our own task folder, ``--include-path``),
  one-line errors for unknown tasks and data sets that are not on this machine, running
  ``simple_evaluate``, and result tables (one model, or tasks x models).
* ``tasks/``: lm-eval task definitions made for rwkvtune (tiny, offline, shipped with the package).

This package imports configs/models/peft/generate, never train (train imports it for
``eval_tasks``). lm-eval itself is imported only inside ``lm.py`` and ``harness.py``'s functions,
so ``import rwkvtune`` and every other command work without it.
"""

from __future__ import annotations

import importlib.util

from rwkvtune.errors import ConfigError

LM_EVAL_MISSING = ("{what} needs lm-evaluation-harness, which is not installed: pip install \"rwkvtune[eval]\" "
                   "(or pip install lm-eval)")


def require_lm_eval(what: str = "rwkvtune eval --tasks") -> None:
    """One-line :class:`ConfigError` when the lm-eval package is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(LM_EVAL_MISSING.format(what=what))
