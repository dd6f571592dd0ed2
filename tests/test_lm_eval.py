"""Benchmark evaluation (rwkvtune.evaluate): exactness of the RNN-shaped scoring, lm-eval tasks
offline, and one-line errors.

Scoring tests need torch only; the task tests need lm-eval (the "test" extra installs it) and run
with the hub switched off and the datasets cache inside the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from helpers import write_checkpoint
from rwkvtune.evaluate import scoring
from rwkvtune.models.rwkv7 import RWKV7

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("m") / "tiny.pth")
    return path, RWKV7.from_checkpoint(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model with the World vocabulary, for tasks written in text."""
    path = write_checkpoint(tmp_path_factory.mktemp("w") / "world.pth", vocab=65536, seed=3)
    return path, RWKV7.from_checkpoint(path)


def _requests(seed=0, contexts=6, per=4, vocab=256):
    rnd = random.Random(seed)
    out = []
    for _ in range(contexts):
        ctx = [rnd.randrange(vocab) for _ in range(rnd.randrange(1, 30))]
        for _ in range(per):
            out.append((ctx, [rnd.randrange(vocab) for _ in range(rnd.randrange(1, 12))]))
    return out


def _full_forward(model, ctx, cont, wkv_init=None):
    """The test's own route: one forward of the concatenation, log-softmax at the continuation."""
    seq = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logits = model(seq, wkv_init=wkv_init)[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


# ---- exactness -----------------------------------------------------------------------------
def test_loglikelihood_equals_full_forward_and_rwkv_package(tiny):
    path, model = tiny
    reqs = _requests()
    ours = scoring.loglikelihood(model, reqs, batch_size=4)
    from rwkv.model import RWKV

    oracle = RWKV(path[:-4], "cpu fp32")
    for (ctx, cont), (lp, _) in zip(reqs, ours):
        assert lp == pytest.approx(_full_forward(model, ctx, cont), abs=2e-5)
        logits, _ = oracle.forward(list(ctx) + list(cont), None, full_output=True)
        ref = torch.log_softmax(logits.double(), -1)
        ref_lp = sum(float(ref[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert lp == pytest.approx(ref_lp, abs=1e-3)


def test_prefix_shared_equals_unshared(tiny):
    _, model = tiny
    reqs = _requests(seed=1, contexts=5, per=5)
    shared = scoring.loglikelihood(model, reqs, batch_size=8)
    plain = scoring.plain_loglikelihood(model, reqs)
    for (a, ga), (b, gb) in zip(shared, plain):
        assert a == pytest.approx(b, abs=2e-5)
        assert ga == gb


def test_batched_equals_unbatched(tiny):
    _, model = tiny
    reqs = _requests(seed=2, contexts=7, per=3)
    batched = scoring.loglikelihood(model, reqs, batch_size=32)
    # one row per forward, one token per forward: every segment boundary a batch could have
    single = scoring.loglikelihood(model, reqs, batch_size=1, token_budget=1)
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=2e-5)
        assert ga == gb


def test_greedy_flag(tiny):
    _, model = tiny
    ctx = [5, 6, 7]
    greedy = []
    for _ in range(3):
        greedy.append(int(model(torch.tensor([ctx + greedy]))[0, -1].argmax()))
    off_last = greedy[:2] + [(greedy[2] + 1) % 256]
    off_first = [(greedy[0] + 1) % 256] + greedy[1:]
    res = scoring.loglikelihood(model, [(ctx, greedy), (ctx, off_last), (ctx, off_first), (ctx, greedy[:1])])
    assert [g for _, g in res] == [True, False, False, True]


def test_rolling_is_one_pass_without_windows(tiny):
    _, model = tiny
    rnd = random.Random(4)
    docs = [[rnd.randrange(256) for _ in range(n)] for n in (1, 7, 60, 33)]
    prefix = [11, 12]  # a two-token prefix: its own tokens are not scored
    got = scoring.loglikelihood_rolling(model, docs, prefix, batch_size=3, token_budget=16)
    for doc, lp in zip(docs, got):
        assert lp == pytest.approx(_full_forward(model, prefix, doc), abs=5e-5)


def test_tuned_initial_state_is_used(tiny):
    _, model = tiny
    c = model.config
    wkv_init = torch.randn(c.n_layer, c.n_head, c.head_size_a, c.head_size_a, generator=torch.Generator().manual_seed(0))
    reqs = _requests(seed=5, contexts=3, per=2)
    ours = scoring.loglikelihood(model, reqs, wkv_init=wkv_init)
    for (ctx, cont), (lp, _) in zip(reqs, ours):
        assert lp == pytest.approx(_full_forward(model, ctx, cont, wkv_init=wkv_init), abs=2e-5)
    assert ours[0][0] != pytest.approx(scoring.loglikelihood(model, reqs[:1])[0][0], abs=1e-4)


# ---- lm-eval -------------------------------------------------------------------------------
lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub, and the datasets cache inside tmp_path."""
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    return tmp_path


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def test_lm_api_matches_scoring_and_splits_whitespace(world):
    from rwkvtune.evaluate.lm import RwkvLM
    from rwkvtune.tokenizer import get_tokenizer

    _, model = world
    tok = get_tokenizer()
    lm = RwkvLM(model, batch_size=3)
    pairs = [("The color of grass is", " green"), ("The color of grass is ", "red"), ("A dog says", " woof")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    nl = tok.encode("\n")
    # the trailing space of the second context is scored as part of its continuation
    want = [_full_forward(model, nl + tok.encode("The color of grass is"), tok.encode(" green")),
            _full_forward(model, nl + tok.encode("The color of grass is"), tok.encode(" red")),
            _full_forward(model, nl + tok.encode("A dog says"), tok.encode(" woof"))]
    assert [lp for lp, _ in got] == pytest.approx(want, abs=5e-5)
    plain = RwkvLM(model, share_prefix=False).loglikelihood(_instances("loglikelihood", pairs))
    assert [lp for lp, _ in plain] == pytest.approx(want, abs=5e-5)
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [("A cow says moo.",)]))
    assert rolling[0] == pytest.approx(_full_forward(model, nl, tok.encode("A cow says moo.")), abs=5e-5)


def test_generate_until_stops_at_until(world):
    from rwkvtune.evaluate.lm import RwkvLM
    from rwkvtune.generate import generate_batch
    from rwkvtune.tokenizer import get_tokenizer

    _, model = world
    tok = get_tokenizer()
    lm = RwkvLM(model)
    prompt = tok.encode("\n") + tok.encode("Once upon a time")
    full = generate_batch(model, tok, [prompt], temperature=0, max_tokens=24)[0].text
    cut = next(i for i in range(4, len(full) - 2) if full[i:i + 2].strip())
    stop = full[cut:cut + 2]
    got = lm.generate_until(_instances("generate_until", [("Once upon a time", {"until": [stop], "max_gen_toks": 24}),
                                                          ("Once upon a time", {"until": [], "max_gen_toks": 24})]))
    assert got[0] == full[:full.index(stop)]
    assert got[1] == full


def _hand_count(model, items, prefix):
    """Accuracy and length-normalised accuracy of multiple-choice items, counted here: for each
    item the choice with the highest log-likelihood (per character for acc_norm)."""
    from rwkvtune.tokenizer import get_tokenizer

    tok = get_tokenizer()
    acc = acc_norm = 0
    for it in items:
        lls = [_full_forward(model, prefix + tok.encode(it["query"]), tok.encode(" " + c)) for c in it["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == it["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, it["choices"])]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == it["gold"]
    return acc / len(items), acc_norm / len(items)


def test_tiny_task_accuracy_equals_hand_count(world, offline):
    from rwkvtune.evaluate.harness import TASKS_DIR, run_tasks
    from rwkvtune.evaluate.lm import RwkvLM
    from rwkvtune.tokenizer import get_tokenizer

    _, model = world
    items = [json.loads(line) for line in (TASKS_DIR / "rwkvtune_tiny.jsonl").read_text().splitlines()]
    assert len(items) >= 30 and all(0 <= it["gold"] < len(it["choices"]) for it in items)
    summary = run_tasks(RwkvLM(model), ["rwkvtune_tiny"], bootstrap_iters=0)
    acc, acc_norm = _hand_count(model, items, get_tokenizer().encode("\n"))
    res = summary["results"]["rwkvtune_tiny"]
    assert res["acc"]["value"] == pytest.approx(acc)
    assert res["acc_norm"]["value"] == pytest.approx(acc_norm)
    assert res["acc"]["stderr"] is None or res["acc"]["stderr"] > 0


def test_local_jsonl_task_through_include_path_runs_offline(world, offline):
    """A user's own task over a local jsonl (lm-eval's YAML with dataset_path json), no hub."""
    from rwkvtune.evaluate.harness import run_tasks
    from rwkvtune.evaluate.lm import RwkvLM
    from rwkvtune.tokenizer import get_tokenizer

    _, model = world
    tasks = offline / "tasks"
    tasks.mkdir()
    items = [{"q": "A dog says", "choices": ["woof", "moo"], "gold": 0},
             {"q": "A cow says", "choices": ["woof", "moo"], "gold": 1},
             {"q": "After Monday comes", "choices": ["Tuesday", "Friday", "Sunday"], "gold": 0}]
    data = offline / "mine.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (tasks / "mine.yaml").write_text(
        f"task: my_local_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    summary = run_tasks(RwkvLM(model), ["my_local_task"], include_paths=[str(tasks)], bootstrap_iters=0)
    hand = _hand_count(model, [{"query": it["q"], **it} for it in items], get_tokenizer().encode("\n"))[0]
    assert summary["results"]["my_local_task"]["acc"]["value"] == pytest.approx(hand)


def test_missing_local_data_file_is_one_line(offline):
    from rwkvtune.errors import DataError
    from rwkvtune.evaluate.harness import load_tasks, task_manager

    tasks = offline / "tasks"
    tasks.mkdir()
    (tasks / "gone.yaml").write_text(
        f"task: gone_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {offline / 'nope.jsonl'}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    tm = task_manager(["gone_task"], [str(tasks)])
    with pytest.raises(DataError, match=r"task gone_task: a data file is missing .*nope\.jsonl") as e:
        load_tasks(tm, ["gone_task"])
    assert "\n" not in str(e.value)


def test_task_yaml_that_runs_python_is_refused_unless_trusted(offline, tmp_path):
    """lm-eval's !function imports the module beside a task YAML: a user's task folder (or a YAML
    named as a task) is refused before lm-eval reads it, and nothing in it runs, unless trusted."""
    from rwkvtune.errors import ConfigError
    from rwkvtune.evaluate.harness import load_tasks, task_manager

    tasks = offline / "code_tasks"
    tasks.mkdir()
    marker = tmp_path / "ran"
    (tasks / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef docs(ds):\n    return ds\n")
    (tasks / "coded.yaml").write_text(
        f"task: coded_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {offline / 'd.jsonl'}\n"
        "process_docs: !function utils.docs\noutput_type: loglikelihood_rolling\ntest_split: test\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    (offline / "d.jsonl").write_text('{"text": "a"}\n')
    for names, include in ((["coded_task"], [str(tasks)]), ([str(tasks / "coded.yaml")], [])):
        with pytest.raises(ConfigError, match=r"coded\.yaml:6: this task YAML runs Python \(!function\).*"
                                              r"--trust-task-code") as e:
            task_manager(names, include)
        assert "\n" not in str(e.value)
    assert not marker.exists()
    tm = task_manager(["coded_task"], [str(tasks)], trust_code=True)  # trusted: lm-eval may import it
    load_tasks(tm, ["coded_task"])
    assert marker.exists()


def test_suite_expands_to_the_papers_tasks():
    from rwkvtune.evaluate.harness import expand_tasks

    assert expand_tasks("rwkv7-paper,rwkvtune_tiny,hellaswag") == [
        "lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "sciq", "mmlu",
        "rwkvtune_tiny"]


def test_unknown_task_and_hub_data_set_offline_are_one_line_each(offline):
    """Both need lm-eval's full task index (about 10-20 s to build, once per process)."""
    from rwkvtune.errors import ConfigError, DataError
    from rwkvtune.evaluate.harness import load_tasks, task_manager

    with pytest.raises(ConfigError, match=r"unknown task 'rwkvtune_tiyn' \(close names: rwkvtune_tiny"):
        task_manager(["rwkvtune_tiyn"])
    with pytest.raises(ConfigError, match=r"unknown task 'helaswag' \(close names: hellaswag"):
        task_manager(["helaswag"])
    tm = task_manager(["hellaswag"])
    with pytest.raises(DataError, match=r"task hellaswag needs the Hugging Face data set Rowan/hellaswag.*"
                                        r"load_dataset\('Rowan/hellaswag'\).*--include-path") as e:
        load_tasks(tm, ["hellaswag"])
    assert "\n" not in str(e.value)


def _cli(capsys, *args):
    """``rwkvtune eval ARGS`` in this process (main() is what the console script runs): (exit
    status, stdout, stderr)."""
    from rwkvtune.cli import main

    capsys.readouterr()
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tasks_output_and_compare(world, offline, capsys):
    path, _ = world
    tmp_path = offline
    code, out, err = _cli(capsys, "--model", path, "--tasks", "rwkvtune_tiny", "--limit", "8", "--output",
                          str(tmp_path / "a.json"))
    assert code == 0, err
    assert "| rwkvtune_tiny | acc |" in out
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["runs"][0]["n_samples"]["rwkvtune_tiny"] == 8
    assert (tmp_path / "a.md").read_text().startswith("| task | metric |")
    b = dict(data, runs=[dict(data["runs"][0], label="other")])
    (tmp_path / "b.json").write_text(json.dumps(b))
    code, out, err = _cli(capsys, "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--output",
                          str(tmp_path / "cmp.json"))
    assert code == 0, err
    assert out.splitlines()[0] == f"| task | metric | {path} | other |"
    assert json.loads((tmp_path / "cmp.json").read_text())["runs"][1]["label"] == "other"


def test_cli_bad_inputs_are_one_line(world, offline, capsys):
    import re

    from rwkvtune.peft.lora import apply_lora, save_adapter

    path, _ = world
    tmp_path = offline
    other = RWKV7.from_checkpoint(write_checkpoint(tmp_path / "other.pth", vocab=65536, seed=9))
    apply_lora(other, ["att.key"], r=2, alpha=4)
    save_adapter(tmp_path / "adapter.pth", other)
    (tmp_path / "junk.json").write_text("{\"runs\": 3}")
    cases = [
        (("--model", path, "--tasks", "rwkvtune_tiny", "--adapter", str(tmp_path / "adapter.pth")),
         "--adapter .*another base model"),
        (("--compare", str(tmp_path / "junk.json")), "not an rwkvtune eval result"),
        (("--model", path, "--tasks", "rwkvtune_tiny", "--limit", "2.5"), "--limit: found 2.5"),
        (("--model", path, "--tasks", "rwkvtune_tiny", "--include-path", str(tmp_path / "none")),
         "--include-path .*not a directory"),
        (("--model", path), "needs --model MODEL and --data FILE"),
    ]
    for args, pattern in cases:
        code, out, err = _cli(capsys, *args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert re.search(pattern, err), err


def test_lm_eval_not_imported_with_rwkvtune():
    code = ("import sys, rwkvtune, rwkvtune.evaluate, rwkvtune.evaluate.scoring, rwkvtune.cli.eval, "
            "rwkvtune.train.task_eval, rwkvtune.train.trainer; assert 'lm_eval' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_eval_tasks_during_training(world, tmp_path, offline):
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.train.trainer import train

    path, _ = world
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"A dog says woof. {i} plus 1 is {i + 1}."}) + "\n"
                            for i in range(16)))
    cfg = TrainConfig().update(dict(model=path, data=str(data), out=str(tmp_path / "run"), max_steps=2,
                                    eval_every=1, eval_tasks=["rwkvtune_tiny"], eval_tasks_limit=6, ctx_len=16,
                                    batch_size=2, save_every=0, tensorboard=False), "test")
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_rwkvtune_tiny/acc" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(0 <= r["eval_rwkvtune_tiny/acc"] <= 1 for r in evals)
    assert summary["eval_rwkvtune_tiny/acc"] == evals[-1]["eval_rwkvtune_tiny/acc"]


def test_eval_tasks_config_is_checked():
    from rwkvtune.errors import ConfigError
    from rwkvtune.models.rwkv7.config import TrainConfig

    cfg = TrainConfig().update(dict(model="x.pth", data="d.jsonl", eval_tasks=["rwkvtune_tiny"], strategy="fsdp",
                                    eval_tasks_limit=0), "recipe r.yaml")
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "eval_tasks_limit: found 0" in str(e.value) and "a sharded model cannot run the tasks" in str(e.value)
