"""Text generation with an RWKV-7 model: parallel prefill, then constant-work RNN decoding.

* :class:`SamplingConfig` (``config.py``): every generation setting, its default and its check.
* :func:`stream_generate` / :func:`generate` / :func:`chat` (``stream.py``): one prompt, text
  streamed piece by piece; ``generate`` also takes a list of prompts and returns a list of texts.
* :func:`generate_batch` (``batch.py``): many prompts and many samples per prompt decoded
  together, returning :class:`Completion` objects (text, token ids, finish reason, log-probs).
* ``sampling.py``: the sampling maths, one row and vectorised over rows; ``rnn.py``: the batched
  one-token step with the state updated in place; ``decoding.py``: the CPU decode layout
  (:func:`prepare_for_decoding`) and few-row products; ``text.py``: chat format, stop strings.

The names below are imported lazily (PEP 562), like the package root's: the torch-free parts
(``config``, ``text``) can then be imported without torch, so ``rwkvtune generate --help`` starts
in a fraction of a second instead of importing torch first.
"""

from importlib import import_module

_EXPORTS = {
    "BatchStats": "batch", "Completion": "batch", "generate_batch": "batch",
    "DEFAULTS": "config", "GenerationError": "config", "SamplingConfig": "config",
    "_DecodeLinear": "decoding", "prepare_for_decoding": "decoding",  # _DecodeLinear: for the tests
    "apply_penalties": "sampling", "raw_logprobs": "sampling", "sample_logits": "sampling", "sample_rows": "sampling",
    "sampling_probs": "sampling", "update_counts": "sampling",
    "GenerationStats": "stream", "chat": "stream", "generate": "stream", "stream_generate": "stream",
    "CHAT_TURN_END": "text", "END_OF_TEXT": "text", "format_chat": "text",
}

__all__ = sorted(n for n in _EXPORTS if not n.startswith("_"))


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f"rwkvtune.generate.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'rwkvtune.generate' has no attribute {name!r}")


def __dir__():
    return __all__ + ["_DecodeLinear"]
