"""Text generation with an RWKV-7 model: parallel prefill, then constant-work RNN decoding.

* :class:`SamplingConfig` (``config.py``): every generation setting, its default and its check.
* :func:`stream_generate` / :func:`generate` / :func:`chat` (``stream.py``): one prompt, text
  streamed piece by piece.
* ``sampling.py``: the sampling maths; ``decoding.py``: the
  CPU decode layout (:func:`prepare_for_decoding`); ``text.py``: chat format and stop strings.
"""

from rwkvtune.generate.config import DEFAULTS, GenerationError, SamplingConfig
from rwkvtune.generate.decoding import _DecodeLinear, prepare_for_decoding  # noqa: F401 (_DecodeLinear: tests)
from rwkvtune.generate.sampling import apply_penalties, sample_logits, sampling_probs, update_counts
from rwkvtune.generate.stream import GenerationStats, chat, generate, stream_generate
from rwkvtune.generate.text import CHAT_TURN_END, END_OF_TEXT, format_chat

__all__ = [
    "CHAT_TURN_END", "DEFAULTS", "END_OF_TEXT", "GenerationError", "GenerationStats",
    "SamplingConfig", "apply_penalties", "chat", "format_chat", "generate", "prepare_for_decoding",
    "sample_logits", "sampling_probs", "stream_generate", "update_counts",
]
