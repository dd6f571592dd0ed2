"""RWKV World tokenizer (vocab ``rwkv_vocab_v20230424``) and a streaming decoder.

Encoding is done by the Rust ``pyrwkv_tokenizer`` package, which gives ids identical to the
reference pure-Python TRIE tokenizer of the ``rwkv`` package (greedy longest match over UTF-8
bytes) and is several times faster. Decoding is done here, from our own id -> bytes table,
because the Rust ``decode`` panics on byte sequences that are not valid UTF-8, and single tokens
often are not (an emoji is usually split over 2-4 byte-level tokens).

Both the Rust tokenizer (~1 s to build) and the id -> bytes table (~0.5 s to parse) are built
lazily on first use, so ``import rwkvtune.tokenizer`` costs nothing and a tokenizer object can be
pickled cheaply into worker processes (each worker rebuilds what it uses).
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import os
import threading
from typing import Iterable, Sequence

from rwkvtune.errors import ConfigError

VOCAB_NAME = "rwkv_vocab_v20230424"


def _default_vocab_file() -> str:
    """The vocab file shipped inside ``pyrwkv_tokenizer`` (a hard dependency).

    The ``rwkv`` package ships the same entries (with CRLF line ends); the tests check that both
    give identical ids.
    """
    spec = importlib.util.find_spec("pyrwkv_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "tokenizer: the 'pyrwkv-tokenizer' package is not installed; "
            "install it with `pip install pyrwkv-tokenizer`"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], VOCAB_NAME + ".txt")


def _parse_vocab(path: str) -> list[bytes]:
    """Parse the vocab file into a list indexed by id (65536 entries, unused ids map to b"").

    Each line is ``ID REPR LEN`` where REPR is a Python str or bytes literal; we read it with
    ``ast.literal_eval`` (never ``eval``) and check LEN against the UTF-8 byte length.
    """
    table = [b""] * WorldTokenizer.vocab_size
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, last = line.index(" "), line.rindex(" ")
            idx = int(line[:first])
            tok = ast.literal_eval(line[first + 1 : last])
            if isinstance(tok, str):
                tok = tok.encode("utf-8")
            if len(tok) != int(line[last + 1 :]) or not 0 < idx < len(table):
                raise ConfigError(
                    f"{path}:{lineno}: malformed vocab entry {line[:60]!r}; "
                    "reinstall pyrwkv-tokenizer"
                )
            table[idx] = tok
    return table


class WorldTokenizer:
    """RWKV World tokenizer.

    - ``encode(text) -> list[int]`` / ``encode_batch(texts) -> list[list[int]]``
    - ``decode(ids) -> str`` (invalid UTF-8, e.g. a cut-off emoji at the very end, becomes U+FFFD)
    - ``decode_bytes(ids) -> bytes`` (exact, never lossy)
    - ``id_to_bytes(i) -> bytes``
    - ``vocab_size = 65536``: the padded vocab size of the models. Real entries are ids 1..65529;
      id 0 is end of text (``eot_id``) and decodes to b"", as do the padding ids 65530..65535.
    """

    name = "world"
    vocab_size = 65536
    eot_id = 0

    def __init__(self, vocab_file: str | None = None):
        self.vocab_file = vocab_file
        self._rust = None
        self._table: list[bytes] | None = None
        self._lock = threading.Lock()

    # --- lazy state -----------------------------------------------------------------------------
    def _encoder(self):
        if self._rust is None:
            with self._lock:
                if self._rust is None:
                    import pyrwkv_tokenizer

                    self._rust = pyrwkv_tokenizer.WorldTokenizer(
                        self.vocab_file or _default_vocab_file()
                    )
        return self._rust

    def _bytes_table(self) -> list[bytes]:
        if self._table is None:
            with self._lock:
                if self._table is None:
                    self._table = _parse_vocab(self.vocab_file or _default_vocab_file())
        return self._table

    def __getstate__(self):
        # The Rust object cannot be pickled; workers rebuild it lazily.
        return {"vocab_file": self.vocab_file}

    def __setstate__(self, state):
        self.__init__(state["vocab_file"])

    def __repr__(self) -> str:
        return f"WorldTokenizer({VOCAB_NAME}, vocab_size={self.vocab_size})"

    # --- encoding -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        if not text:
            return []
        return list(self._encoder().encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts with the Rust batch call (it parallelises over texts).

        Never call it in a process forked from one that already called it: the Rust thread
        pool does not survive ``fork`` and the call hangs. ``encode`` has no such problem (it
        runs on the calling thread), which is why the data workers use only ``encode``.
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() expects str items, got {type(t).__name__}")
        if not texts:
            return []
        return [list(ids) for ids in self._encoder().encode_batch(texts)]

    # --- decoding -------------------------------------------------------------------------------
    def id_to_bytes(self, i: int) -> bytes:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocab [0, {self.vocab_size})")
        return self._bytes_table()[i]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes_table()
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors: one C-level conversion
            ids = ids.tolist()
        ids = list(ids)
        try:
            if ids and min(ids) < 0:  # a negative index would silently pick a table entry
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            for i in ids:  # find the offending id for a clear message
                self.id_to_bytes(i)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        # Only a sequence that is not valid UTF-8 as a whole (a token list cut inside a
        # character) produces U+FFFD; use StreamDecoder to decode incrementally without loss.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turn a stream of token ids into text, one token at a time, without corrupting characters.

    A token may end in the middle of a UTF-8 character (emoji and many CJK characters are split
    over several byte-level tokens). ``push`` returns only the text whose characters are complete
    and keeps the incomplete tail bytes until the following tokens complete them; ``flush``
    returns what is left (a tail that never completes becomes U+FFFD). Output is at code-point
    granularity: a ZWJ emoji sequence comes out code point by code point, and the concatenation of
    all outputs equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: WorldTokenizer | None = None):
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        # The stdlib incremental decoder buffers at most 3 pending bytes of an unfinished
        # character; invalid sequences are replaced, never stuck in the buffer.
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.id_to_bytes(token_id))

    def push_many(self, ids: Iterable[int]) -> str:
        return self._dec.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


_FACTORIES = {"world": WorldTokenizer, VOCAB_NAME: WorldTokenizer}
_CACHE: dict[type, WorldTokenizer] = {}


def get_tokenizer(name: str = "world") -> WorldTokenizer:
    """Return the (shared, lazily built) tokenizer called ``name``."""
    key = str(name).lower()
    if key not in _FACTORIES:
        raise ConfigError(
            f"tokenizer: unknown tokenizer {name!r}; known tokenizers: "
            f"{', '.join(sorted(_FACTORIES))}"
        )
    factory = _FACTORIES[key]
    if factory not in _CACHE:  # aliases share one instance
        _CACHE[factory] = factory()
    return _CACHE[factory]
