"""DPO/IPO/SimPO and GRPO maths against numbers computed by hand (closed forms in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvtune.errors import ConfigError
from rwkvtune.train.methods.dpo import dpo_loss, preference_metrics, sequence_logps

LN2 = math.log(2)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x), by hand
    return math.log1p(math.exp(x))


# ---- log-probabilities ---------------------------------------------------------------------

# Logits [0, ln 2, ln 3]: softmax = [1/6, 2/6, 3/6], so log p(token k) = ln((k + 1) / 6).
ROW = [0.0, LN2, math.log(3)]


def test_sequence_logps_sums_scored_tokens_only():
    logits = torch.tensor([[ROW, ROW, ROW], [ROW, ROW, ROW]])
    labels = torch.tensor([[2, 0, -100], [-100, -100, 1]])
    s, n = sequence_logps(logits, labels)
    assert s.dtype == torch.float32 and n.tolist() == [2, 1]
    assert abs(float(s[0]) - (math.log(3 / 6) + math.log(1 / 6))) < 1e-6
    assert abs(float(s[1]) - math.log(2 / 6)) < 1e-6


def test_sequence_logps_bf16_logits_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.tensor([[1, 2, -100, 3], [0, -100, -100, 6]])
    s, _ = sequence_logps(logits, labels)
    assert s.dtype == torch.float32
    s.sum().backward()
    # d/dlogits sum log p = onehot(label) - softmax on scored positions, 0 elsewhere (fp64 by hand)
    x = logits.detach().double()
    expected = (torch.nn.functional.one_hot(labels.clamp(min=0), 7) - torch.softmax(x, -1)) \
        * (labels != -100).unsqueeze(-1)
    assert (logits.grad.double() - expected).abs().max() < 1e-2  # bf16 gradient storage


# ---- DPO family ----------------------------------------------------------------------------

# One pair: pi_c = -10, pi_r = -12, ref_c = ref_r = -11, n_c = 5, n_r = 4.
PI_C, PI_R, REF_C, REF_R, N_C, N_R = t(-10.0), t(-12.0), t(-11.0), t(-11.0), t(5.0), t(4.0)


def test_sigmoid_closed_form_and_rewards():
    # h = (-10 + 11) - (-12 + 11) = 2; beta h = 0.2; loss = log(1 + e^-0.2) = 0.598138869...
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="sigmoid")
    assert abs(float(out.losses) - 0.5981388693) < 1e-9
    assert abs(float(out.chosen_rewards) - 0.1) < 1e-12 and abs(float(out.rejected_rewards) + 0.1) < 1e-12


def test_sigmoid_label_smoothing_closed_form_and_gradient():
    # (1 - e) softplus(-x) + e softplus(x) = softplus(-x) + e x with x = 0.2, e = 0.1: 0.598138869 + 0.02
    pi_c = PI_C.clone().requires_grad_(True)
    out = dpo_loss(pi_c, PI_R, REF_C, REF_R, beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    assert abs(float(out.losses.detach()) - 0.6181388693) < 1e-9
    out.losses.sum().backward()
    # dL/dpi_c = beta * (-(1 - e) sigmoid(-x) + e sigmoid(x))
    sig = 1 / (1 + math.exp(-0.2))
    assert abs(float(pi_c.grad) - 0.1 * (-(0.9) * (1 - sig) + 0.1 * sig)) < 1e-12


@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_sigmoid_policy_equals_reference_gives_ln2_and_zero_margins(smoothing):
    pi = t(-3.0, -40.0, -7.5)
    out = dpo_loss(pi, pi - 1, pi, pi - 1, beta=0.3, loss_type="sigmoid", label_smoothing=smoothing)
    assert torch.allclose(out.losses, torch.full((3,), LN2, dtype=torch.float64), atol=1e-12)
    m = preference_metrics(out)
    assert m["rewards/margins"] == 0.0 and m["rewards/chosen"] == 0.0 and m["rewards/accuracies"] == 0.0


def test_ipo_closed_form_uses_per_token_log_ratios():
    # h = 1/5 - (-1)/4 = 0.45; 1/(2 beta) = 1 at beta 0.5; loss = (0.45 - 1)^2 = 0.3025
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss_type="ipo", chosen_n_tokens=N_C, rejected_n_tokens=N_R)
    assert abs(float(out.losses) - 0.3025) < 1e-12
    # rewards are the summed log-ratios times beta, as TRL's DPOTrainer logs them
    assert abs(float(out.chosen_rewards) - 0.5) < 1e-12 and abs(float(out.rejected_rewards) + 0.5) < 1e-12


def test_ipo_policy_equals_reference_gives_inverse_2beta_squared():
    pi = t(-3.0, -9.0)
    out = dpo_loss(pi, pi, pi, pi, beta=0.1, loss_type="ipo", chosen_n_tokens=t(3, 1), rejected_n_tokens=t(2, 9))
    assert torch.allclose(out.losses, t(25.0, 25.0))  # (0 - 1/(2 * 0.1))^2
    assert preference_metrics(out)["rewards/margins"] == 0.0


def test_simpo_closed_form_reference_free():
    # means: -10/5 = -2, -12/4 = -3; h = -2 + 3 - gamma/beta = 1 - 0.5 = 0.5; beta h = 1
    out = dpo_loss(PI_C, PI_R, None, None, beta=2.0, loss_type="simpo", simpo_gamma=1.0,
                   chosen_n_tokens=N_C, rejected_n_tokens=N_R)
    assert abs(float(out.losses) - softplus(-1.0)) < 1e-12  # log(1 + e^-1) = 0.3132616875
    m = preference_metrics(out)
    assert m["rewards/chosen"] == -4.0 and m["rewards/rejected"] == -6.0 and m["rewards/margins"] == 2.0
    assert m["logps/chosen"] == -2.0 and m["logps/rejected"] == -3.0  # CPOTrainer logs the means


def test_simpo_equal_means_costs_the_margin():
    # equal per-token means: beta h = -gamma, loss = log(1 + e^gamma); with smoothing e: + e * (-gamma)
    pi_c, pi_r = t(-6.0), t(-9.0)  # means -2 and -2
    out = dpo_loss(pi_c, pi_r, None, None, beta=2.0, loss_type="simpo", simpo_gamma=1.0,
                   chosen_n_tokens=t(3.0), rejected_n_tokens=t(4.5))
    assert abs(float(out.losses) - softplus(1.0)) < 1e-12
    out = dpo_loss(pi_c, pi_r, None, None, beta=2.0, loss_type="simpo", simpo_gamma=1.0, label_smoothing=0.2,
                   chosen_n_tokens=t(3.0), rejected_n_tokens=t(4.5))
    assert abs(float(out.losses) - (softplus(1.0) - 0.2)) < 1e-12
    assert preference_metrics(out)["rewards/margins"] == 0.0


def test_metrics_accuracy_counts_ties_as_wrong_and_logps_are_sums():
    # log-ratio margins per pair: +1 (win), 0 (tie), -2 (loss), +0.5 (win) -> accuracy 2/4
    pi_c, pi_r = t(-1.0, -2.0, -3.0, -4.0), t(-5.0, -6.0, -7.0, -8.0)
    ref_c, ref_r = t(-2.0, -2.0, -1.0, -4.5), t(-5.0, -6.0, -7.0, -8.0)
    out = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=1.0)
    m = preference_metrics(out)
    assert m["rewards/accuracies"] == 0.5
    assert m["rewards/chosen"] == (1 + 0 - 2 + 0.5) / 4 and m["rewards/rejected"] == 0.0
    assert m["rewards/margins"] == (1 + 0 - 2 + 0.5) / 4
    assert m["logps/chosen"] == -2.5 and m["logps/rejected"] == -6.5
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"}


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="kto"), "dpo loss_type: expected one of sigmoid, ipo, simpo, found 'kto'"),
    (dict(beta=0.0), "dpo beta: expected a number > 0, found 0.0"),
    (dict(label_smoothing=0.5), "dpo label_smoothing: expected 0 <= value < 0.5"),
    (dict(loss_type="ipo", label_smoothing=0.1), "loss_type 'ipo' has no label smoothing"),
    (dict(loss_type="ipo"), "loss_type 'ipo' needs chosen_n_tokens, found None"),
])
def test_dpo_refuses_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, **kw)


def test_dpo_needs_reference_except_simpo():
    with pytest.raises(ConfigError, match="loss_type 'sigmoid' needs ref_chosen_logps"):
        dpo_loss(PI_C, PI_R, None, None)
