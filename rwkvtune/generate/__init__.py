"""Text generation with an RWKV-7 model: parallel prefill, then constant-work RNN decoding.

* :class:`SamplingConfig` (``config.py``): every generation setting, its default and its check.
* :func:`stream_generate` / :func:`generate` / :func:`chat` (``stream.py``): one prompt, text
  streamed piece by piece; ``generate`` also takes a list of prompts and returns a list of texts.
* :func:`generate_batch` (``batch.py``): many prompts and many samples per prompt decoded
  together, returning :class:`Completion` objects (text, token ids, finish reason, log-probs).
* ``sampling.py``: the sampling maths, one row and vectorised over rows; ``rnn.py``: the batched
  one-token step with the state updated in place; ``decoding.py``: the CPU decode layout
  (:func:`prepare_for_decoding`) and few-row products; ``text.py``: chat format, stop strings.
"""

from rwkvtune.generate.batch import BatchStats, Completion, generate_batch
from rwkvtune.generate.config import DEFAULTS, GenerationError, SamplingConfig
from rwkvtune.generate.decoding import _DecodeLinear, prepare_for_decoding  # noqa: F401 (_DecodeLinear: tests)
from rwkvtune.generate.sampling import (apply_penalties, raw_logprobs, sample_logits, sample_rows, sampling_probs,
                                        update_counts)
from rwkvtune.generate.stream import GenerationStats, chat, generate, stream_generate
from rwkvtune.generate.text import CHAT_TURN_END, END_OF_TEXT, format_chat

__all__ = [
    "BatchStats", "CHAT_TURN_END", "Completion", "DEFAULTS", "END_OF_TEXT", "GenerationError", "GenerationStats",
    "SamplingConfig", "apply_penalties", "chat", "format_chat", "generate", "generate_batch", "prepare_for_decoding",
    "raw_logprobs", "sample_logits", "sample_rows", "sampling_probs", "stream_generate", "update_counts",
]
