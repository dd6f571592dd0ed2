"""jsonl formats and masks, packing into windows, the sampler, prepare_binidx and load_dataset."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rwkvtune.data.binidx import BinIdxDataset, BinIdxWriter
from rwkvtune.data.dataset import BinIdxWindows, PackedDataset, WindowSampler, load_dataset
from rwkvtune.data.formats import Sample, encode_record, read_samples
from rwkvtune.cli.data import run_prepare
from rwkvtune.data.prepare import prepare_binidx
from rwkvtune.errors import DataError
from rwkvtune.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "rwkvtune", "assets")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


# --- formats ------------------------------------------------------------------------------------
def test_text_format(tok):
    s = encode_record({"text": "Hello world"}, tok)
    assert s.tokens.tolist() == tok.encode("Hello world") + [0]
    assert s.mask.all() and s.mask.dtype == bool


def test_chat_mask_exact_positions(tok):
    s = encode_record({"messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello."}]}, tok)
    prompt = tok.encode("User: Hi\n\nAssistant:")
    reply = tok.encode(" Hello.")
    assert s.tokens.tolist() == prompt + reply + [261, 0]
    assert s.mask.tolist() == [False] * len(prompt) + [True] * (len(reply) + 1) + [False]
    assert tok.decode(s.tokens[s.mask]) == " Hello.\n\n"
    assert tok.decode(s.tokens) == "User: Hi\n\nAssistant: Hello.\n\n"
    # Literal ids, so a change in rendering cannot slip through by changing both sides.
    assert s.tokens.tolist() == [24281, 59, 3880, 261, 5585, 41693, 59, 36786, 47, 261, 0]
    assert s.mask.astype(int).tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]


def test_chat_multi_turn_with_system(tok):
    msgs = [{"role": "system", "content": " Be brief. "},
            {"role": "user", "content": "a\n\n\nb"},
            {"role": "assistant", "content": "one\n\ntwo"},
            {"role": "user", "content": "more"},
            {"role": "Assistant", "content": "three"}]
    s = encode_record({"messages": msgs}, tok)
    assert tok.decode(s.tokens) == (
        "System: Be brief.\n\nUser: a\nb\n\nAssistant: one\ntwo\n\nUser: more\n\nAssistant: three\n\n")
    assert tok.decode(s.tokens[s.mask]) == " one\ntwo\n\n three\n\n"
    assert s.tokens[-1] == 0 and not s.mask[-1] and not s.mask[0]
    # every "\n\n" that ends an assistant turn is token 261 and is a target
    ends = np.flatnonzero(s.tokens == 261)
    assert s.mask[ends].tolist() == [False, False, True, False, True]


def test_prompt_response_equals_chat(tok):
    a = encode_record({"prompt": " Q? ", "response": "A."}, tok)
    b = encode_record({"messages": [{"role": "user", "content": "Q?"},
                                    {"role": "assistant", "content": "A."}]}, tok)
    assert a.tokens.tolist() == b.tokens.tolist() and a.mask.tolist() == b.mask.tolist()


def test_auto_detect_per_line_blank_lines_and_json_array(tok, tmp_path):
    recs = [{"text": "plain"}, {"prompt": "p", "response": "r"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}]
    path = write_lines(tmp_path / "mixed.jsonl", [recs[0], "", "   ", recs[1], recs[2]])
    samples, stats = read_samples(path, tok)
    assert stats.records == 3 and stats.samples == 3 and stats.skipped == 0
    assert [s.tokens.tolist() for s in samples] == [encode_record(r, tok).tokens.tolist() for r in recs]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(recs))
    samples2, _ = read_samples(str(arr), tok)
    assert [s.tokens.tolist() for s in samples2] == [s.tokens.tolist() for s in samples]


def _read_err(tok, tmp_path, lines, name="bad.jsonl", **kw):
    path = write_lines(tmp_path / name, lines)
    with pytest.raises(DataError) as e:
        read_samples(path, tok, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("line,words", [
    ('{"text": "ok"', ["malformed JSON"]),
    # json's message ends with "at", which must not double up with our " at column"
    ('{"text": "a\tb"}', ["malformed JSON (Invalid control character at column 12)"]),
    ('[1, 2]', ["expected a JSON object", "list"]),
    ('{"txt": "x"}', ["expected a 'text', 'messages', 'prompt'+'response', 'conversations' (ShareGPT) or 'instruction'+'output' (Alpaca)", "txt"]),
    ('{"text": 5}', ["'text' must be a string", "int"]),
    ('{"text": ""}', ["'text' is empty"]),
    ('{"text": "  \\n "}', ["'text' is empty"]),
    ('{"messages": "hi"}', ["'messages' must be a list"]),
    ('{"messages": []}', ["empty list"]),
    ('{"messages": [{"role": "user", "content": "x"}]}', ["no assistant message"]),
    ('{"messages": [{"role": "bot", "content": "x"}]}', ["role", "'bot'"]),
    ('{"messages": [{"role": "assistant", "content": 3}]}', ["content must be a string"]),
    ('{"messages": [{"role": "assistant", "content": "  "}]}', ["content is empty"]),
    ('{"prompt": "x"}', ["missing field 'response'"]),
    ('{"prompt": "x", "response": null}', ["'response' must be a string", "NoneType"]),
    ('{"prompt": " ", "response": "y"}', ["'prompt' is empty"]),
])
def test_record_errors_name_file_and_line(tok, tmp_path, line, words):
    msg = _read_err(tok, tmp_path, ['{"text": "fine"}', "", line])
    assert "bad.jsonl:3:" in msg and "on_error='skip'" in msg
    for w in words:
        assert w in msg


def test_forced_format_and_unknown_format(tok, tmp_path):
    msg = _read_err(tok, tmp_path, ['{"messages": []}'], fmt="text")
    assert "bad.jsonl:1:" in msg and "missing field 'text'" in msg
    assert "unknown" in _read_err(tok, tmp_path, ['{"text": "x"}'], fmt="yaml")


def test_empty_file_and_bad_utf8(tok, tmp_path):
    msg = _read_err(tok, tmp_path, [], name="empty.jsonl")
    assert "empty.jsonl" in msg and "empty file" in msg
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        read_samples(str(p), tok)
    assert "latin.jsonl:2:" in str(e.value) and "UTF-8" in str(e.value)
    with pytest.raises(DataError) as e:
        read_samples(str(tmp_path / "nope.jsonl"), tok)
    assert "nope.jsonl" in str(e.value) and "not found" in str(e.value)


def test_vocab_size_check(tok, tmp_path):
    msg = _read_err(tok, tmp_path, ['{"text": "a"}', '{"text": "zebra crossing"}'], vocab_size=300)
    assert "bad.jsonl:2:" in msg and "vocab" in msg and "300" in msg  # "a" is id 98


def test_skip_counts_and_logs(tok, tmp_path, capsys):
    path = write_lines(tmp_path / "some.jsonl",
                       ['{"text": "a"}', '{"text": ""}', "not json", '{"text": "b"}'])
    samples, stats = read_samples(path, tok, on_error="skip")
    assert len(samples) == 2 and stats.skipped == 2 and stats.records == 4
    assert stats.skipped_examples == [f"{path}:2: 'text' is empty",
                                      f"{path}:3: malformed JSON (Expecting value at column 1)"]
    logged = capsys.readouterr().err.splitlines()  # one warning line on stderr (rwkvtune.log)
    assert len(logged) == 1 and logged[0].startswith("warning: ") and "skipped 2" in logged[0]
    assert "some.jsonl:2" in logged[0]
    assert "on_error" not in logged[0] and "fix the record" not in logged[0]  # it skips already
    # all bad -> error even when skipping
    msg = _read_err(tok, tmp_path, ["x", "y"], on_error="skip")
    assert "all 2 records" in msg and "bad.jsonl:1:" in msg
    with pytest.raises(DataError):
        read_samples(path, tok, on_error="ignore")


# --- packing ------------------------------------------------------------------------------------
def S(tokens, mask=None):
    return Sample(np.array(tokens, dtype=np.int32),
                  np.ones(len(tokens), bool) if mask is None else np.array(mask, bool))


def _labels(item):
    return item["labels"].tolist()


def test_packing_boundaries_and_long_split():
    A = S([11, 12, 0])
    B = S([21, 22, 23, 0], [0, 0, 1, 1])
    C = S(list(range(31, 41)) + [0])  # 11 tokens > ctx_len
    D = S([51, 0])
    ds = PackedDataset([A, B, C, D], ctx_len=8)
    assert len(ds) == 3
    w0, w1, w2 = ds[0], ds[1], ds[2]
    assert w0["input_ids"].tolist() == [0, 11, 12, 0, 21, 22, 23, 0]
    assert _labels(w0) == [11, 12, 0, -100, -100, 23, 0, -100]
    assert (w0["doc_id"], w0["piece_index"], w0["starts_doc"], w0["num_targets"]) == (0, 0, True, 5)
    assert w1["input_ids"].tolist() == [0, 31, 32, 33, 34, 35, 36, 37]
    assert _labels(w1) == [31, 32, 33, 34, 35, 36, 37, 38]
    assert (w1["doc_id"], w1["piece_index"], w1["starts_doc"]) == (2, 0, True)
    # the last piece continues exactly where window 1 stopped, then D fills the space
    assert w2["input_ids"].tolist() == [38, 39, 40, 0, 51, 0, 0, 0]
    assert _labels(w2) == [39, 40, 0, 51, 0, -100, -100, -100]
    assert (w2["doc_id"], w2["piece_index"], w2["starts_doc"]) == (2, 1, False)
    assert w0["input_ids"].dtype == torch.long and w0["labels"].shape == (8,)
    assert ds.num_targets == 5 + 11 + 2
    assert ds.efficiency == pytest.approx(18 / 24)


def test_packing_every_target_once_and_state_carry():
    r = np.random.default_rng(0)
    samples = []
    for _ in range(60):
        n = int(r.integers(1, 40))
        toks = list(r.integers(1, 1000, n)) + [0]
        samples.append(S(toks, r.random(n + 1) < 0.7))
    T = 16
    ds = PackedDataset(samples, T)
    got = [t for i in range(len(ds)) for t in _labels(ds[i]) if t != -100]
    want = []
    for s in samples:
        want += s.tokens[s.mask].tolist()
    assert got == want
    for i in range(1, len(ds)):
        it, prev = ds[i], ds[i - 1]
        if not it["starts_doc"]:  # continuation: the next piece of the previous window's doc
            assert it["doc_id"] == prev["doc_id"] and it["piece_index"] == prev["piece_index"] + 1
            w, _ = ds.window(i - 1)
            assert it["input_ids"][0].item() == w[-1]  # starts at the last token window i-1 saw
        else:
            assert it["input_ids"][0].item() == 0  # fresh windows start with end-of-text


def test_packing_exact_multiple_and_errors():
    ds = PackedDataset([S(list(range(1, 8)) + [0]), S([5, 0])], ctx_len=4)
    assert len(ds) == 3 and [ds[i]["piece_index"] for i in range(3)] == [0, 1, 0]
    assert ds[2]["input_ids"].tolist() == [0, 5, 0, 0]
    with pytest.raises(DataError):
        PackedDataset([], 4)
    with pytest.raises(Exception):
        PackedDataset([S([1, 0])], 0)
    with pytest.raises(IndexError):
        ds[3]


def test_binidx_windows(tmp_path):
    prefix = str(tmp_path / "w")
    docs = [[1, 2, 3, 0], [4, 5, 6, 7, 8, 9, 0], [10, 0]]
    with BinIdxWriter(prefix) as w:
        for d in docs:
            w.add_document(d)
    stream = sum(docs, [])
    ds = BinIdxWindows(prefix, ctx_len=4)
    assert len(ds) == 3  # 13 tokens -> 12 targets
    labels = [t for i in range(len(ds)) for t in _labels(ds[i]) if t != -100]
    assert labels == stream[1:]
    assert ds[0]["input_ids"].tolist() == [1, 2, 3, 0]
    assert ds[1]["input_ids"].tolist() == [4, 5, 6, 7]
    assert ds[2]["input_ids"].tolist() == [8, 9, 0, 10] and _labels(ds[2]) == [9, 0, 10, 0]
    meta = [(ds[i]["doc_id"], ds[i]["piece_index"], ds[i]["starts_doc"]) for i in range(3)]
    assert meta == [(0, 0, True), (1, 0, True), (1, 1, False)]
    with pytest.raises(DataError) as e:
        BinIdxWindows(prefix, 4, vocab_size=8)
    assert "item 1" in str(e.value)


# --- sampler ------------------------------------------------------------------------------------
def _epoch(s):
    out = []
    while True:
        out.append(s.current_batch())
        e = s.epoch
        s.advance()
        if s.epoch != e:
            return out


def test_sampler_deterministic_and_permutation():
    a, b, c = WindowSampler(50, seed=1), WindowSampler(50, seed=1), WindowSampler(50, seed=2)
    assert list(a) == list(b) and list(a) != list(c)
    assert sorted(a) == list(range(50))
    assert list(WindowSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(50))


def test_sampler_resume_mid_epoch():
    ref = WindowSampler(37, seed=3, batch_size=4)
    full = _epoch(ref) + _epoch(ref)  # 10 batches per epoch (37 wrapped to 40)
    s = WindowSampler(37, seed=3, batch_size=4)
    s.advance(5)
    state = s.state_dict()
    r = WindowSampler(37, seed=3, batch_size=4)
    r.load_state_dict(state)
    assert list(r) == sum(full[5:10], [])  # iteration yields the rest of the epoch
    assert len(r) == 20
    assert _epoch(r) == full[5:10] and r.epoch == 1
    assert _epoch(r) == full[10:]
    with pytest.raises(DataError):
        WindowSampler(38, seed=3).load_state_dict(state)


def test_sampler_ddp_shards_disjoint_and_covering():
    n, ws, bs = 23, 3, 2
    ranks = [WindowSampler(n, seed=5, rank=r, world_size=ws, batch_size=bs) for r in range(ws)]
    single = WindowSampler(n, seed=5, batch_size=bs * ws)
    seen = []
    for step in range(ranks[0].batches_per_epoch):
        parts = [r.current_batch() for r in ranks]
        flat = sum(parts, [])
        assert len(flat) == ws * bs and len(set(flat)) == len(flat)  # disjoint
        assert flat == single.current_batch()  # together: the global batch
        seen += flat
        for r in ranks + [single]:
            r.advance()
    assert set(seen) == set(range(n))  # an epoch covers every window (wrapped to fill)
    assert all(r.epoch == 1 and r.position == 0 for r in ranks)
    # iteration gives the same per-rank indices
    r0 = WindowSampler(n, seed=5, rank=1, world_size=ws, batch_size=bs)
    assert list(r0)[:bs] == r0.current_batch()


def test_sampler_resume_with_other_world_size():
    s = WindowSampler(40, seed=0, batch_size=2, world_size=2)
    s.advance(3)  # 12 samples consumed
    r = WindowSampler(40, seed=0, batch_size=4, world_size=1)
    r.load_state_dict(s.state_dict())
    assert r.position == 12 and r.current_batch() == s.order(0)[12:16].tolist()


@pytest.mark.parametrize("before,after", [((2, 1), (2, 2)), ((2, 2), (2, 1)), ((3, 1), (2, 2)), ((2, 2), (3, 1))])
def test_sampler_resumed_on_another_global_batch_skips_and_repeats_nothing(before, after):
    # (batch_size, world_size): the run is saved mid-epoch, resumed with another global batch (a
    # position that is no multiple of it too), and its epoch still visits every window exactly once
    # before the wrap-around filler; the next epoch is the usual one of the new global batch.
    n = 23
    old = [WindowSampler(n, seed=4, rank=r, world_size=before[1], batch_size=before[0]) for r in range(before[1])]
    seen = []
    for _ in range(3):
        seen += sum((s.current_batch() for s in old), [])
        for s in old:
            s.advance()
    state = old[0].state_dict()
    new = [WindowSampler(n, seed=4, rank=r, world_size=after[1], batch_size=after[0]) for r in range(after[1])]
    for s in new:
        s.load_state_dict(state)
    while new[0].epoch == 0:
        batch = sum((s.current_batch() for s in new), [])
        assert len(batch) == after[0] * after[1]  # every rank a full batch
        seen += batch
        for s in new:
            s.advance()
    assert sorted(seen[:n]) == list(range(n))  # each window once, then at most one batch of filler
    assert len(seen) - n < after[0] * after[1]
    assert new[0].position == 0 and new[0].offset == 0
    assert new[0].current_batch() == WindowSampler(n, seed=4, batch_size=after[0], world_size=after[1],
                                                    rank=0).order(1)[:after[0]].tolist()


def test_sampler_refuses_a_position_outside_the_epoch():
    state = WindowSampler(10, seed=0).state_dict()
    with pytest.raises(DataError, match="position 10 is not a place"):
        WindowSampler(10, seed=0).load_state_dict({**state, "position": 10})


def test_dataloader_integration():
    """Through torch's DataLoader, an epoch holds every window (the sampler's order, padded to whole
    batches), and the windows' targets, read in dataset order, are the source documents token for
    token."""
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 0]]
    ds = PackedDataset([S(d) for d in docs], ctx_len=4)
    order = list(WindowSampler(len(ds), seed=0, batch_size=2))
    assert set(order) == set(range(len(ds))) and len(order) % 2 == 0
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=WindowSampler(len(ds), seed=0, batch_size=2))
    rows = {}
    for batch in loader:
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[1] == 4
        for r in range(len(batch["input_ids"])):
            rows[len(rows)] = (batch["input_ids"][r], batch["labels"][r])
    assert len(rows) == len(order)
    by_index = {}
    for pos, i in enumerate(order):  # each row is the sampler's window, unchanged by the loader
        x, y = rows[pos]
        assert torch.equal(x, ds[i]["input_ids"]) and torch.equal(y, ds[i]["labels"]), (pos, i)
        by_index[i] = (x, y)
    targets = [int(t) for i in range(len(ds)) for t in by_index[i][1] if t != -100]
    assert targets == [t for d in docs for t in d]
    for x, y in by_index.values():  # a target is the next input token wherever both exist
        for t in range(len(x) - 1):
            if y[t] != -100 and (t + 1 < len(x)) and y[t + 1] != -100:
                assert int(y[t]) == int(x[t + 1])
        assert int(x[0]) == 0  # every window here starts a document: the inserted end-of-text


# --- prepare_binidx and load_dataset ------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    r = np.random.default_rng(1)
    lines = []
    for i in range(600):
        k = i % 3
        if k == 0:
            lines.append({"text": f"doc {i}: " + "中文 😀 word " * int(r.integers(1, 20))})
        elif k == 1:
            lines.append({"prompt": f"q{i}", "response": f"answer {i}\n\nmore"})
        else:
            lines.append({"messages": [{"role": "user", "content": f"u{i}"},
                                       {"role": "assistant", "content": f"a{i}"}]})
    return write_lines(d / "c.jsonl", lines)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_equals_direct_tokenization(tok, corpus, tmp_path, workers):
    prefix = str(tmp_path / "out" / "c")
    stats = prepare_binidx(corpus, prefix, tok, workers=workers, progress=False)
    samples, _ = read_samples(corpus, tok)
    assert stats.samples == 600 and stats.skipped == 0
    assert stats.tokens == sum(len(s.tokens) for s in samples)
    ds = BinIdxDataset(prefix)
    assert len(ds) == 600 and ds.dtype == np.uint16
    for i, s in enumerate(samples):
        assert ds[i].tolist() == s.tokens.tolist()
    assert sorted(os.listdir(tmp_path / "out")) == ["c.bin", "c.idx"]


def test_prepare_multiprocess_bytes_identical(tok, corpus, tmp_path):
    prepare_binidx(corpus, str(tmp_path / "a"), tok, workers=1, progress=False)
    prepare_binidx(corpus, str(tmp_path / "b"), tok, workers=2, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_errors_and_skip(tok, tmp_path, workers):
    lines = ['{"text": "a"}'] * 300 + ["{broken"] + ['{"text": "b"}'] * 300
    path = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(DataError) as e:
        prepare_binidx(path, str(tmp_path / "o"), tok, workers=workers, progress=False)
    assert "in.jsonl:301:" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no output, no temp files
    assert "on_error='skip'" in str(e.value)
    stats = prepare_binidx(path, str(tmp_path / "o"), tok, workers=workers, on_error="skip",
                           progress=False)
    assert (stats.samples, stats.skipped, stats.records) == (600, 1, 601)
    assert stats.skipped_examples == [f"{path}:301: malformed JSON (Expecting property name enclosed in double "
                                      f"quotes at column 2)"]
    assert BinIdxDataset(str(tmp_path / "o"))[300].tolist() == tok.encode("b") + [0]


def test_prepare_progress_bar_stays_within_its_total(tok, corpus, tmp_path, monkeypatch):
    import tqdm

    counted = []

    class Recorder(tqdm.tqdm):
        def update(self, n=1):
            counted.append(n)
            assert self.n + n <= self.total, (self.n, n, self.total)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    prepare_binidx(corpus, str(tmp_path / "o"), tok, workers=1, progress=True)
    # A file without blank lines is counted exactly by the per-chunk updates; the last one is 0.
    assert sum(counted) == os.path.getsize(corpus) and counted[-1] == 0


def test_prepare_empty_file(tok, tmp_path):
    path = write_lines(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError) as e:
        prepare_binidx(path, str(tmp_path / "o"), tok, workers=1, progress=False)
    assert "e.jsonl" in str(e.value) and not (tmp_path / "o.bin").exists()


def test_cli_prepare_prints_summary(corpus, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = SimpleNamespace(input=corpus, out=out, workers=1, data_format="auto", on_data_error="raise")
    assert run_prepare(args) == 0
    printed = capsys.readouterr().out
    from rwkvtune.data.binidx import BinIdxDataset

    written = BinIdxDataset(out)
    assert f"{out}.bin" in printed and f"{len(written)} documents" in printed
    assert f"{written.num_tokens} tokens" in printed


def test_load_dataset_dispatch(tok, corpus, tmp_path):
    ds = load_dataset(corpus, tok, ctx_len=64)
    assert isinstance(ds, PackedDataset) and ds[0]["input_ids"].shape == (64,)
    prefix = str(tmp_path / "p")
    prepare_binidx(corpus, prefix, tok, workers=1, progress=False)
    for p in (prefix, prefix + ".bin", prefix + ".idx"):
        assert isinstance(load_dataset(p, tok, ctx_len=64), BinIdxWindows)
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "missing"), tok, ctx_len=64)
    msg = str(e.value)
    assert "missing.idx" in msg and "missing.bin" in msg and ".jsonl" in msg


# --- shipped sample data ------------------------------------------------------------------------
def test_sample_assets_valid_and_reproducible(tok, tmp_path):
    for name, n in (("sample.jsonl", 300), ("sample_chat.jsonl", 40)):
        path = os.path.join(ASSETS, name)
        assert os.path.getsize(path) < 200_000
        samples, stats = read_samples(path, tok)
        assert stats.samples >= n and stats.skipped == 0
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_sample_data.py"),
                    "--out-dir", str(tmp_path)], check=True, capture_output=True)
    for name in ("sample.jsonl", "sample_chat.jsonl"):
        with open(os.path.join(ASSETS, name), "rb") as f:
            assert (tmp_path / name).read_bytes() == f.read()


def test_cli_data_prepare_exit_status_and_bad_outputs(corpus, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "file").write_text("x")
    cases = {
        "ok": [str(tmp_path / "ok" / "corpus"), "--workers", "1"],
        "in_file": [str(tmp_path / "file" / "corpus")],
        "workers": [str(tmp_path / "w"), "--workers", "0"],
        "dir": [str(tmp_path) + "/"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "rwkvtune", "data", "prepare", corpus, "--out", *v],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k, v in cases.items()}
    res = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    (out, err), rc = res["ok"]
    assert rc == 0 and "Traceback" not in err and "documents" in out, err
    assert os.path.isfile(tmp_path / "ok" / "corpus.bin")
    for key, words in (("in_file", f"{tmp_path / 'file'} is a file, not a directory"),
                       ("workers", "--workers: found 0, expected an integer with 1 <= --workers <= "),
                       ("dir", "expected a file prefix")):
        (_, err), rc = res[key]
        assert rc == 2 and "Traceback" not in err and words in err, (key, err)
    assert (tmp_path / "file").read_text() == "x"


def test_bad_record_error_advises_the_python_argument_and_can_be_reworded(tok, tmp_path):
    from rwkvtune.data.formats import BadRecordError

    path = write_lines(tmp_path / "b.jsonl", ['{"text": 1}'])
    with pytest.raises(BadRecordError) as e:
        read_samples(path, tok)
    # The Python API's own argument; the CLI commands reword it (tests/test_cli.py).
    assert str(e.value) == f"{path}:1: 'text' must be a string, found int; fix the record or pass " \
                           f"on_error='skip' to skip bad records"
    assert "--on" not in str(e.value)
    assert str(e.value.with_advice("do X")) == f"{path}:1: 'text' must be a string, found int; do X"
