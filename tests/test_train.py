"""End-to-end training on CPU with tiny models: formats, outputs, accumulation, resume, eval, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import train_losses as _losses, write_checkpoint
from rwkvtune.errors import RwkvtuneError
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.train.setup_checks import validate_config
from rwkvtune.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)


def _texts(n=24):
    words = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "eats"]
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5)) + "." for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    text = d / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    chat = d / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {t}"},
                                                     {"role": "assistant", "content": t}]}) + "\n"
                            for t in _texts(12)))
    pr = d / "pr.jsonl"
    pr.write_text("".join(json.dumps({"prompt": f"repeat {t}", "response": t}) + "\n" for t in _texts(12)))
    ckpt = write_checkpoint(d / "base.pth", **SMALL)
    return {"text": str(text), "chat": str(chat), "pr": str(pr), "ckpt": ckpt, "dir": d}


def _cfg(fixture, out, **kw):
    base = dict(model=fixture["ckpt"], data=fixture["text"], out=str(out), ctx_len=16, batch_size=2, max_steps=4,
                lr=1e-3, warmup_steps=0, save_every=0, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def test_full_finetune_outputs_and_rwkv_package(data, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(data, out, max_steps=6, save_dtype="fp32"))
    assert summary["steps"] == 6
    losses = _losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(rows[0])
    for name in ("final.pth", "config.yaml", "loss.png", "checkpoints/latest"):
        assert (out / name).exists(), name
    # final.pth is the official layout: same keys and shapes as the base, loads in the rwkv package.
    base = torch.load(data["ckpt"])
    final = torch.load(out / "final.pth")
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in base.items()}
    assert any(not torch.equal(final[k], base[k]) for k in base)
    from rwkv.model import RWKV

    ref = RWKV(str(out / "final"), "cpu fp32")
    ours = RWKV7.from_checkpoint(out / "final.pth")
    ids = [5, 300, 2000, 17, 42, 0, 11]
    ref_logits, _ = ref.forward(ids, None, full_output=True)
    with torch.no_grad():
        our_logits = ours(torch.tensor([ids]))[0]
    assert (ref_logits - our_logits).abs().max() < 1e-4


def test_final_is_bf16_by_default_and_config_saved(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=1))
    final = torch.load(out / "final.pth")
    assert all(v.dtype == torch.bfloat16 for v in final.values())
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["ctx_len"] == 16 and saved["lr"] == 1e-3 and saved["precision"] == "fp32"


@pytest.mark.parametrize("fmt", ["chat", "pr"])
def test_chat_and_prompt_response_formats_train_on_replies_only(data, tmp_path, fmt):
    from rwkvtune.tokenizer import get_tokenizer

    out = tmp_path / fmt
    summary = train(_cfg(data, out, data=data[fmt], eval_data=data[fmt], max_steps=6, lr=3e-2))
    records = [json.loads(line) for line in Path(data[fmt]).read_text().splitlines()]
    replies = [r["messages"][1]["content"] if "messages" in r else r["response"] for r in records]
    # The loss counts the assistant's tokens only: " {reply}" and the turn end "\n\n" (one token).
    tok = get_tokenizer()
    assert summary["eval_tokens"] == sum(len(tok.encode(" " + reply)) + 1 for reply in replies)
    # and it learns them: the eval loss after 6 steps is more than 1 nat below the first step's loss
    first = next(loss for loss in _losses(out) if loss is not None)
    assert summary["eval_loss"] < first - 1.0


def test_binidx_data_trains(data, tmp_path):
    from rwkvtune.data.binidx import BinIdxDataset
    from rwkvtune.data.prepare import prepare_binidx
    from rwkvtune.tokenizer import get_tokenizer

    prefix = str(tmp_path / "corpus")
    prepare_binidx(data["text"], prefix, get_tokenizer(), workers=1)
    out = tmp_path / "run"
    summary = train(_cfg(data, out, data=prefix, eval_data=prefix, max_steps=6, lr=3e-2))
    # every token of the stream but the first is a target exactly once, as in RWKV-LM
    assert summary["eval_tokens"] == BinIdxDataset(prefix).num_tokens - 1
    assert summary["eval_loss"] < _losses(out)[0] - 1.0


def test_gradient_accumulation_equals_larger_batch(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # adam_eps 1e-8 instead of the reference 1e-18: with 1e-18, gradients that are pure rounding
    # noise (~1e-12) get normalised into full +-lr updates whose sign depends on summation order.
    train(_cfg(data, a, batch_size=4, grad_accum=1, save_dtype="fp32", adam_eps=1e-8))
    train(_cfg(data, b, batch_size=2, grad_accum=2, save_dtype="fp32", adam_eps=1e-8))
    la, lb = _losses(a), _losses(b)
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    wa, wb = torch.load(a / "final.pth"), torch.load(b / "final.pth")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_scratch_init_from_json_config(data, tmp_path):
    out = tmp_path / "scratch"
    cfg = _cfg(data, out, model=str(REPO / "examples/configs/rwkv7-tiny.json"), init="scratch", max_steps=3,
               lr=3e-3)
    summary = train(cfg)
    losses = _losses(out)
    assert abs(losses[0] - torch.log(torch.tensor(65536.0)).item()) < 0.5  # official init: near-uniform
    assert losses[-1] < losses[0] and summary["steps"] == 3


def test_eval_rows_and_eval_cli(data, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(data, out, eval_data=data["text"], eval_every=2, max_steps=4, save_dtype="fp32"))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-9)
    assert summary["eval_loss"] == evals[-1]["eval_loss"]
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "eval", "--model", str(out / "final.pth"), "--data",
                          data["text"], "--ctx-len", "16"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # final.pth (fp32) scored by the CLI gives the trainer's final eval: same model, same windows
    assert got["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-5)
    assert got["eval_tokens"] == summary["eval_tokens"] and got["eval_ppl"] == pytest.approx(math.exp(got["eval_loss"]))


def test_nan_loss_stops_with_step_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    import rwkvtune.train.loss as loss_mod
    import rwkvtune.train.trainer as trainer_mod

    real = loss_mod.chunked_loss_sum
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(loss_mod, "chunked_loss_sum", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(trainer_mod.TrainingDiverged, match="step 3"):
        train(_cfg(data, out, save_every=1, max_steps=5))
    assert (out / "checkpoints" / "step-0000002.pt").exists()
    assert not (out / "final.pth").exists()


def test_dry_run_reports_setup(data, tmp_path):
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data",
                          data["text"], "--out", str(tmp_path / "dry"), "--ctx-len", "16", "--batch-size", "2",
                          "--grad-accum", "3", "--dry-run", "--json", "lr=2e-4"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["tokens_per_step"] == 16 * 2 * 3
    assert report["config"]["lr"] == 2e-4
    assert report["model"]["dim_att_lora"] == 8 and report["trainable_params"] > 0
    assert report["memory_estimate_gib"] > 0 and report["device"] == "cpu"
    assert 0 < report["memory_available_gib"] < 1e5
    summary = [l for l in res.stderr.splitlines() if l.startswith("dry run: ")]
    assert len(summary) == 1 and "mode full" in summary[0] and "too much" not in summary[0]
    assert summary[0].startswith("dry run: ready") and res.stderr.startswith("dry run: ")
    assert f"{report['trainable_params']:,} trainable" in summary[0]
    assert not (tmp_path / "dry" / "final.pth").exists()


def test_dry_run_warns_when_the_estimate_exceeds_the_device(data, tmp_path, monkeypatch):
    # A ctx_len of 1M over data whose windows are far shorter is planned at the longest window, not at
    # 1M tokens; on a device of 1 GiB the summary names what fits instead.
    from rwkvtune.train import memory_check
    from rwkvtune.train.memory import dry_run_summary

    monkeypatch.setattr(memory_check, "available_memory", lambda device: 2 ** 30)
    report = train(_cfg(data, tmp_path / "dry", ctx_len=1 << 20, batch_size=64), dry_run=True)
    assert report["memory_estimate"]["settings"]["ctx_len"] < 1000
    line = dry_run_summary(report)
    assert report["memory_estimate_gib"] > report["memory_available_gib"] == 1.0
    assert "too much for this device: to fit: --batch-size " in line and "--grad-accum" in line


def test_bad_option_and_missing_model_file_are_one_line_errors(data, tmp_path):
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data",
                          data["text"], "nonsense_option=3"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "nonsense_option" in res.stderr and "Traceback" not in res.stderr
    env = dict(os.environ, RWKVTUNE_MODEL_DIR=str(tmp_path / "empty"))
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--model", "0.1b", "--data", data["text"],
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(tmp_path / "empty") in res.stderr and "--init scratch" in res.stderr


def _train_cmd(data, out, steps):
    return [sys.executable, "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data", data["text"], "--out",
            str(out), "--ctx-len", "16", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2",
            "--max-steps", str(steps), "--save-every", "1", "--save-dtype", "fp32", "tensorboard=false"]


def test_resume_after_kill_reproduces_uninterrupted_run(data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # Both runs as subprocesses, so thread pools and library state are alike.
    subprocess.run(_train_cmd(data, full, 8), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_train_cmd(data, killed, 8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "step-0000003.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pth").exists(), "process finished before it could be killed"
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--resume", str(killed)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    la, lb = _losses(full), _losses(killed)
    assert len(lb) == 8
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-6
    wa, wb = torch.load(full / "final.pth"), torch.load(killed / "final.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_checkpoint_is_clear_error(tmp_path):
    with pytest.raises(RwkvtuneError, match="no resumable checkpoint"):
        train(TrainConfig(resume=str(tmp_path)))


def test_ddp_two_processes_match_one_process(data, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(_cfg(data, single, batch_size=4, max_steps=3, save_dtype="fp32", adam_eps=1e-8))  # see accumulation test
    import socket

    with socket.socket() as sock:  # a free port: a fixed one clashes with another suite running at once
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "rwkvtune", "train", "--model", data["ckpt"], "--data", data["text"], "--out", str(ddp),
           "--ctx-len", "16", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--max-steps", "3",
           "--save-every", "0", "--save-dtype", "fp32", "tensorboard=false", "adam_eps=1e-8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"steps"') == 1, res.stdout  # the summary, from the main rank only
    la, lb = _losses(single), _losses(ddp)
    assert len(lb) == 3 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    wa, wb = torch.load(single / "final.pth"), torch.load(ddp / "final.pth")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


RECIPES = sorted((REPO / "examples" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_load_and_dry_run(recipe, data, tmp_path):
    from rwkvtune.models.rwkv7.config import load_recipe

    cfg = TrainConfig().update(load_recipe(recipe), source=str(recipe))
    validate_config(cfg)
    # Dry-run each on the tiny checkpoint (the release files are not on this machine).
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--config", str(recipe), "--model", data["ckpt"],
                          "--init", "pretrained", "--out", str(tmp_path / "o"), "--dry-run", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["config"]["mode"] == cfg.mode and report["trainable_params"] > 0


def test_train_with_config_script_reports_missing_model_file(tmp_path):
    env = dict(os.environ, RWKVTUNE_MODEL_DIR=str(tmp_path / "models"), OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(REPO / "examples" / "train_with_config.sh"), "0.1b"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "rwkv7-g1-0.1b-20250307-ctx4096.pth" in res.stderr and str(tmp_path / "models") in res.stderr
    assert "RWKVTUNE_MODEL_DIR" in res.stderr and "--init scratch" in res.stderr
    res = subprocess.run(["bash", str(REPO / "examples" / "train_with_config.sh")], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_train_with_config_script_passes_args_through(data, tmp_path):
    # --model given after SIZE overrides the registry file: a real (tiny) run through the script.
    env = dict(os.environ, OUT=str(tmp_path / "out"), DATA=data["text"])
    res = subprocess.run(["bash", str(REPO / "examples" / "train_with_config.sh"), "0.1b", "--model", data["ckpt"],
                          "--max-steps", "1", "--ctx-len", "16", "--batch-size", "2", "tensorboard=false"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "final.pth").exists()


# ---- bad input: one-line errors, nothing lost ------------------------------------------------


def _cli(*args, timeout=120, **kw):
    env = dict(kw.pop("env", os.environ), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "rwkvtune", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def _one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    line = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    assert len(line) == 1, res.stderr
    for n in needles:
        assert n in line[0], (n, line[0])
    return line[0]


@pytest.mark.parametrize("override, words", [
    (dict(warmup_steps=-5), "warmup_steps: found -5, expected an integer with 0 <= warmup_steps"),
    (dict(save_every=-1), "save_every: found -1"),
    (dict(grad_clip=-1.0), "grad_clip: found -1.0"),
    (dict(lora_dropout=2.0), "lora_dropout: found 2.0"),
    (dict(lora_alpha=0.0), "lora_alpha: found 0.0"),
    (dict(wkv_backend="foo"), "wkv_backend: found 'foo'"),
    (dict(log_every=0), "log_every: found 0"),
    (dict(keep_checkpoints=0), "keep_checkpoints: found 0"),
    (dict(betas=(1.0, 0.9)), "betas: found [1.0, 0.9]"),
    (dict(seed=-1), "seed: found -1"),
    (dict(mode="lora", lora_targets=()), "lora_targets: empty"),
])
def test_out_of_range_options_are_refused(override, words):
    from rwkvtune.errors import ConfigError

    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        validate_config(TrainConfig(model="x", data="y", **override))


def test_unparsable_numbers_and_non_utf8_recipe(tmp_path):
    from rwkvtune.errors import ConfigError
    from rwkvtune.models.rwkv7.config import load_recipe

    with pytest.raises(ConfigError, match=r"lr: found 'abc', expected a number"):
        TrainConfig().update({"lr": "abc"}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"max_steps: found '1e3', expected an integer"):
        TrainConfig().update({"max_steps": "1e3"}, source="r.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="bin.yaml: not valid UTF-8"):
        load_recipe(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_recipe(tmp_path)


def test_duplicate_recipe_key_is_an_error_naming_file_key_and_lines(tmp_path):
    from rwkvtune.errors import ConfigError
    from rwkvtune.models.rwkv7.config import load_recipe

    recipe = tmp_path / "dup.yaml"
    recipe.write_text("mode: lora\nlr: 1e-4\nlora_r: 8\nlr: 2e-4\n")
    with pytest.raises(ConfigError, match=f"^{recipe}: duplicate key 'lr' on lines 2 and 4; keep only one"):
        load_recipe(recipe)
    # A key overriding one merged in from an anchor is no duplicate.
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &b {lora_r: 4, mode: lora}\nrun:\n  <<: *b\n  lora_r: 8\n")
    assert load_recipe(merged)["run"] == {"lora_r": 8, "mode": "lora"}


def test_out_of_range_values_name_the_recipe_or_the_command_line(data, tmp_path, capsys):
    from rwkvtune.cli import main
    from rwkvtune.errors import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("mode: lora\nlr: -1\n")
    base = ["train", "--model", data["ckpt"], "--data", data["text"], "--out", str(tmp_path / "o"), "--dry-run"]
    assert main([*base, "--config", str(recipe)]) == 2
    assert f"error: recipe {recipe}: lr: found -1.0, expected a finite number with 0 <= lr < 10" in capsys.readouterr().err
    assert main([*base, "--config", str(recipe), "--lr", "1e-4", "--seed", "-1"]) == 2
    assert "error: command line: seed: found -1, expected an integer with 0 <= seed" in capsys.readouterr().err
    assert main([*base, "lora_r=0"]) == 2
    assert "error: command line (key=value): lora_r: found 0, expected an integer with 1 <= lora_r" in capsys.readouterr().err
    # A bookkeeping option given with --resume is the command's, not the checkpoint's.
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=1, save_every=1))
    resume = TrainConfig().update({"resume": str(out), "save_every": -1}, source="command line")
    with pytest.raises(ConfigError, match="^command line: save_every: found -1, expected an integer with 0 <= save_every"):
        train(resume)


def test_bad_device_and_option_on_cli_are_one_line_errors(data, tmp_path):
    base = ["train", "--model", data["ckpt"], "--data", data["text"], "--out", str(tmp_path / "o"), "--dry-run"]
    if not torch.cuda.is_available():
        _one_line_error(_cli(*base, "--device", "cuda"), "--device cuda", "CUDA is not available", "--device cpu")
    _one_line_error(_cli(*base, "lora_dropout=2", "device=tpu"), "lora_dropout: found 2.0")


def test_bare_cuda_device_is_not_passed_to_set_device(monkeypatch):
    # torch.cuda.set_device(torch.device("cuda")) raises "Expected a torch.device with a specified index".
    from rwkvtune.train.runtime import Dist, select_device

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(torch._utils._get_device_index(dev)))
    assert select_device("cuda", Dist()) == "cuda" and calls == []
    assert select_device("cuda", Dist(1, 2, 1)) == "cuda:1" and calls == [1]
    assert select_device("cpu", Dist()) == "cpu" and calls == [1]


def test_out_file_and_existing_run_are_refused(data, tmp_path):
    from rwkvtune.errors import ConfigError

    (tmp_path / "file").write_text("keep me")
    res = _cli("train", "--model", data["ckpt"], "--data", data["text"], "--out", str(tmp_path / "file" / "run"))
    _one_line_error(res, str(tmp_path / "file"), "is a file, not a directory")
    assert (tmp_path / "file").read_text() == "keep me"
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=1))
    before = (out / "final.pth").read_bytes()
    with pytest.raises(ConfigError, match=f"already holds a run.*--resume {out}"):
        train(_cfg(data, out, max_steps=1, lr=5e-3))
    assert (out / "final.pth").read_bytes() == before


def test_resume_bad_dirs_corrupt_checkpoint_and_changed_options(data, tmp_path):
    from rwkvtune.errors import ConfigError

    with pytest.raises(RwkvtuneError, match="no such directory"):
        train(TrainConfig(resume=str(tmp_path / "nope")))
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=2, save_every=1))
    with pytest.raises(ConfigError, match=r"saved with ctx_len=16 but this command sets ctx_len=32"):
        train(TrainConfig(resume=str(out), ctx_len=32, max_steps=3))
    latest = out / "checkpoints" / "step-0000002.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(RwkvtuneError, match="step-0000002.pt: cannot read this resumable checkpoint"):
        train(TrainConfig(resume=str(out), max_steps=3))


class _Planted:
    """A pickle that runs code when unpickled: it creates the directory ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_never_runs_code_from_a_planted_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=2, save_every=1))
    marker = tmp_path / "pwned"
    planted = out / "checkpoints" / "step-0000002.pt"
    ck = torch.load(planted, weights_only=True)  # what train writes loads without unpickling objects
    ck["payload"] = _Planted(marker)
    torch.save(ck, planted)
    with pytest.raises(RwkvtuneError) as e:
        train(TrainConfig(resume=str(out), max_steps=3))
    assert not marker.exists()
    msg = str(e.value)
    assert "step-0000002.pt" in msg and "never unpickles" in msg and "--resume" not in msg


def test_latest_pointer_cannot_lead_out_of_the_run(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=2, save_every=1))
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"not read")
    for target in ("../../elsewhere.pt", str(outside), "step-0000009.pt"):
        (out / "checkpoints" / "latest").write_text(target + "\n")
        from rwkvtune.train.checkpointing import latest_checkpoint

        assert latest_checkpoint(out) == out / "checkpoints" / "step-0000002.pt"
    link = out / "checkpoints" / "step-0000007.pt"
    link.symlink_to(outside)
    (out / "checkpoints" / "latest").write_text(link.name + "\n")
    assert latest_checkpoint(out) == out / "checkpoints" / "step-0000002.pt"
    link.unlink()
    assert train(TrainConfig(resume=str(out), max_steps=3))["steps"] == 3


def test_output_files_follow_umask(data, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(_cfg(data, out, max_steps=1))
    finally:
        os.umask(old)
    for name in ("final.pth", "config.yaml", "summary.json", "checkpoints/step-0000001.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_ctx_len_beyond_data_trims_padding_and_warns(data, tmp_path, capsys):
    from rwkvtune.train.data import collate

    item = {"input_ids": torch.arange(1, 9), "labels": torch.tensor([2, 3, 4, -100, -100, -100, -100, -100])}
    batch = collate([item, {**item, "labels": torch.full((8,), -100)}], "cpu")
    assert batch["input_ids"].shape == (2, 3) and batch["labels"][1].tolist() == [-100] * 3
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "red blue green cat dog bird."}) + "\n")
    a = train(_cfg(data, tmp_path / "a", data=str(one), ctx_len=64, batch_size=1, max_steps=1))
    b = train(_cfg(data, tmp_path / "b", data=str(one), ctx_len=1 << 20, batch_size=4, max_steps=1))
    assert abs(a["loss"] - b["loss"]) < 1e-5  # the same window, repeated; a 1M ctx_len costs nothing
    assert "fewer than one batch of 4" in capsys.readouterr().err


@pytest.mark.parametrize("signum,status,stopped", [
    (signal.SIGINT, 130, "stopped by Ctrl-C"),
    (signal.SIGTERM, 143, "stopped by SIGTERM"),
])
def test_signal_finishes_the_step_saves_and_exits(data, tmp_path, signum, status, stopped):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _train_cmd(data, out, 10000)
    cmd[cmd.index("--save-every") + 1] = "0"  # the checkpoint must come from the signal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status and "Traceback" not in err, err[-2000:]
    if signum == signal.SIGINT:
        assert "Ctrl-C: stopping after this step to save a resumable checkpoint" in err
    lines = [l for l in err.splitlines() if l.startswith("stopped by ")]
    saved = sorted((out / "checkpoints").glob("step-*.pt"))
    assert len(saved) == 1 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"{stopped} after step ") and "error: " not in err
    assert f"saved the resumable checkpoint {saved[0]}" in lines[0]
    assert lines[0].endswith(f"resume with: rwkvtune train --resume {out}")
    assert not (out / "final.pth").exists()


def test_second_ctrl_c_quits_at_once_and_keeps_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(data, out, 10000), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "checkpoints" / "step-0000002.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    # Either the second Ctrl-C cut the step short (the checkpoints on disk are named), or the
    # step had already ended and its checkpoint was saved: both leave a resumable run.
    assert (f"stopped by Ctrl-C; the checkpoints in {out / 'checkpoints'} are kept" in err
            or "stopped by Ctrl-C after step " in err), err[-2000:]
    assert "error: " not in err, err[-2000:]
    assert f"--resume {out}" in err and any((out / "checkpoints").glob("step-*.pt"))


def test_sigterm_mid_step_finishes_the_step_saves_and_resumes_exactly(data, tmp_path, monkeypatch):
    import rwkvtune.train.loss as loss_mod
    import rwkvtune.train.trainer as trainer_mod

    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(data, full, max_steps=4))
    real, calls = loss_mod.chunked_loss_sum, {"n": 0}

    def sigterm_in_step_2(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2's forward
        return real(*args, **kw)

    monkeypatch.setattr(loss_mod, "chunked_loss_sum", sigterm_in_step_2)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(trainer_mod.Terminated, match=f"after step 2 of 4; saved the resumable checkpoint "
                                                     f"{part / 'checkpoints' / 'step-0000002.pt'}") as e:
        train(_cfg(data, part, max_steps=4))
    # handlers only for the duration of train()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert e.value.exit_status == 143
    monkeypatch.setattr(loss_mod, "chunked_loss_sum", real)
    train(TrainConfig(resume=str(part)))
    la, lb = _losses(full), _losses(part)
    assert len(lb) == 4 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-6
    # Outside the loop (setup, final saving) there is no step to finish: it stops at once.
    from rwkvtune.train.run_dir import RunDir
    from rwkvtune.train.signals import GracefulStop

    stop = GracefulStop()
    stop.run_dir = RunDir(part)
    with pytest.raises(trainer_mod.Terminated, match=f"the checkpoints in {part / 'checkpoints'} are kept"):
        stop(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        GracefulStop()(signal.SIGINT, None)


def test_log_every_writes_token_weighted_means(data, tmp_path):
    every = tmp_path / "every"
    train(_cfg(data, every, max_steps=5, log_every=1))
    rows1 = [json.loads(l) for l in (every / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "by2"
    summary = train(_cfg(data, out, max_steps=5, log_every=2))
    rows2 = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == [2, 4, 5]  # and the last step, always
    tok = {r["step"]: r["tokens"] - prev for r, prev in zip(rows1, [0] + [r["tokens"] for r in rows1])}
    loss = {r["step"]: r["loss"] for r in rows1}
    for row, steps in zip(rows2, ([1, 2], [3, 4], [5])):
        mean = sum(loss[i] * tok[i] for i in steps) / sum(tok[i] for i in steps)
        assert abs(row["loss"] - mean) < 1e-5 and row["tokens"] == rows1[steps[-1] - 1]["tokens"]
        assert row["grad_norm"] == pytest.approx(max(rows1[i - 1]["grad_norm"] for i in steps), rel=1e-5)
    assert summary["loss"] == rows2[-1]["loss"]


def test_eval_bad_batch_size_and_wandb_missing(data, tmp_path):
    import importlib.util

    from rwkvtune.errors import ConfigError

    _one_line_error(_cli("eval", "--model", data["ckpt"], "--data", data["text"], "--batch-size", "0"),
                    "--batch-size: found 0")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            train(_cfg(data, tmp_path / "w", wandb="proj"))
        assert not (tmp_path / "w").exists()
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="tensorboard=true needs the tensorboard package"):
            train(_cfg(data, tmp_path / "t", tensorboard=True))
        assert not (tmp_path / "t").exists()


def test_unwritable_out_is_refused_before_work(data, tmp_path, monkeypatch):
    from rwkvtune.errors import ConfigError
    from rwkvtune.train import setup_checks

    monkeypatch.setattr(setup_checks.os, "access", lambda path, mode: False)  # as on a read-only mount
    with pytest.raises(ConfigError, match=f"--out {tmp_path / 'ro' / 'run'}: {tmp_path} is not writable"):
        train(_cfg(data, tmp_path / "ro" / "run"))
    assert not (tmp_path / "ro").exists()


# ---- resume, reporting and CLI details ---------------------------------------------------------


def _snapshot(out):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(out).rglob("*") if p.is_file()}


def test_resume_of_a_complete_run_touches_nothing_and_a_larger_max_steps_continues(data, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(_cfg(data, out, max_steps=2, save_every=1, eval_data=data["text"]))
    before = _snapshot(out)
    capsys.readouterr()
    again = train(TrainConfig(resume=str(out)))
    assert again == summary == json.loads((out / "summary.json").read_text()) and again["loss"] is not None
    assert f"run {out} is complete (2/2 steps); nothing to do (raise --max-steps" in capsys.readouterr().err
    assert _snapshot(out) == before  # no file rewritten, no metrics row appended
    more = train(TrainConfig(resume=str(out), max_steps=3))
    err = capsys.readouterr().err
    assert f"resuming {out} from step 2 of 3 (checkpoint {out / 'checkpoints' / 'step-0000002.pt'})" in err
    assert more["steps"] == 3 and len(_losses(out)) == 3 and more["loss"] == _losses(out)[-1]


def test_run_finished_but_killed_before_summary_finishes_on_resume(data, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(data, out, max_steps=2, eval_data=data["pr"]))
    (out / "summary.json").unlink()  # as if killed after the final checkpoint, before summary.json
    again = train(TrainConfig(resume=str(out)))
    assert again["steps"] == 2 and again["loss"] == summary["loss"]
    assert again["eval_loss"] == summary["eval_loss"]
    assert json.loads((out / "summary.json").read_text()) == again
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]  # the final eval is not logged twice


def test_saved_paths_are_absolute_so_resume_works_from_any_directory(data, tmp_path, monkeypatch):
    import yaml

    from rwkvtune.data.prepare import prepare_binidx
    from rwkvtune.errors import ConfigError
    from rwkvtune.tokenizer import get_tokenizer

    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    prepare_binidx(data["text"], str(work / "d" / "corpus"), get_tokenizer(), workers=1)
    (work / "d" / "base.pth").write_bytes(Path(data["ckpt"]).read_bytes())
    monkeypatch.chdir(work)
    out = tmp_path / "run"
    train(_cfg(data, out, model="d/base.pth", data="d/corpus", eval_data=os.path.relpath(data["text"]),
               max_steps=2, save_every=1))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(work / "d" / "base.pth") and saved["data"] == str(work / "d" / "corpus")
    assert saved["eval_data"] == data["text"]
    # a relative path given with --resume equals the saved absolute one; another file does not
    assert train(TrainConfig(resume=str(out), data="d/corpus", max_steps=3))["steps"] == 3
    with pytest.raises(ConfigError, match="saved with data="):
        train(TrainConfig(resume=str(out), data=data["text"], max_steps=4))
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved absolute paths still resolve
    assert train(TrainConfig(resume=str(out), max_steps=4))["steps"] == 4
    # registry names stay names
    from rwkvtune.train.checkpointing import absolute_paths

    assert absolute_paths(TrainConfig(model="0.1b", data="nope.jsonl")).to_dict()["model"] == "0.1b"


def test_old_run_with_relative_paths_resumes_from_its_directory(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data["dir"])
    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=2, save_every=1))
    ck_path = out / "checkpoints" / "step-0000002.pt"
    ck = torch.load(ck_path, weights_only=True)
    del ck["manifest"]  # as saved before manifests existed (the edits below would not match it)
    ck["config"].update(model="base.pth", data="text.jsonl")  # as saved before paths were made absolute
    import numpy as np

    ck["rng"]["numpy"] = np.random.get_state()  # and with numpy's own RNG tuple, as 0.1.0 saved it
    torch.save(ck, ck_path)
    assert train(TrainConfig(resume=str(out), data="text.jsonl", max_steps=3))["steps"] == 3


def test_dry_run_of_a_registry_model_without_its_file_counts_from_the_config(data, tmp_path):
    from rwkvtune.configs.model_loader import load_model_config

    env = dict(os.environ, RWKVTUNE_MODEL_DIR=str(tmp_path / "empty"))
    expected = str(tmp_path / "empty" / load_model_config("0.1b").model_file)
    n_params = load_model_config("0.1b").n_params
    for mode in ("full", "lora"):
        res = _cli("train", "--model", "0.1b", "--data", data["text"], "--out", str(tmp_path / "o"), "--mode", mode,
                   "--dry-run", "--json", env=env)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["model_file_missing"] == expected
        assert "parameters are counted from the config" in res.stderr and "rwkvtune models download 0.1b" in res.stderr
        assert report["model"]["n_layer"] == 12 and report["memory_estimate_gib"] > 0
        if mode == "full":
            assert report["trainable_params"] + report["unused_params"] == n_params and report["frozen_params"] == 0
        else:
            assert 0 < report["trainable_params"] < report["frozen_params"] < n_params
    # a real run still needs the file
    _one_line_error(_cli("train", "--model", "0.1b", "--data", data["text"], "--out", str(tmp_path / "o"), env=env),
                    "model file not found", "rwkvtune models download 0.1b", "huggingface.co/BlinkDL/rwkv7-g1")


def test_header_says_up_to_and_counts_layer0_v_as_unused(data, tmp_path, capsys):
    train(_cfg(data, tmp_path / "run", max_steps=1))
    err = capsys.readouterr().err
    trainable = sum(p.numel() for p in RWKV7.from_checkpoint(data["ckpt"]).parameters()) - 544
    assert (f"{trainable:,} trainable / 0 frozen params (+544 unused layer-0 v-residual params)" in err
            and "1 step of up to 32 tokens" in err), err
    res = _cli("train", "--model", data["ckpt"], "--data", data["text"], "--out", str(tmp_path / "d"), "--ctx-len",
               "16", "--batch-size", "2", "--dry-run", "--json")
    report = json.loads(res.stdout)
    # v0 [1,1,32] + v1 [32,8] + v2 [8,32] of layer 0
    assert report["unused_params"] == 544 and report["frozen_params"] == 0


def test_grad_accum_beyond_the_data_warns(data, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "red blue green cat dog bird."}) + "\n")
    train(_cfg(data, tmp_path / "a", data=str(one), ctx_len=64, batch_size=1, grad_accum=3, max_steps=1))
    assert "fewer than the 3 one optimizer step uses (1 per batch x grad_accum 3)" in capsys.readouterr().err


def test_ctrl_c_before_any_checkpoint_says_nothing_to_resume(data, tmp_path, monkeypatch, capsys):
    from rwkvtune.cli import main
    from rwkvtune.train import trainer as trainer_mod

    def interrupted(cfg, dry_run=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "train", interrupted)
    assert main(["train", "--model", data["ckpt"], "--data", data["text"], "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == ("stopped by Ctrl-C; no checkpoint was saved yet, so there is nothing to resume; rerun "
                           "the command to start again")


def test_eval_ctx_len_is_the_flag_or_the_models_never_a_config_beside_the_file(data, tmp_path, capsys):
    """A config.yaml beside --model (here the run's, ctx_len 16) no longer decides the window: the
    same model scored at another window length would compare unfairly with its base."""
    from rwkvtune.cli import main
    from rwkvtune.models.rwkv7 import RWKV7

    out = tmp_path / "run"
    train(_cfg(data, out, max_steps=1))
    capsys.readouterr()
    own = RWKV7.from_checkpoint(out / "final.pth").config.ctx_len
    assert own != 16
    assert main(["eval", "--model", str(out / "final.pth"), "--data", data["text"]]) == 0
    beside = json.loads(capsys.readouterr().out)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "final.pth"
    moved.write_bytes((out / "final.pth").read_bytes())  # the same model, no config.yaml beside it
    assert main(["eval", "--model", str(moved), "--data", data["text"]]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert beside == alone and beside["ctx_len"] == own
    assert main(["eval", "--model", str(out / "final.pth"), "--data", data["text"], "--ctx-len", "16"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert short["ctx_len"] == 16 and short["eval_loss"] != beside["eval_loss"]


def test_run_and_checkpoint_counters_are_built_by_keyword():
    """Issue 21: Run takes keywords only (20 positional arguments read wrong silently when two of
    the same type swap); a checkpoint's counters travel as one CheckpointState, read back equal;
    a method's count() is named (units, tokens)."""
    import dataclasses

    from rwkvtune.train.checkpointing import CheckpointState
    from rwkvtune.train.methods.base import BatchCount
    from rwkvtune.train.methods.sft import SFT
    from rwkvtune.train.trainer import Run

    assert all(f.kw_only for f in dataclasses.fields(Run))
    with pytest.raises(TypeError):
        Run(TrainConfig(), None)
    state = CheckpointState(step=3, tokens=120, method_state={"buffer": [{"a": 1}]})
    assert CheckpointState.read(state.fields()) == state
    assert CheckpointState.read({"step": 2, "tokens": 5}) == CheckpointState(step=2, tokens=5, method_state={})
    labels = torch.tensor([[-100, 1, 2], [3, -100, -100]])
    count = SFT(TrainConfig()).count({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": labels})
    assert isinstance(count, BatchCount) and (count.units, count.tokens) == (3.0, 6.0)
