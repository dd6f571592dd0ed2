"""LoRA, state tuning and long-context (chunked, state-carrying) training on tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import train_losses as _losses, write_checkpoint, write_word_text
from rwkvtune.errors import CheckpointError, ConfigError
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.models.rwkv7.config import TrainConfig
from rwkvtune.peft.lora import apply_lora, load_adapter
from rwkvtune.train.objective import TrainModule
from rwkvtune.train.trainer import train

SMALL = dict(n_layer=2, n_embd=32, head_size=16, vocab=65536, d_decay=8, d_aaa=8, d_mv=8, d_gate=8)
LORA_KEYS = (".att.receptance.", ".att.key.", ".att.value.", ".att.output.", ".ffn.key.", ".ffn.value.")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    text = Path(write_word_text(d / "text.jsonl"))
    long = d / "long.jsonl"  # samples much longer than ctx_len=16
    long.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 13 + j) % 50}" for j in range(60))}) + "\n"
                            for i in range(3)))
    return {"text": str(text), "long": str(long), "ckpt": write_checkpoint(d / "base.pth", **SMALL),
            "other": write_checkpoint(d / "other.pth", seed=7, **SMALL)}


def _cfg(fixture, out, **kw):
    base = dict(model=fixture["ckpt"], data=fixture["text"], out=str(out), ctx_len=16, batch_size=2, max_steps=3,
                lr=1e-2, warmup_steps=0, save_every=0, tensorboard=False, save_dtype="fp32")
    base.update(kw)
    return TrainConfig(**base)


# ---- LoRA ----------------------------------------------------------------------------------


def test_lora_training_outputs_merge_and_base_untouched(data, tmp_path):
    out = tmp_path / "lora"
    train(_cfg(data, out, mode="lora", lora_r=4, lora_alpha=8))
    base = torch.load(data["ckpt"])
    final = torch.load(out / "final.pth")
    assert set(final) == set(base)
    adapter = torch.load(out / "adapter.pth")
    assert adapter["r"] == 4 and adapter["alpha"] == 8 and adapter["format"] == "rwkvtune-lora-v1"
    assert set(adapter["targets"]) == {"att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"}
    assert len(adapter["base_fingerprint"]) == 32 and adapter["parts"] == {}
    for k in base:
        if any(t in k for t in LORA_KEYS):
            owner = k[: -len(".weight")]
            A, B = adapter["lora"][owner + ".lora_A"], adapter["lora"][owner + ".lora_B"]
            assert B.abs().max() > 0, f"{k}: adapter did not train"
            expect = base[k].float() + 2.0 * (B @ A)
            assert torch.allclose(final[k], expect, atol=1e-6)
        else:
            assert torch.equal(final[k], base[k]), f"{k} changed in LoRA mode"


def test_merged_logits_equal_adapter_model_and_merge_cli(data, tmp_path):
    out = tmp_path / "lora"
    train(_cfg(data, out, mode="lora", lora_r=4, train_parts=("ln",)))
    model = RWKV7.from_checkpoint(data["ckpt"])
    load_adapter(model, out / "adapter.pth")
    merged = RWKV7.from_checkpoint(out / "final.pth")
    idx = torch.randint(0, 65536, (2, 23))
    with torch.no_grad():
        assert (model(idx) - merged(idx)).abs().max() < 1e-5
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "merge-lora", data["ckpt"], str(out / "adapter.pth"),
                          str(tmp_path / "merged.pth"), "--save-dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    a, b = torch.load(out / "final.pth"), torch.load(tmp_path / "merged.pth")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # trained parts (LayerNorms) are carried in the adapter file
    adapter = torch.load(out / "adapter.pth")
    assert "blocks.0.ln1.weight" in adapter["parts"] and adapter["train_parts"] == ["ln"]


def test_adapter_refuses_another_base(data, tmp_path):
    out = tmp_path / "lora"
    train(_cfg(data, out, mode="lora", max_steps=1))
    other = RWKV7.from_checkpoint(data["other"])
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(other, out / "adapter.pth")
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "merge-lora", data["other"], str(out / "adapter.pth"),
                          str(tmp_path / "x.pth")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "another base model" in res.stderr and "Traceback" not in res.stderr


def test_lora_target_matching_nothing_is_an_error(data):
    model = RWKV7.from_checkpoint(data["ckpt"])
    with pytest.raises(ConfigError, match="att.nonexistent"):
        apply_lora(model, ["att.key", "att.nonexistent"], r=4, alpha=8)


def test_lora_only_adapters_train_and_custom_targets(data, tmp_path):
    from rwkvtune.peft import get_mode
    from rwkvtune.train.objective import count_params

    model = RWKV7.from_checkpoint(data["ckpt"])
    cfg = _cfg(data, tmp_path, mode="lora", lora_r=2, lora_targets=("att.key",), train_parts=("head",))
    module = TrainModule.for_mode(get_mode("lora"), model, cfg.resolve(model.config))
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n == "model.head.weight" for n in names)
    assert sum(".lora_A" in n for n in names) == 2  # one att.key per layer
    trainable, frozen, _ = count_params(module)
    assert trainable == 2 * 2 * (32 * 2) + 65536 * 32 and frozen > 0


def test_lora_bf16_base_stays_frozen_and_identical(data, tmp_path):
    from rwkvtune.peft import get_mode
    from rwkvtune.train.data import collate
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT

    model = RWKV7.from_checkpoint(data["ckpt"])
    cfg = _cfg(data, tmp_path, mode="lora", precision="bf16").resolve(model.config)
    module = TrainModule.for_mode(get_mode("lora"), model, cfg)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    assert all(t.dtype == torch.bfloat16 for t in before.values())
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = collate([{"input_ids": torch.arange(1, 17), "labels": torch.arange(2, 18)}], "cpu")
    for _ in range(2):
        ctx = StepContext(cfg=cfg, device="cpu", autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                          scale=1 / 16)
        SFT(cfg).forward_backward(module, batch, ctx)
        opt.step()
        opt.zero_grad()
    after = dict(module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(after[n].abs().max() > 0 for n in after if "lora_B" in n)


def test_lora_resume_continues_identically(data, tmp_path, monkeypatch):
    import rwkvtune.train.trainer as trainer_mod

    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(data, full, mode="lora", max_steps=4, save_every=2))
    real_lr_at = trainer_mod.lr_at

    def interrupt_at_third_step(step, *a):
        if step == 2:
            raise KeyboardInterrupt  # as if the process died after checkpoint 2
        return real_lr_at(step, *a)

    monkeypatch.setattr(trainer_mod, "lr_at", interrupt_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, part, mode="lora", max_steps=4, save_every=2))
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)
    train(TrainConfig(resume=str(part)))
    la, lb = _losses(full), _losses(part)
    assert len(lb) == 4 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-6
    a, b = torch.load(full / "adapter.pth"), torch.load(part / "adapter.pth")
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])


# ---- state tuning --------------------------------------------------------------------------


def test_state_tuning_trains_only_the_state(data, tmp_path):
    out = tmp_path / "state"
    train(_cfg(data, out, mode="state", max_steps=4, lr=None))
    losses = _losses(out)
    assert losses[-1] < losses[0]
    state = torch.load(out / "state.pth")
    assert tuple(state["wkv_init"].shape) == (2, 2, 16, 16) and state["wkv_init"].abs().max() > 0
    assert not (out / "final.pth").exists()
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 1e-2  # state mode's own default


def test_state_tuning_base_bit_identical(data, tmp_path):
    from rwkvtune.peft import get_mode

    model = RWKV7.from_checkpoint(data["ckpt"])
    cfg = _cfg(data, tmp_path, mode="state").resolve(model.config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    module = TrainModule.for_mode(get_mode("state"), model, cfg)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["wkv_init"]
    # a few real steps (weight decay on, as a misrouted group would show) must move only the state
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    idx = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss, _ = module.loss_sum(idx[:, :-1], idx[:, 1:], l2wrap=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert module.wkv_init.detach().abs().max() > 0  # trained away from zeros
    after = model.state_dict()
    assert list(after) == list(base)
    for k, v in base.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k  # bit for bit


def test_state_file_roundtrip_eval_and_generate(data, tmp_path):
    out = tmp_path / "state"
    train(_cfg(data, out, mode="state", max_steps=3, lr=5e-2))
    from rwkvtune.peft.state import load_state_file

    model = RWKV7.from_checkpoint(data["ckpt"])
    wkv = load_state_file(out / "state.pth", model)
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = model(idx)
        tuned = model(idx, wkv_init=wkv)
        s = model.zero_state(1)
        s.wkv.copy_(wkv[:, None])
        via_state = model(idx, state=s)
    assert (plain - tuned).abs().max() > 1e-4 and (tuned - via_state).abs().max() < 1e-5
    base_eval = subprocess.run([sys.executable, "-m", "rwkvtune", "eval", "--model", data["ckpt"], "--data",
                                data["text"], "--ctx-len", "16"], capture_output=True, text=True, timeout=300)
    tuned_eval = subprocess.run([sys.executable, "-m", "rwkvtune", "eval", "--model", data["ckpt"], "--data",
                                 data["text"], "--ctx-len", "16", "--state", str(out / "state.pth")],
                                capture_output=True, text=True, timeout=300)
    assert base_eval.returncode == 0 and tuned_eval.returncode == 0, tuned_eval.stderr
    b, t = json.loads(base_eval.stdout.splitlines()[-1]), json.loads(tuned_eval.stdout.splitlines()[-1])
    assert t["eval_loss"] < b["eval_loss"]
    other = write_checkpoint(tmp_path / "wide.pth", **{**SMALL, "n_embd": 64})
    res = subprocess.run([sys.executable, "-m", "rwkvtune", "eval", "--model", other, "--data", data["text"],
                          "--state", str(out / "state.pth")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "does not fit this model" in res.stderr


# ---- long context --------------------------------------------------------------------------


def test_chunked_long_sample_loss_equals_whole_sequence(data):
    from rwkvtune.train.data import WholeSamples, collate
    from rwkvtune.data.formats import read_samples
    from rwkvtune.tokenizer import get_tokenizer
    from rwkvtune.train.loss import loss_sum
    from rwkvtune.train.methods.base import StepContext
    from rwkvtune.train.methods.sft import SFT
    import contextlib

    samples, _ = read_samples(data["long"], get_tokenizer())
    ds = WholeSamples(samples)
    assert len(ds[0]["input_ids"]) > 3 * 16
    model = RWKV7.from_checkpoint(data["ckpt"])
    batch = collate([ds[i] for i in range(len(ds))], "cpu")
    with torch.no_grad():
        whole = float(loss_sum(model(batch["input_ids"]), batch["labels"])) / int((batch["labels"] != -100).sum())
    cfg = TrainConfig(ctx_len=16, batch_size=3, long_context=True)
    ctx = StepContext(cfg=cfg, device="cpu", autocast=contextlib.nullcontext)
    chunked = SFT(cfg).evaluate(TrainModule(model), ds, ctx)["eval_loss"]
    assert abs(whole - chunked) < 1e-5


def test_long_context_training_all_modes(data, tmp_path):
    losses = {}
    for mode in ("full", "lora", "state"):
        out = tmp_path / mode
        train(_cfg(data, out, mode=mode, data=data["long"], long_context=True, batch_size=2, max_steps=4,
                   lr=3e-2 if mode == "state" else 1e-2))
        losses[mode] = _losses(out)
    # Every mode starts from the base model exactly (LoRA's B and the state are zero), so the first
    # step's loss, on the same windows in the same order, is the same number.
    assert losses["lora"][0] == pytest.approx(losses["full"][0], abs=1e-6)
    assert losses["state"][0] == pytest.approx(losses["full"][0], abs=1e-6)
    for mode, seq in losses.items():
        assert seq[-1] < seq[0] - 0.05, (mode, seq)  # and each learns


def test_full_bptt_first_step_loss_equals_truncated(data, tmp_path):
    # Same forward, so the first step's loss is identical; gradients differ, so later steps may too.
    a, b = tmp_path / "tbptt", tmp_path / "full"
    train(_cfg(data, a, data=data["long"], long_context=True, max_steps=2))
    train(_cfg(data, b, data=data["long"], long_context=True, max_steps=2, bptt="full"))
    la, lb = _losses(a), _losses(b)
    assert abs(la[0] - lb[0]) < 1e-6 and la[1] != lb[1]


# ---- bad input ------------------------------------------------------------------------------


def test_merge_lora_never_overwrites_its_inputs(data, tmp_path):
    from rwkvtune.peft.lora import save_adapter

    model = RWKV7.from_checkpoint(data["ckpt"])
    apply_lora(model, ["att.key"], r=2, alpha=4)
    save_adapter(tmp_path / "adapter.pth", model)
    before = Path(data["ckpt"]).read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "outdir").mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "rwkvtune", "merge-lora", data["ckpt"],
                               str(tmp_path / "adapter.pth"), out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for out in (data["ckpt"], str(tmp_path / "outdir"))]
    (_, same_err), (_, dir_err) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2] and "Traceback" not in same_err + dir_err
    assert "is the BASE file" in same_err and "another OUT path" in same_err
    assert Path(data["ckpt"]).read_bytes() == before
    assert f"OUT {tmp_path / 'outdir'}: is a directory; give a file path" in dir_err


def test_adapter_and_state_paths_that_are_not_files(data, tmp_path):
    from rwkvtune.io.checkpoint import load_state_dict
    from rwkvtune.peft.lora import save_adapter
    from rwkvtune.peft.state import load_state_file, save_state_file

    model = RWKV7.from_checkpoint(data["ckpt"])
    with pytest.raises(CheckpointError, match="is a directory, expected the adapter.pth"):
        load_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match="is a directory, expected the state.pth"):
        load_state_file(tmp_path, model)
    (tmp_path / "junk.pth").write_text("not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read state file.*expected state.pth from --mode state"):
        load_state_file(tmp_path / "junk.pth", model)
    # An adapter or state file given where a model is expected says what it is.
    save_state_file(tmp_path / "state.pth", torch.zeros(2, 2, 16, 16), model)
    with pytest.raises(CheckpointError, match="this is a state-tuning file .*--state.*not a model checkpoint"):
        load_state_dict(tmp_path / "state.pth")
    apply_lora(model, ["att.key"], r=2, alpha=4)
    save_adapter(tmp_path / "adapter.pth", model)
    with pytest.raises(CheckpointError, match="this is a LoRA adapter .*merge-lora.*not a model checkpoint"):
        RWKV7.from_checkpoint(tmp_path / "adapter.pth")


def test_merge_lora_refuses_an_existing_out_without_force(data, tmp_path, capsys):
    from rwkvtune.cli import main
    from rwkvtune.peft.lora import save_adapter

    model = RWKV7.from_checkpoint(data["ckpt"])
    apply_lora(model, ["att.key"], r=2, alpha=4)
    save_adapter(tmp_path / "adapter.pth", model)
    out = tmp_path / "merged.pth"
    out.write_bytes(b"keep me")
    args = ["merge-lora", data["ckpt"], str(tmp_path / "adapter.pth"), str(out)]
    assert main(args) == 2
    assert f"error: OUT {out}: already exists; pass --force to overwrite it" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main([*args, "--force"]) == 0
    assert set(torch.load(out)) == set(torch.load(data["ckpt"]))
