"""Generation: SamplingConfig, sampling maths, greedy exactness, stop strings, streaming, state tuning, chat, CLI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from helpers import write_checkpoint
from rwkvtune.generate import (GenerationError, GenerationStats, SamplingConfig, apply_penalties, chat, format_chat,
                               generate, prepare_for_decoding, sample_logits, sampling_probs, stream_generate,
                               update_counts)
from rwkvtune.models.rwkv7.model import RWKV7
from rwkvtune.tokenizer import get_tokenizer

V = 65536  # the World tokenizer's padded vocab, so real prompts fit the tiny model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; also avoids OpenMP spin-waits on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("gen") / "tiny.pth", n_layer=2, n_embd=32, head_size=16,
                            vocab=V, d_decay=8, d_aaa=8, d_mv=4, d_gate=8, seed=11)


@pytest.fixture(scope="module")
def model(ckpt):
    return RWKV7.from_checkpoint(ckpt)


class Scripted(torch.nn.Module):
    """A fake model whose next token is scripted: the prompt's logits pick script[0], and so on.
    Its "state" counts the tokens generated so far; after the script it emits token 0."""

    def __init__(self, script):
        super().__init__()
        self.script = list(script)
        self.calls = []

    def forward(self, idx, state=None, return_state=False, wkv_init=None, last_only=False):
        self.calls.append(idx.shape[1])
        n = 0 if state is None else state + 1
        logits = torch.zeros(1, idx.shape[1], V)
        logits[0, -1, self.script[n] if n < len(self.script) else 0] = 50.0
        return logits, n


# ----------------------------------------------------------------------------- SamplingConfig
def test_sampling_config_defaults_and_overrides(tok):
    c = SamplingConfig()
    assert (c.max_tokens, c.temperature, c.top_p, c.top_k, c.presence_penalty, c.frequency_penalty,
            c.penalty_decay, c.stop, c.seed, c.penalize_whitespace) == (200, 1.0, 0.85, 0, 0.0, 0.0, 0.996, (), None,
                                                                        False)
    c = SamplingConfig(temperature=1, top_k=3, stop="END", seed=5)
    assert type(c.temperature) is float and c.stop == ("END",) and (c.top_k, c.seed) == (3, 5)
    # keyword arguments override the given config (here: temperature 0 over a sampling config)
    script = tok.encode("one two")
    base = SamplingConfig(temperature=2.0, max_tokens=1)
    st = GenerationStats()
    generate(Scripted(script), tok, "x", base, temperature=0, max_tokens=5, stats=st)
    assert st.tokens == script
    with pytest.raises(TypeError, match="temprature"):
        generate(Scripted(script), tok, "x", temprature=0)
    with pytest.raises(GenerationError, match="^sampling: expected a SamplingConfig"):
        generate(Scripted(script), tok, "x", {"temperature": 0})


@pytest.mark.parametrize("name, value", [
    ("temperature", float("nan")), ("temperature", -0.5), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", float("nan")), ("top_p", 1.5), ("top_p", -0.1),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("presence_penalty", float("nan")), ("frequency_penalty", float("inf")), ("frequency_penalty", None),
    ("penalty_decay", 0.0), ("penalty_decay", 1.5), ("penalty_decay", float("nan")),
    ("max_tokens", -1), ("max_tokens", 3.0),
    ("seed", 1.5), ("seed", "7"),
    ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5),
])
def test_sampling_config_refuses_bad_values(tok, name, value):
    with pytest.raises(GenerationError) as e:
        SamplingConfig(**{name: value})
    msg = str(e.value)
    assert msg.startswith(f"{name}: expected ") and repr(value) in msg and "\n" not in msg
    m = Scripted(tok.encode("a"))  # the same check guards the keyword overrides, before any forward
    with pytest.raises(GenerationError, match=f"^{name}: "):
        generate(m, tok, "x", **{name: value})
    assert m.calls == []


# ------------------------------------------------------------------------------ sampling maths
def test_sampling_probs_top_p_top_k_temperature():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=1.0), p)
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    # cumulative 0.5, 0.8, 0.95: the first to reach 0.85 is the third token, which is kept
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=0.85), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=0.0), torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    sq = p ** 2 / (p ** 2).sum()  # temperature 0.5: p ** 2, renormalised
    torch.testing.assert_close(sampling_probs(logits, 0.5, top_p=1.0), sq)
    # top-p is applied to the untempered probabilities (RWKV order), then the temperature
    kept = torch.tensor([0.5, 0.3, 0, 0]) ** 2
    torch.testing.assert_close(sampling_probs(logits, 0.5, top_p=0.7), kept / kept.sum())


def test_sample_logits_greedy_and_distribution():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample_logits(logits, temperature=0) == 1
    assert sample_logits(logits, temperature=1.0, top_k=1) == 1
    assert sample_logits(logits, temperature=5.0, top_p=0.0) == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_logits(logits, 1.0, top_p=1.0, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.03, rtol=0)
    a = [sample_logits(logits, 1.0, generator=torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1
    for bad in (dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2), dict(top_k=1.5)):
        with pytest.raises(GenerationError):
            sample_logits(logits, **{"temperature": 1.0, **bad})


def test_penalty_math():
    logits = torch.zeros(6)
    counts = torch.zeros(6)
    for t in (2, 2, 4):
        update_counts(counts, t, penalty_decay=0.5)
    torch.testing.assert_close(counts, torch.tensor([0, 0, 0.75, 0, 1.0, 0]))  # (1*.5+1)*.5, 1
    out = apply_penalties(logits, counts, presence_penalty=0.4, frequency_penalty=0.2)
    torch.testing.assert_close(out, torch.tensor([0, 0, -(0.4 + 0.2 * 0.75), 0, -(0.4 + 0.2), 0]))
    assert apply_penalties(logits, counts) is logits
    update_counts(counts, 1, penalty_decay=1.0, count_token=False)
    assert counts[1] == 0


# --------------------------------------------------------------------------- real tiny model
def test_greedy_equals_full_sequence_argmax(model, tok):
    prompt = "The quick brown fox"
    stats = GenerationStats()
    text = generate(model, tok, prompt, max_tokens=12, temperature=0, stats=stats)
    ids = tok.encode(prompt)
    manual = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([ids + manual]))[0, -1].argmax())  # whole sequence every step
            if nxt == 0:
                break
            manual.append(nxt)
    assert stats.tokens == manual and len(manual) > 0
    assert text == tok.decode(manual)
    assert stats.prompt_tokens == len(ids) and stats.generated_tokens == len(manual)


def test_prepare_for_decoding_keeps_values(ckpt, tok, tmp_path):
    m = RWKV7.from_checkpoint(ckpt)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    idx = torch.tensor([tok.encode("Some text to run")])
    with torch.no_grad():
        ref, ref_state = m(idx, return_state=True)
        ref_step = m(idx[:, :1], state=ref_state)
    prepare_for_decoding(m)
    assert not m.head.weight.is_contiguous() and m.head.weight.shape == (V, 32)
    assert m.blocks[0].ffn.value.weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with torch.no_grad():
        out, state = m(idx, return_state=True)
        step = m(idx[:, :1], state=state)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(step, ref_step, atol=1e-5, rtol=0)
    m.save_checkpoint(tmp_path / "p.pth", dtype=torch.float32)
    saved = torch.load(tmp_path / "p.pth", weights_only=True)
    assert all(v.is_contiguous() and torch.equal(v, before[k]) for k, v in saved.items())


def test_decode_linear_threaded_product(ckpt, tok):
    """The threaded one-row product and the column-block product for 2..64 rows (2+ threads) equal
    F.linear up to fp32 rounding; with autograd on it is F.linear itself."""
    from rwkvtune.generate import _DecodeLinear

    m = RWKV7.from_checkpoint(ckpt)
    idx = torch.tensor([tok.encode("Some text to run")])
    with torch.no_grad():
        ref = m(idx)
        _, st = m(idx[:, :-1], return_state=True)
        ref_step = m(idx[:, -1:], state=st)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prepare_for_decoding(m)
        assert isinstance(m.head, _DecodeLinear) and not m.blocks[0].ffn.value.weight.is_contiguous()
        lin = m.blocks[1].att.key
        x = torch.randn(1, 1, lin.in_features)
        with torch.no_grad():
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight), atol=1e-5, rtol=1e-5)
        y = lin(x)  # grad enabled: plain F.linear
        assert torch.equal(y, torch.nn.functional.linear(x, lin.weight))
        # 2..64 rows (batched decoding): oneDNN where it works, else the column-block product;
        # neither calls F.linear
        import rwkvtune.generate.decoding as dec

        for probed in ([dec._onednn_linear()], [None]) if dec._onednn_linear() else ([None],):
            dec._ONEDNN[:] = probed
            for layer in (m.head, lin, m.blocks[0].ffn.value):
                for shape in ((5, layer.in_features), (3, 1, layer.in_features), (64, layer.in_features)):
                    xs = torch.randn(*shape)
                    want = torch.nn.functional.linear(xs, layer.weight)
                    linear, dec.F.linear = dec.F.linear, None
                    try:
                        with torch.no_grad():
                            got = layer(xs)
                    finally:
                        dec.F.linear = linear
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        dec._ONEDNN.clear()
        with torch.no_grad():
            out = m(idx)
            _, st = m(idx[:, :-1], return_state=True)
            step = m(idx[:, -1:], state=st)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, ref_step, atol=1e-4, rtol=1e-4)


def test_decoding_is_one_token_per_forward(tok):
    m = Scripted(tok.encode("abc def ghi"))
    generate(m, tok, "hello there", max_tokens=10, temperature=0)
    assert m.calls[0] == len(tok.encode("hello there")) and set(m.calls[1:]) == {1}


def test_seed_reproducible_and_top_k_1_is_greedy(model, tok):
    kw = dict(max_tokens=10, temperature=1.0, top_p=1.0)
    a = GenerationStats(), GenerationStats(), GenerationStats()
    generate(model, tok, "Hi", seed=1, stats=a[0], **kw)
    generate(model, tok, "Hi", seed=1, stats=a[1], **kw)
    generate(model, tok, "Hi", seed=2, stats=a[2], **kw)
    assert a[0].tokens == a[1].tokens and a[0].tokens != a[2].tokens
    greedy, topk = GenerationStats(), GenerationStats()
    generate(model, tok, "Hi", max_tokens=8, temperature=0, stats=greedy)
    generate(model, tok, "Hi", max_tokens=8, temperature=1.0, top_k=1, seed=3, stats=topk)
    assert greedy.tokens == topk.tokens


def test_presence_penalty_prevents_repeats(model, tok):
    stats = GenerationStats()
    generate(model, tok, "a", max_tokens=40, temperature=0, presence_penalty=1e4, stats=stats)
    counted = [t for t in stats.tokens if tok.id_to_bytes(t).strip()]
    assert len(counted) == len(set(counted))


def test_wkv_init_changes_output_and_equals_state(model, tok):
    c = model.config
    w = torch.randn(c.n_layer, c.n_head, c.head_size_a, c.head_size_a, generator=torch.Generator().manual_seed(0))
    kw = dict(max_tokens=10, temperature=0)
    plain, tuned, via_state = GenerationStats(), GenerationStats(), GenerationStats()
    generate(model, tok, "Hello", stats=plain, **kw)
    generate(model, tok, "Hello", wkv_init=w, stats=tuned, **kw)
    state = model.zero_state(1)
    state.wkv[:] = w[:, None]
    generate(model, tok, "Hello", state=state, stats=via_state, **kw)
    assert tuned.tokens == via_state.tokens and tuned.tokens != plain.tokens
    with pytest.raises(GenerationError, match="another model"):
        generate(model, tok, "Hello", wkv_init=w[:, :1], **kw)


def test_continue_from_state(model, tok):
    """Generating after "ab" given the state of "a" equals generating after "ab" from scratch."""
    ids = tok.encode("Once upon a time")
    with torch.no_grad():
        _, state = model(torch.tensor([ids[:2]]), return_state=True)
    s1, s2 = GenerationStats(), GenerationStats()
    generate(model, tok, ids[2:], state=state, max_tokens=6, temperature=0, stats=s1)
    generate(model, tok, ids, max_tokens=6, temperature=0, stats=s2)
    assert s1.tokens == s2.tokens


# -------------------------------------------------------------------------- scripted tokens
def test_stop_strings_never_emitted(tok):
    text = "Hello STAR world STOP here"
    pieces = list(stream_generate(Scripted(tok.encode(text)), tok, "x", temperature=0, stop=["STOP"]))
    assert "".join(pieces) == "Hello STAR world "
    assert not any("STOP" in p for p in pieces)
    # a stop string spanning several tokens; the earliest of several stops wins
    st = GenerationStats()
    out = generate(Scripted(tok.encode(text)), tok, "x", temperature=0, stop=["here", "d ST"], stats=st)
    assert out == "Hello STAR worl" and st.finish_reason == "stop"
    # no stop: everything, ending at token 0 (the script's end)
    st = GenerationStats()
    assert generate(Scripted(tok.encode(text)), tok, "x", temperature=0, stop="zzz", stats=st) == text
    assert st.finish_reason == "eot"
    # a held-back prefix of a stop string is released at the end
    assert generate(Scripted(tok.encode("abc ST")), tok, "x", temperature=0, stop=["STOP"]) == "abc ST"


def test_max_tokens(tok):
    ids = tok.encode("one two three four five six")
    st = GenerationStats()
    out = generate(Scripted(ids), tok, "x", max_tokens=3, temperature=0, stats=st)
    assert out == tok.decode(ids[:3]) and st.generated_tokens == 3 and st.finish_reason == "length"
    m = Scripted(ids)
    assert generate(m, tok, "x", max_tokens=0) == "" and m.calls == [1]
    with pytest.raises(GenerationError):
        generate(m, tok, "x", max_tokens=-1)


def test_multibyte_characters_stream_whole(tok):
    text = "héllo 😀 wörld 你好 🇫🇷!"
    ids = tok.encode(text)
    # emit the text byte-token by byte-token so every multibyte character is split
    byte_ids = [next(i for i in range(1, 257) if tok.id_to_bytes(i) == bytes([b])) for b in text.encode()]
    for script in (ids, byte_ids):
        pieces = list(stream_generate(Scripted(script), tok, "x", temperature=0))
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_empty_prompt_starts_from_end_of_text(tok):
    m = Scripted(tok.encode("hi"))
    assert generate(m, tok, "", temperature=0) == "hi" and m.calls[0] == 1


def test_stream_callback(tok):
    got = []
    out = generate(Scripted(tok.encode("a b c")), tok, "x", temperature=0, stream=got.append)
    assert "".join(got) == out == "a b c" and len(got) >= 3


# ---------------------------------------------------------------------------------- chat
def test_format_chat():
    assert format_chat("hi") == "User: hi\n\nAssistant:"
    assert format_chat("a\n\nb\n\n\nc\r\n\r\nd ") == "User: a\nb\nc\nd\n\nAssistant:"
    assert format_chat("q2", history=[("q1", "a1\n\nmore")], system="Be brief.") == (
        "System: Be brief.\n\nUser: q1\n\nAssistant: a1\nmore\n\nUser: q2\n\nAssistant:")
    hist = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert format_chat("q2", history=hist) == "User: q1\n\nAssistant: a1\n\nUser: q2\n\nAssistant:"
    with pytest.raises(GenerationError, match="role"):
        format_chat("q", history=[{"role": "bot", "content": "x"}])


def test_chat_stops_at_turn_end(tok):
    m = Scripted(tok.encode(" Hello there!\n\nUser: more"))
    assert chat(m, tok, "Hi", temperature=0) == "Hello there!"


# ----------------------------------------------------------------------- batched generation
class BatchScripted(torch.nn.Module):
    """A fake batched model: each row follows the script chosen by its prompt's last token, then
    emits token 0. The state (an RWKV7State, so rows stack and drop like the real one) carries
    the script key and the step per row. ``calls`` records (B, T) of every forward."""

    def __init__(self, scripts: dict[int, list[int]]):
        super().__init__()
        self.scripts = scripts
        self.calls = []

    def forward(self, idx, state=None, return_state=False, wkv_init=None, last_only=False):
        from rwkvtune.models.rwkv7.model import RWKV7State

        B, T = idx.shape
        self.calls.append((B, T))
        if state is None:
            key, n = idx[:, -1].float(), torch.zeros(B)
        else:
            key, n = state.att_x_prev[0, :, 0], state.att_x_prev[0, :, 1] + 1
        logits = torch.zeros(B, 1, V)
        for b in range(B):
            script = self.scripts[int(key[b])]
            logits[b, 0, script[int(n[b])] if n[b] < len(script) else 0] = 50.0
        new = RWKV7State(torch.stack([key, n], -1)[None], torch.zeros(1, B, 1, 1, 1), torch.zeros(1, B, 1))
        return logits, new


@pytest.fixture(scope="module")
def sharp_model(ckpt):
    """The tiny model with its head scaled by 8: logits of std ~8, so the top two logits of every
    step are far apart compared with the fp32 rounding differences between a batched and a
    one-row matmul (about 1e-6 relative). Greedy comparisons then cannot flip on a near tie."""
    m = RWKV7.from_checkpoint(ckpt)
    with torch.no_grad():
        m.head.weight.mul_(8.0)
    return m


def _counting(model):
    """(B, T) of every pass through a real model, prefill or decode step: a hook on the embedding,
    which every pass (model.forward or the batched decode step) starts with."""
    calls = []
    model.emb.register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape[:-1]) if out.dim() == 3
                                                                        else (out.shape[0], 1)))
    return calls


def test_sample_rows_draws_the_sampling_probs_distribution():
    """The vectorised sampler (topk threshold, rejection for top-p, sorted fallback) draws from the
    distribution sampling_probs computes by sorting, row by row; excluded tokens never come."""
    from rwkvtune.generate import sample_rows
    from rwkvtune.generate.sampling import UNIFORMS_PER_ROW

    p = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04], [0.02, 0.08, 0.1, 0.2, 0.3, 0.3]])
    n = 20000
    logits = p.log().repeat(n, 1)  # rows alternate between the two distributions
    g = torch.Generator().manual_seed(0)
    for kw in (dict(temperature=1.0, top_p=1.0), dict(temperature=1.0, top_p=0.7), dict(temperature=2.0, top_p=0.5),
               dict(temperature=0.7, top_p=0.9, top_k=3), dict(temperature=50.0, top_p=0.3),
               dict(temperature=1.0, top_p=0.0)):
        cfg = SamplingConfig(**kw)
        tokens = sample_rows(logits, cfg, torch.rand(2 * n, UNIFORMS_PER_ROW, generator=g))
        for row in (0, 1):
            freq = torch.bincount(tokens[row::2], minlength=6).float() / n
            want = sampling_probs(p[row].log(), **kw)
            torch.testing.assert_close(freq, want, atol=0.015, rtol=0, msg=f"{kw} row {row}")
            assert (freq[want == 0] == 0).all(), (kw, row, freq)
    assert sample_rows(logits[:2], SamplingConfig(temperature=0), None).tolist() == [0, 4]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_batch_decoder_step_equals_model_forward(ckpt, tok, dtype, tol):
    """The in-place batched decode step gives the logits and the state of RWKV7.forward, step after
    step, also after rows are dropped; in bf16 within bf16 rounding."""
    from rwkvtune.generate.rnn import BatchDecoder
    from rwkvtune.models.rwkv7.model import RWKV7State

    m = RWKV7.from_checkpoint(ckpt, dtype=dtype)
    states = []
    with torch.no_grad():
        for p in ("Hello there", "A", "Three different prompts"):
            states.append(m(torch.tensor([tok.encode(p)]), return_state=True)[1])
    ref = RWKV7State(*(torch.cat([getattr(s, f) for s in states], 1) for f in ("att_x_prev", "wkv", "ffn_x_prev")))
    dec = BatchDecoder(m, ref.clone())
    tokens = torch.tensor([11, 22, 33])
    for step in range(5):
        if step == 3:
            dec.keep(torch.tensor([0, 2]))
            ref, tokens = ref.select([0, 2]), tokens[[0, 2]]
        got = dec.step(tokens)
        with torch.no_grad():
            want, ref = m(tokens[:, None], state=ref, return_state=True)
        assert got.dtype == torch.float32 and got.shape == (len(tokens), V)
        torch.testing.assert_close(got, want[:, 0].float(), atol=tol * 10, rtol=tol)
        for f in ("att_x_prev", "wkv", "ffn_x_prev"):
            torch.testing.assert_close(getattr(dec.state, f), getattr(ref, f), atol=tol, rtol=tol)
        tokens = got.argmax(-1)


def test_batched_greedy_equals_one_prompt_at_a_time(sharp_model, tok):
    from rwkvtune.generate import generate_batch

    m = sharp_model
    prompts = ["The quick brown fox", "Hi", "", "Once upon a time, in a land far away", "Hi"]
    done = generate_batch(m, tok, prompts, max_tokens=10, temperature=0)
    assert [(c.prompt_index, c.sample_index) for c in done] == [(i, 0) for i in range(5)]
    for p, c in zip(prompts, done):
        st = GenerationStats()
        text = generate(m, tok, p, max_tokens=10, temperature=0, stats=st)
        eot = [0] if st.finish_reason == "eot" else []
        assert c.token_ids == st.tokens + eot and c.text == text and c.finish_reason == st.finish_reason
        # the premise of comparing batched and one-row fp32 maths: no near tie at any step
        ids = (tok.encode(p) or [0]) + st.tokens
        with torch.no_grad():
            top2 = m(torch.tensor([ids]))[0, -len(st.tokens) - 1:].topk(2).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert len({tuple(c.token_ids) for c in done}) == 4  # the prompts do lead to different text
    assert generate(m, tok, prompts, max_tokens=10, temperature=0) == [c.text for c in done]


def test_batched_penalties_are_per_row(sharp_model, tok):
    """Presence/frequency penalties with decay, each row counting only its own tokens, equal the
    one-prompt path (which counts with update_counts, one token at a time)."""
    from rwkvtune.generate import generate_batch

    kw = dict(max_tokens=24, temperature=0, presence_penalty=2.0, frequency_penalty=1.5, penalty_decay=0.9)
    prompts = ["a", "Hello there, how are", "a"]
    done = generate_batch(sharp_model, tok, prompts, **kw)
    for p, c in zip(prompts, done):
        st = GenerationStats()
        generate(sharp_model, tok, p, stats=st, **kw)
        assert c.token_ids == st.tokens + ([0] if st.finish_reason == "eot" else [])
    plain = generate_batch(sharp_model, tok, prompts[:1], max_tokens=24, temperature=0)
    assert plain[0].token_ids != done[0].token_ids


def test_samples_share_one_prefill_and_differ(ckpt, tok):
    from rwkvtune.generate import generate_batch

    m = RWKV7.from_checkpoint(ckpt)
    calls = _counting(m)
    two = [tok.encode(" a b"), tok.encode(" c d")]  # two distinct prompts of equal length: one forward
    assert len(two[0]) == len(two[1]) == 2
    prompts = ["The quick brown fox jumps", "Hi", two[0], two[1], "Hi"]
    done = generate_batch(m, tok, prompts, samples_per_prompt=4, max_tokens=6, temperature=1.0, top_p=1.0, seed=0)
    assert len(done) == 20 and [(c.prompt_index, c.sample_index) for c in done[4:6]] == [(1, 0), (1, 1)]
    prefill = [c for c in calls if c[1] > 1 or c == (1, 1)]
    lengths = sorted(len(tok.encode(p)) for p in ("The quick brown fox jumps", "Hi"))
    assert len(prefill) == 3 and sorted(prefill) == sorted([(1, lengths[0]), (1, lengths[1]), (2, 2)])
    assert calls[:3] == prefill and all(t == 1 for _, t in calls[3:]) and calls[3][0] == 20
    for i in range(5):
        samples = {tuple(c.token_ids) for c in done if c.prompt_index == i}
        assert len(samples) == 4, f"prompt {i}: the 4 samples are not independent"


def test_finished_rows_are_dropped_and_stop_per_row(tok):
    """Each row ends on its own (end of text, its stop string, max_tokens); a finished row is not
    in later forwards, whose batch sizes shrink accordingly."""
    from rwkvtune.generate import generate_batch

    texts = {1: "ab", 2: "one two three END four", 3: "x ySTOPz tail", 4: "a b c d e f g h i j k l m n"}
    scripts = {key: tok.encode(t) for key, t in texts.items()}
    m = BatchScripted(scripts)
    done = generate_batch(m, tok, [[1], [2], [3], [4]], max_tokens=9, stop=["END", "STOP"], temperature=0)
    assert [c.finish_reason for c in done] == ["eot", "stop", "stop", "length"]
    assert [c.text for c in done] == ["ab", "one two three ", "x y", tok.decode(scripts[4][:9])]
    assert done[0].token_ids == scripts[1] + [0] and done[3].token_ids == scripts[4][:9]
    stop_at = {2: None, 3: None}
    for key in stop_at:  # the token that completes the stop string is the row's last token
        ids = scripts[key]
        stop_at[key] = next(n for n in range(1, len(ids) + 1) if "END" in tok.decode(ids[:n])
                            or "STOP" in tok.decode(ids[:n]))
        assert done[key - 1].token_ids == ids[:stop_at[key]]
    ends = [len(scripts[1]) + 1, stop_at[2], stop_at[3], 9]  # tokens sampled per row: [2, 4, 3, 9]
    # after step s (0-based) a row that samples e tokens is still running when e > s + 1
    expect = [sum(e > s + 1 for e in ends) for s in range(max(ends) - 1)]
    assert ends == [2, 4, 3, 9] and expect == [4, 3, 2, 1, 1, 1, 1, 1]
    assert m.calls[0] == (4, 1) and [b for b, _ in m.calls[1:]] == expect


def test_batch_seed_reproducible_and_rows_independent(model, tok):
    from rwkvtune.generate import BatchStats, generate_batch

    prompts = ["Hello", "The weather today"]
    kw = dict(samples_per_prompt=2, max_tokens=12, temperature=1.0, top_p=0.85, logprobs=True)
    a = generate_batch(model, tok, prompts, seed=3, **kw)
    b = generate_batch(model, tok, prompts, seed=3, **kw)
    c = generate_batch(model, tok, prompts, seed=4, **kw)
    assert [x.token_ids for x in a] == [x.token_ids for x in b] and [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # Row 0 stops at once (its stop string is its first token's text); rows 1..3 do not change:
    # their random numbers do not depend on when other rows finish.
    first = tok.decode(a[0].token_ids[:1])
    stats = BatchStats()
    d = generate_batch(model, tok, prompts, seed=3, stop=[first], stats=stats, **kw)
    assert d[0].finish_reason == "stop" and len(d[0].token_ids) == 1
    unaffected = [(x, y) for x, y in zip(a[1:], d[1:]) if first not in x.text]
    assert len(unaffected) >= 2 and all(x.token_ids == y.token_ids for x, y in unaffected)
    assert (stats.rows, stats.prefill_forwards) == (4, 2)
    assert stats.generated_tokens == sum(len(x.token_ids) for x in d)


def test_batch_logprobs_are_the_raw_model_softmax(model, tok):
    """logprobs = log_softmax of an independent full-sequence forward at each sampled token, even
    though sampling used top-p, temperature and penalties."""
    from rwkvtune.generate import generate_batch

    prompts = ["Hello", "A longer prompt here"]
    done = generate_batch(model, tok, prompts, samples_per_prompt=2, max_tokens=8, temperature=0.8, top_p=0.5,
                          presence_penalty=1.0, seed=1, logprobs=True)
    for c in done:
        ids = tok.encode(prompts[c.prompt_index])
        with torch.no_grad():
            logits = model(torch.tensor([ids + c.token_ids[:-1]]))[0, len(ids) - 1:]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)
    assert generate_batch(model, tok, prompts, max_tokens=2)[0].logprobs is None


def test_batch_wkv_init_and_bad_input(model, tok):
    from rwkvtune.generate import generate_batch

    c = model.config
    w = torch.randn(c.n_layer, c.n_head, c.head_size_a, c.head_size_a, generator=torch.Generator().manual_seed(0))
    one = GenerationStats()
    generate(model, tok, "Hello", max_tokens=6, temperature=0, wkv_init=w, stats=one)
    got = generate_batch(model, tok, ["Hello", "x"], max_tokens=6, temperature=0, wkv_init=w)
    assert got[0].token_ids[:len(one.tokens)] == one.tokens
    assert generate_batch(model, tok, []) == []
    for bad, match in ((dict(samples_per_prompt=0), "^samples_per_prompt: expected an integer >= 1, found 0"),
                       (dict(prompts="Hello"), "^prompts: expected a list of prompts"),
                       (dict(prompts=["ok", 3.5]), r"^prompts\[1\]: expected text or a list of token ids"),
                       (dict(top_p=float("nan")), "^top_p: expected"),
                       (dict(wkv_init=w[:1]), "another model")):
        kw = {"prompts": ["Hello"], **bad}
        with pytest.raises(GenerationError, match=match):
            generate_batch(model, tok, kw.pop("prompts"), **kw)
    with pytest.raises(GenerationError, match="^samples_per_prompt"):
        generate(model, tok, "Hello", samples_per_prompt=2)
    with pytest.raises(GenerationError, match="state=, stream= and stats="):
        generate(model, tok, ["Hello"], stats=GenerationStats())


# ----------------------------------------------------------------------------------- CLI
def _argv(ckpt, **over):
    argv = ["--model", ckpt, "--prompt", "Hello", "--max-tokens", "8", "--seed", "4"]
    for k, v in over.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif isinstance(v, list):
            for item in v:
                argv += [flag, item]
        else:
            argv += [flag, str(v)]
    return argv


def _args(ckpt, **over):
    from rwkvtune.cli.generate import add_arguments

    return add_arguments(argparse.ArgumentParser()).parse_args(_argv(ckpt, **over))


def _main(ckpt, **over) -> int:
    """`rwkvtune generate ...` in process: user errors are printed by rwkvtune's main."""
    from rwkvtune.cli import main

    return main(["generate", *_argv(ckpt, **over)])


def test_cli_defaults(ckpt):
    from rwkvtune.cli.generate import add_arguments, sampling_from_args

    a = _args(ckpt)
    assert (a.max_tokens, a.temperature, a.top_p, a.top_k, a.presence_penalty, a.frequency_penalty,
            a.penalty_decay, a.seed) == (8, 1.0, 0.85, 0, 0.0, 0.0, 0.996, 4)
    assert a.precision == "fp32" and a.device == "auto" and a.stop is None and not a.chat
    assert _args(ckpt, stop=["a", "b"]).stop == ["a", "b"]
    assert sampling_from_args(_args(ckpt, stop=["a"]), ("\n\n",)) == SamplingConfig(max_tokens=8, seed=4,
                                                                                     stop=("a", "\n\n"))
    helps = add_arguments(argparse.ArgumentParser()).format_help().replace("\n", " ")
    for text in ("(default 200)", "(default 0.85)", "(default 0.996)", "0 = greedy (default 1.0)"):
        assert text in " ".join(helps.split())


def test_cli_refuses_nan_with_the_flag_name(ckpt, capsys):
    assert _main(ckpt, temperature="nan") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --temperature: expected a finite number with 0 <= --temperature <= 10000, found "
                          "nan;") and err.count("\n") == 1
    assert _main(ckpt, top_p=2) == 2
    assert capsys.readouterr().err.startswith("error: --top-p: expected a finite number with 0 <= --top-p <= 1, found "
                                              "2.0;")


def test_cli_run_streams_text_and_stats(ckpt, model, tok, capsys):
    from rwkvtune.cli.generate import run

    assert run(_args(ckpt)) == 0
    out, err = capsys.readouterr()
    expected = generate(model, tok, "Hello", max_tokens=8, seed=4)
    assert out == expected + "\n"
    assert "8 tokens" in err and "prefill" in err and "decode" in err and "tok/s" in err
    assert run(_args(ckpt, temperature=0, precision="bf16")) == 0


def test_cli_state_file(ckpt, model, tok, tmp_path, capsys):
    from rwkvtune.cli.generate import run

    c = model.config
    w = torch.randn(c.n_layer, c.n_head, c.head_size_a, c.head_size_a, generator=torch.Generator().manual_seed(1))
    torch.save({"wkv_init": w}, tmp_path / "s.pth")
    torch.save(w, tmp_path / "raw.pth")
    from rwkvtune.peft.state import save_state_file  # what state tuning writes

    save_state_file(tmp_path / "tuned.pth", w, model)
    expected = generate(model, tok, "Hello", max_tokens=8, temperature=0, wkv_init=w)
    for name in ("s.pth", "raw.pth", "tuned.pth"):
        assert run(_args(ckpt, temperature=0, state=tmp_path / name)) == 0
        assert capsys.readouterr().out == expected + "\n"
    torch.save({"wkv_init": w[:, :, :8]}, tmp_path / "bad.pth")
    assert _main(ckpt, state=tmp_path / "bad.pth") == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err and f"[{c.n_layer}, {c.n_head}, 8, 16]" in err and "[2, 2, 16, 16]" in err
    torch.save({"other": w}, tmp_path / "nokey.pth")
    assert _main(ckpt, state=tmp_path / "nokey.pth") == 2
    assert "wkv_init" in capsys.readouterr().err
    assert _main(ckpt, state=tmp_path / "missing.pth") == 2
    assert capsys.readouterr().err.startswith(f"error: --state {tmp_path / 'missing.pth'}: state file not found")


def test_cli_subprocess_chat(ckpt):
    """The real entry path in a fresh interpreter: chat mode, text on stdout, stats on stderr."""
    code = ("import sys, argparse; from rwkvtune.cli.generate import add_arguments, run; "
            "p = add_arguments(argparse.ArgumentParser()); sys.exit(run(p.parse_args(sys.argv[1:])))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "--model", ckpt, "--prompt", "Hi", "--chat",
                           "--max-tokens", "5", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and "tok/s" in proc.stderr


def test_cli_missing_model(ckpt, capsys):
    assert _main(ckpt[:-4] + "-nope.pth") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err and "-nope.pth" in err


@pytest.mark.parametrize("stdin, prompt", [
    (b"Hello\n", "Hello"),  # what `echo Hello |` sends: the same as --prompt Hello
    (b"Hello\r\n", "Hello"),
    (b"Hello", "Hello"),
    (b"Hello\n\n", "Hello\n"),  # only one line end: a prompt may end in a blank line
    (b"\n", ""),
])
def test_cli_prompt_from_stdin_loses_one_trailing_newline(ckpt, monkeypatch, capsys, stdin, prompt):
    import io

    import rwkvtune.cli.generate as gen_cli
    import rwkvtune.generate.stream as stream

    seen = []

    def fake_stream(model, tokenizer, prompt, **kw):
        seen.append(prompt)
        return iter(())

    monkeypatch.setattr(stream, "stream_generate", fake_stream)  # run() imports it from there
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    args = _args(ckpt)
    args.prompt = None  # no --prompt: read stdin
    assert gen_cli.run(args) == 0
    assert seen == [prompt]


def test_log_vocab_sanity(model, tok):
    """A random tiny model still gives a proper distribution over the full vocab: the last
    position's logits are the head applied to the final hidden state, one finite value per id,
    their log-softmax normalised, every id possible and none certain, and generation's own
    log-probs (raw_logprobs) equal to it."""
    from rwkvtune.generate import raw_logprobs

    ids = torch.tensor([tok.encode("x")])
    with torch.no_grad():
        logits = model(ids)[0, -1]
        again = model.head(model(ids, hidden=True)[0, -1])
    assert logits.shape == (V,) and torch.isfinite(logits).all()
    assert torch.allclose(logits, again, rtol=0, atol=1e-6)
    logp = torch.log_softmax(logits.double(), -1)
    assert abs(torch.logsumexp(logp, -1).item()) < 1e-9
    assert torch.isfinite(logp).all() and logp.max() < 0 and logp.std() > 0
    some = torch.arange(0, V, 257)  # ids across the whole vocab, as if each had been sampled
    ours = raw_logprobs(logits.expand(len(some), V), some).double()
    assert torch.allclose(ours, logp[some], atol=1e-5)


def test_cli_bad_device_state_dir_and_non_utf8_prompt(ckpt, tmp_path, capsys):
    assert _main(ckpt, device="tpu") == 2
    assert "error: --device 'tpu': unknown device; expected cpu, cuda or cuda:N" in capsys.readouterr().err
    assert _main(ckpt, state=tmp_path) == 2
    assert f"error: --state {tmp_path}: is a directory" in capsys.readouterr().err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, stdin in (([], b"caf\xe9 au lait"), (["--prompt", os.fsdecode(b"a\xffb")], b"")):
        proc = subprocess.run([sys.executable, "-m", "rwkvtune", "generate", "--model", ckpt, "--max-tokens", "2",
                               *extra], input=stdin, capture_output=True, timeout=120, env=env)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in err and "not valid UTF-8" in err, err


def test_generate_help_and_a_bad_flag_answer_without_importing_torch():
    """`rwkvtune generate --help` and a refused sampling flag need no torch (importing it takes
    seconds); the model, and torch with it, load only after every flag is checked."""
    code = ("import sys, contextlib, io\n"
            "from rwkvtune.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
            "    try:\n"
            "        main(['generate', '--help'])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "    code = main(['generate', '--model', 'no-such-model', '--prompt', 'hi', '--temperature', '-1'])\n"
            "assert code == 2 and '--temperature' in out.getvalue() and '--top-p' in out.getvalue(), out.getvalue()\n"
            "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_split_choice_keeps_the_faster_setting_of_alternating_timed_steps():
    from rwkvtune.generate.decoding import SplitChoice

    for split_ms, plain_ms, want in ((9.0, 5.0, False), (5.0, 9.0, True)):
        SplitChoice.reset()
        try:
            seen = []
            while not SplitChoice.decided:
                timed = SplitChoice.before_step()
                seen.append((SplitChoice.split, timed))
                # one slow (descheduled) step of the faster setting does not change the verdict
                slow = 100.0 if len(seen) == SplitChoice.WARMUP + 1 else 0.0
                SplitChoice.after_step(((split_ms if SplitChoice.split else plain_ms) + slow) / 1e3 if timed else None)
            assert seen == [(True, False)] * SplitChoice.WARMUP + [(True, True), (False, True)] * SplitChoice.ROUNDS
            assert SplitChoice.split is want
        finally:
            SplitChoice.reset()


def test_batch_decoder_decides_the_split_in_its_first_steps_with_the_same_logits(ckpt, tok):
    """The first one-row steps of a process alternate the one-row product both ways (timed), then
    keep one; every step's logits equal the model's forward up to fp32 rounding."""
    from rwkvtune.generate.decoding import SplitChoice
    from rwkvtune.generate.rnn import BatchDecoder

    m = prepare_for_decoding(RWKV7.from_checkpoint(ckpt))
    ids = tok.encode("Some text to run through the decoder step by step")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    SplitChoice.reset()
    try:
        with torch.no_grad():
            want = m(torch.tensor([ids]))[0]
            _, state = m(torch.tensor([ids[:1]]), return_state=True)
        dec = BatchDecoder(m, state)
        settings = []
        for t in range(1, len(ids)):
            got = dec.step(torch.tensor([ids[t]]))
            settings.append(SplitChoice.split)
            torch.testing.assert_close(got[0], want[t], atol=1e-4, rtol=1e-4)
        n = SplitChoice.WARMUP + 2 * SplitChoice.ROUNDS
        assert len(ids) - 1 > n and SplitChoice.decided
        assert set(settings[:n]) == {True, False} and set(settings[n:]) == {SplitChoice.split}
    finally:
        SplitChoice.reset()
        torch.set_num_threads(before)


def test_a_compiled_batch_decoder_starts_from_prefill_state_and_matches_eager(ckpt, tok):
    """BatchDecoder.compile traces the whole step (aot_eager: Dynamo and AOTAutograd, no C++ build)
    from the state prefill leaves (inference tensors, which compiled code cannot update in place),
    without a graph break; its logits equal eager's and its own state copy advances in place."""
    from torch._dynamo.utils import counters

    from rwkvtune.generate.decoding import SplitChoice
    from rwkvtune.generate.rnn import BatchDecoder

    m = prepare_for_decoding(RWKV7.from_checkpoint(ckpt))
    ids = tok.encode("Some text to run through the decoder")
    with torch.inference_mode():
        _, state = m(torch.tensor([ids[:3]]), return_state=True)
    torch._dynamo.reset()
    counters.clear()
    try:
        plain, traced = BatchDecoder(m, state.clone()), BatchDecoder(m, state).compile("aot_eager")
        for t in range(3, 7):
            torch.testing.assert_close(traced.step(torch.tensor([ids[t]])), plain.step(torch.tensor([ids[t]])),
                                       atol=1e-4, rtol=1e-4)
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
        torch.testing.assert_close(traced.state.wkv, plain.state.wkv, atol=1e-5, rtol=1e-4)
        assert not torch.equal(traced.state.wkv, state.wkv)  # prefill's own state is left as it was
    finally:
        torch._dynamo.reset()
        SplitChoice.reset()  # plain.step timed its first one-row steps
