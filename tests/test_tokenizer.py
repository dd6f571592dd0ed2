"""WorldTokenizer must give exactly the ids of the rwkv package's TRIE tokenizer (the oracle)."""

import os
import pickle
import random
import subprocess
import sys

import pytest

from rwkvtune.errors import ConfigError
from rwkvtune.tokenizer import StreamDecoder, WorldTokenizer, get_tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n",
    "\n\n",
    "\n\n\n\n",
    "User: hi\n\nAssistant: Hello there.\n\n",
    "   leading and trailing   ",
    "tabs\tand\t\tmore\t\t\ttabs",
    " " * 300,
    "\r\n\r\n",
    "中文测试，这是一个句子。",
    "日本語のテキストです。カタカナもひらがなも。",
    "مرحبا بالعالم، هذا نص عربي.",
    "Ελληνικά και русский текст",
    "😀😃😄 emoji 🎉",
    "family 👨‍👩‍👧‍👦 and flag 🇯🇵 and skin 👍🏽",
    "control \x00\x01\x02\x07\x1b[0m \x7f end",
    "mixed: café naïve résumé — “quotes” ‘single’ …",
    "def f(x):\n    return x ** 2  # code\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼𝛽𝛾 and CJK ext 𠀀𠀁",
    "a" * 1000,
]

# Code point ranges for random strings: ASCII, Latin, CJK, emoji, and anything at all.
RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x4E00, 0x9FFF), (0x3040, 0x30FF),
          (0x1F300, 0x1FAFF), (0x0600, 0x06FF), (0x0, 0x10FFFF)]


def _random_text(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(1, 40)):
        lo, hi = r.choice(RANGES)
        cp = r.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:  # lone surrogates cannot be UTF-8 encoded
            cp = 0x20
        out.append(chr(cp))
    return "".join(out)


RANDOM_TEXTS = [_random_text(random.Random(1000 + i)) for i in range(300)]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def oracle():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_oracle(tok, oracle, text):
    ids = tok.encode(text)
    assert ids == oracle.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_random_unicode_matches_oracle_and_round_trips(tok, oracle):
    for text in RANDOM_TEXTS:
        ids = tok.encode(text)
        assert ids == oracle.encode(text), repr(text)
        assert tok.decode(ids) == text


def test_encode_batch_equals_encode(tok):
    texts = TEXTS + RANDOM_TEXTS[:50]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


def test_known_ids_and_constants(tok):
    assert tok.encode("\n\n") == [261]
    assert tok.vocab_size == 65536 and tok.eot_id == 0
    assert tok.id_to_bytes(0) == b""  # end of text
    assert tok.id_to_bytes(261) == b"\n\n"
    assert tok.id_to_bytes(65535) == b""  # padding id
    with pytest.raises(ValueError):
        tok.id_to_bytes(65536)
    with pytest.raises(ValueError):
        tok.decode([1, 70000])
    with pytest.raises(ValueError):
        tok.decode([1, -1])


def test_byte_table_matches_oracle(tok, oracle):
    for i in range(1, 65530):
        assert tok.id_to_bytes(i) == oracle.idx2token[i]


def test_decode_accepts_numpy_and_torch(tok):
    import numpy as np
    import torch

    ids = tok.encode("héllo 😀")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "héllo 😀"


def test_decode_of_cut_character_uses_replacement(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji is split over byte tokens
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids[:1]) == "😀".encode()[: len(tok.id_to_bytes(ids[0]))]


def _stream(tok, ids):
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, "".join(pieces) + dec.flush()


@pytest.mark.parametrize("text", [t for t in TEXTS if any(ord(c) > 127 for c in t)])
def test_stream_decoder_every_prefix(tok, text):
    ids = tok.encode(text)
    for k in range(len(ids) + 1):
        expect = tok.decode_bytes(ids[:k]).decode("utf-8", errors="replace")
        assert _stream(tok, ids[:k])[1] == expect
    pieces, full = _stream(tok, ids)
    assert full == text
    assert "\ufffd" not in "".join(pieces)  # nothing emitted before its character completed


def test_stream_decoder_emoji_split_over_tokens(tok):
    text = "ok 👨‍👩‍👧‍👦!"
    ids = tok.encode(text)
    pieces, full = _stream(tok, ids)
    assert full == text
    assert "" in pieces  # some tokens completed no character and were held back
    for p in pieces:
        p.encode("utf-8")  # every piece is whole characters


def test_stream_decoder_random(tok):
    for text in RANDOM_TEXTS[:100]:
        assert _stream(tok, tok.encode(text))[1] == text


def test_stream_decoder_flush_incomplete_tail(tok):
    dec = StreamDecoder(tok)
    ids = tok.encode("😀")
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"
    assert dec.push_many(tok.encode("ab")) == "ab"  # reusable after flush


def test_get_tokenizer_unknown_name_lists_known():
    with pytest.raises(ConfigError) as e:
        get_tokenizer("gpt2")
    assert "gpt2" in str(e.value) and "world" in str(e.value)
    assert get_tokenizer("world") is get_tokenizer("WORLD")


def test_pickle_round_trip(tok):
    t2 = pickle.loads(pickle.dumps(tok))
    assert isinstance(t2, WorldTokenizer)
    assert t2.encode("pickled 中文") == tok.encode("pickled 中文")


def test_import_is_cheap():
    code = (
        "import sys, rwkvtune.tokenizer as t; t.WorldTokenizer(); t.get_tokenizer();"
        "assert 'pyrwkv_tokenizer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
