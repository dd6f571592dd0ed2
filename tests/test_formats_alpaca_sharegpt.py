"""Alpaca and ShareGPT jsonl: auto-detected, rendered exactly as the same conversation in the chat
format (``{"messages": [...]}``), tokens and loss mask alike; bad records named by field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rwkvtune.data.formats import encode_record, read_samples
from rwkvtune.errors import DataError
from rwkvtune.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _same(a, b):
    return np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)


def _chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.mark.parametrize("fmt", ["auto", "alpaca"])
def test_alpaca_renders_as_the_chat_format(tok, fmt):
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    want = encode_record(_chat(("user", "Add the numbers.\n2 and 3"), ("assistant", "5")), tok)
    assert _same(encode_record(rec, tok, fmt), want)
    # no input (empty or missing), and a system message some exports carry
    bare = encode_record(_chat(("user", "Say hi."), ("assistant", "Hi!")), tok)
    assert _same(encode_record({"instruction": "Say hi.", "input": "", "output": "Hi!"}, tok, fmt), bare)
    assert _same(encode_record({"instruction": "Say hi.", "output": "Hi!"}, tok, fmt), bare)
    sys_rec = {"system": "Be brief.", "instruction": "Say hi.", "output": "Hi!"}
    assert _same(encode_record(sys_rec, tok, fmt),
                 encode_record(_chat(("system", "Be brief."), ("user", "Say hi."), ("assistant", "Hi!")), tok))


@pytest.mark.parametrize("fmt", ["auto", "sharegpt"])
def test_sharegpt_renders_as_the_chat_format(tok, fmt):
    turns = [("system", "You are kind."), ("human", "Hello"), ("gpt", "Hi there."), ("human", "Bye"), ("gpt", "Bye!")]
    rec = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    want = encode_record(_chat(*[(roles[f], v) for f, v in turns]), tok)
    got = encode_record(rec, tok, fmt)
    assert _same(got, want) and got.mask.any() and not got.mask.all()  # loss on the replies only


def test_a_file_of_each_is_read_whole(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n"
                    + json.dumps({"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]})
                    + "\n")
    samples, stats = read_samples(str(path), tok)
    assert stats.samples == 2 and "2 samples" in stats.summary() and "2 records" in stats.summary()


@pytest.mark.parametrize("line,words", [
    ('{"instruction": "x"}', ["missing field 'output' (format alpaca)"]),
    ('{"instruction": "x", "output": 3}', ["'output' must be a string", "int"]),
    ('{"instruction": " ", "output": "y"}', ["'instruction' is empty"]),
    ('{"instruction": "x", "input": 1, "output": "y"}', ["'input' must be a string"]),
    ('{"conversations": {}}', ["'conversations' must be a list"]),
    ('{"conversations": []}', ["'conversations' is an empty list"]),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', ["conversations[0].from must be one of", "'bot'"]),
    ('{"conversations": [{"from": "gpt", "value": 2}]}', ["conversations[0].value must be a string"]),
    ('{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]}',
     ["conversations[1].value is empty"]),
    ('{"conversations": [{"from": "human", "value": "x"}]}', ["no 'gpt' turn"]),
])
def test_bad_records_name_file_line_and_field(tok, tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_samples(str(path), tok)
    msg = str(e.value)
    assert "bad.jsonl:2:" in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
