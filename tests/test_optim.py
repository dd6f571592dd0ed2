"""The reference trainer's optimizer recipe against fixed numbers (docs/rwkv7.md §5)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_state_dict
from rwkvtune.models.rwkv7 import RWKV7
from rwkvtune.train.optim import lr_at, param_groups, set_lr


@pytest.mark.parametrize("step, expected", [
    (0, 1e-5),            # warmup multiplier 0.01 at step 0
    (5, 5.05e-4),         # 1e-3 * (0.01 + 0.99 * 5/10)
    (10, 1e-3),           # end of warmup: the cosine starts at lr
    (35, 8.681981e-4),    # progress 0.25: 1e-4 + 0.5 * 9e-4 * (1 + cos(pi/4))
    (60, 5.5e-4),         # progress 0.5: the midpoint of lr and lr_final
    (110, 1e-4),          # the end: lr_final
    (500, 1e-4),          # past the end: stays at lr_final
])
def test_lr_schedule_reference_values(step, expected):
    assert lr_at(step, 1e-3, 1e-4, 10, 110) == pytest.approx(expected, rel=1e-6)


def test_lr_schedule_without_warmup_starts_at_lr():
    assert lr_at(0, 2e-4, 0.0, 0, 100) == pytest.approx(2e-4)
    assert lr_at(50, 2e-4, 0.0, 0, 100) == pytest.approx(1e-4)


def _model():
    from rwkvtune.configs.model_loader import ModelConfig

    sd = make_state_dict()
    model = RWKV7(ModelConfig(model_name="t", n_layer=2, n_embd=64, head_size_a=16, vocab_size=256,
                              dim_att_lora=8, dim_aaa_lora=12, dim_mv_lora=4, dim_gate_lora=16))
    model.load_state_dict(sd)
    return model


def test_param_groups_w0_double_lr_and_decay_only_on_2d_weights():
    model = _model()
    model.blocks[0].att.v0.requires_grad_(False)  # frozen parameters are left out
    groups = {g["name"]: g for g in param_groups(model.named_parameters(), 1e-3, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert members["w0"] == ["blocks.0.att.w0", "blocks.1.att.w0"]
    assert groups["w0"]["lr"] == 2e-3 and groups["w0"]["weight_decay"] == 0.0
    matrices = ["emb.weight", "head.weight"] + [f"blocks.{i}.{m}.weight" for i in range(2) for m in (
        "att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")]
    assert members["decay"] == sorted(matrices) and groups["decay"]["weight_decay"] == 0.1
    assert groups["decay"]["lr"] == 1e-3 and groups["no_decay"]["lr"] == 1e-3
    # The low-rank projections are 2-D but not ".weight": no decay, like LayerNorms and mix vectors.
    assert {"blocks.1.att.w1", "blocks.1.att.g2", "blocks.0.att.r_k", "ln_out.weight"} <= set(members["no_decay"])
    every = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(sum(members.values(), [])) == sorted(every)  # each trainable tensor exactly once
    # set_lr keeps the 2x for w0 at every step of the schedule
    opt = torch.optim.AdamW(list(groups.values()), lr=1e-3)
    set_lr(opt, 3e-4)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"w0": 6e-4, "decay": 3e-4, "no_decay": 3e-4}


def test_weight_decay_zero_puts_matrices_without_decay():
    groups = {g["name"]: g for g in param_groups(_model().named_parameters(), 1e-3, 0.0)}
    assert "decay" not in groups and all(g["weight_decay"] == 0.0 for g in groups.values())
    assert math.isclose(groups["w0"]["lr"], 2e-3)
