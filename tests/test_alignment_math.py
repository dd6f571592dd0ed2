"""DPO/IPO/SimPO and GRPO maths against numbers computed by hand (closed forms in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvtune.errors import ConfigError
from rwkvtune.train.methods.dpo import dpo_loss, preference_metrics, sequence_logps
from rwkvtune.train.policy_loss import grpo_loss, group_advantages, reward_metrics, token_logps

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


def test_token_logps_with_temperature():
    logits = torch.tensor([[ROW, ROW]]) * 2  # at temperature 2 the row is ROW again
    lp = token_logps(logits, torch.tensor([[0, 2]]), temperature=2.0)
    assert torch.allclose(lp, torch.tensor([[math.log(1 / 6), math.log(3 / 6)]]), atol=1e-6)


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
    (dict(loss_type="kto"), "dpo loss_type: found 'kto', expected one of sigmoid, ipo, simpo"),
    (dict(beta=0.0), "dpo beta: found 0.0, expected > 0 for method dpo"),
    (dict(label_smoothing=0.5), "dpo label_smoothing: found 0.5, expected a finite number with 0 <= label_smoothing < 0.5"),
    (dict(loss_type="ipo", label_smoothing=0.1), "loss_type 'ipo' has no label smoothing"),
    (dict(loss_type="ipo"), "loss_type 'ipo' needs chosen_n_tokens, found None"),
])
def test_dpo_refuses_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, **kw)


def test_dpo_needs_reference_except_simpo():
    with pytest.raises(ConfigError, match="loss_type 'sigmoid' needs ref_chosen_logps"):
        dpo_loss(PI_C, PI_R, None, None)


# ---- GRPO: advantages ------------------------------------------------------------------------

REWARDS = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0)  # two groups of G = 4


def test_group_advantages_group_std():
    # group 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3); group 2: std 0 -> advantage 0
    a = group_advantages(REWARDS, 4, "group")
    k = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(a.double(), t(k, -k, -k, k, 0, 0, 0, 0), atol=1e-6)
    assert torch.equal(group_advantages(REWARDS, 4, True), a)


def test_group_advantages_batch_std_and_none():
    # batch: group means still 0.5 and 2; std over all 8: mean 1.25, sum of squares 5.5, / 7
    s = math.sqrt(5.5 / 7) + 1e-4
    a = group_advantages(REWARDS, 4, "batch")
    assert torch.allclose(a.double(), t(0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0), atol=1e-6)
    a = group_advantages(REWARDS, 4, "none")
    assert torch.allclose(a.double(), t(0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0))
    assert torch.equal(group_advantages(REWARDS, 4, False), a)


def test_group_advantages_single_generation_is_zero():
    assert torch.equal(group_advantages(t(3.0, 5.0), 1, "group"), torch.zeros(2))


def test_reward_metrics():
    m = reward_metrics(REWARDS, 4)
    assert m["reward"] == 1.25 and abs(m["reward_std"] - math.sqrt(5.5 / 7)) < 1e-6
    assert m["frac_reward_zero_std"] == 0.5  # the second group's four completions
    assert reward_metrics(REWARDS, 4, "batch")["frac_reward_zero_std"] == 0.0


@pytest.mark.parametrize("args, match", [
    ((REWARDS, 3), "N a multiple of num_generations 3, found shape \\[8\\]"),
    ((REWARDS, 0), "grpo num_generations: expected an integer >= 1, found 0"),
    ((REWARDS, 4, "std"), "grpo scale_rewards: expected one of group, batch, none .* found 'std'"),
])
def test_group_advantages_refuses_bad_input(args, match):
    with pytest.raises(ConfigError, match=match):
        group_advantages(*args)


# ---- GRPO: loss -----------------------------------------------------------------------------


def test_clipping_in_both_directions_and_clip_metrics():
    # four one-token sequences, epsilon 0.2 / epsilon_high 0.28:
    #   ratio 1.5, A +1: min(1.5, 1.28) = 1.28 -> loss -1.28, clipped high (no gradient)
    #   ratio 1.5, A -1: min(-1.5, -1.28) = -1.5 -> loss 1.5, not clipped (gradient -A ratio = 1.5)
    #   ratio 0.5, A -1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped low (no gradient)
    #   ratio 0.5, A +1: min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped (gradient -0.5)
    old = torch.zeros(4, 1, dtype=torch.float64)
    logps = torch.log(t(1.5, 1.5, 0.5, 0.5)).unsqueeze(1).requires_grad_(True)
    adv, mask = t(1.0, -1.0, -1.0, 1.0), torch.ones(4, 1)
    loss, m = grpo_loss(logps, old, None, adv, mask, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
    assert abs(float(loss.detach()) - (-1.28 + 1.5 + 0.8 - 0.5) / 4) < 1e-12
    loss.backward()
    assert torch.allclose(logps.grad.squeeze(1), t(0.0, 1.5, 0.0, -0.5) / 4)
    assert m["clip_ratio/low_mean"] == 0.25 and m["clip_ratio/high_mean"] == 0.25
    assert m["clip_ratio/region_mean"] == 0.5 and m["clip_ratio/low_min"] == 0.0 and m["clip_ratio/high_max"] == 1.0
    assert "kl" not in m  # beta 0: no KL term, no KL metric (as TRL)


def test_epsilon_high_defaults_to_epsilon():
    # ratio 1.25, A +1: clipped at 1.2 when epsilon_high follows epsilon, not clipped at 1.28
    logps, old = torch.log(t(1.25)).view(1, 1), torch.zeros(1, 1, dtype=torch.float64)
    sym, _ = grpo_loss(logps, old, None, t(1.0), torch.ones(1, 1), epsilon=0.2)
    asym, _ = grpo_loss(logps, old, None, t(1.0), torch.ones(1, 1), epsilon=0.2, epsilon_high=0.28)
    assert abs(float(sym) + 1.2) < 1e-12 and abs(float(asym) + 1.25) < 1e-12


# Ragged batch: sequence 0 has 3 tokens, sequence 1 has 1; advantages +1 and -2.
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
ADV = t(1.0, -2.0)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", ((-1.0) + 2.0) / 2),  # per-sequence means -1 and +2, then their mean
    ("dapo", (-3.0 + 2.0) / 4),  # all 4 tokens: -1 -1 -1 +2
    ("dr_grpo", (-3.0 + 2.0) / (2 * 6)),  # B = 2 x max_completion_length = 6
])
def test_normalisations_on_ragged_mask_with_ratio_one(loss_type, expected):
    # old_logps None (= logps detached, num_iterations 1): ratio exactly 1, so loss_t = -A
    logps = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss, m = grpo_loss(logps, None, None, ADV, MASK, loss_type=loss_type, max_completion_length=6)
    assert abs(float(loss.detach()) - expected) < 1e-12
    assert m["clip_ratio/region_mean"] == 0.0
    loss.backward()
    # d loss_t / d logp = -A * ratio = -A on scored tokens, divided by the normaliser
    weights = {"grpo": MASK / MASK.sum(1, keepdim=True) / 2, "dapo": MASK / 4, "dr_grpo": MASK / 12}[loss_type]
    assert torch.allclose(logps.grad, -ADV.unsqueeze(1) * weights)


def test_dapo_normaliser_override():
    logps = torch.zeros(2, 4, dtype=torch.float64)
    loss, _ = grpo_loss(logps, None, None, ADV, MASK, loss_type="dapo", num_items_in_batch=10)
    assert abs(float(loss) - (-3.0 + 2.0) / 10) < 1e-12


def test_k3_kl_term_and_metric():
    # ref - logp = ln 2 on sequence 0's tokens, -ln 2 on sequence 1's:
    # k3 = e^d - d - 1 = 1 - ln 2 (0.3069) and ln 2 - 1/2 (0.1931)
    logps = torch.zeros(2, 4, dtype=torch.float64).requires_grad_(True)
    ref = torch.tensor([[LN2] * 4, [-LN2] * 4], dtype=torch.float64)
    k0, k1 = 1 - LN2, LN2 - 0.5
    beta = 0.04
    loss, m = grpo_loss(logps, None, ref, ADV, MASK, beta=beta, loss_type="grpo")
    # grpo: seq 0 mean (-1 + beta k0), seq 1 (2 + beta k1), then their mean
    assert abs(float(loss.detach()) - ((-1 + beta * k0) + (2 + beta * k1)) / 2) < 1e-12
    assert abs(m["kl"] - (3 * k0 + k1) / 4) < 1e-12
    loss.backward()
    # d k3 / d logp = 1 - e^(ref - logp): 1 - 2 = -1 on seq 0, 1 - 1/2 = 0.5 on seq 1
    expected = (-ADV.unsqueeze(1) + beta * t(-1.0, 0.5).unsqueeze(1)) * MASK / MASK.sum(1, keepdim=True) / 2
    assert torch.allclose(logps.grad, expected)


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="bnpo"), "grpo loss_type: found 'bnpo', expected one of grpo, dapo, dr_grpo"),
    (dict(beta=0.1), "grpo_loss: beta 0.1 needs ref_logps .* found None"),
    (dict(loss_type="dr_grpo"), "grpo max_completion_length: loss_type 'dr_grpo' .* found None"),
    (dict(beta=-1.0), "grpo beta: found -1.0, expected a finite number with 0 <= beta"),
])
def test_grpo_loss_refuses_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        grpo_loss(torch.zeros(2, 4), None, None, ADV, MASK, **kw)


@pytest.mark.parametrize("epsilon, ok", [(0.0, False), (1e-6, True), (0.2, True), (0.999, True), (1.0, False)])
def test_the_epsilon_rule_is_one_rule(epsilon, ok):
    """0 < epsilon < 1 in the config (GRPOConfig.BOUNDS) and in grpo_loss alike: a value one of them
    takes, the other takes; the loss's refusal is the config's line."""
    from rwkvtune.models.rwkv7.config import TrainConfig
    from rwkvtune.models.rwkv7.method_config import GRPOConfig

    cfg = TrainConfig(model="m", data="d", method="grpo", reward=("exact_match:a",), epsilon=epsilon)
    problems = GRPOConfig(epsilon=epsilon, reward=("exact_match:a",)).problems()
    assert (problems == []) is ok
    if ok:
        cfg.validate()
        grpo_loss(torch.zeros(2, 4), None, None, ADV, MASK, epsilon=epsilon)
        return
    with pytest.raises(ConfigError, match="epsilon: found") as from_config:
        cfg.validate()
    with pytest.raises(ConfigError) as from_loss:
        grpo_loss(torch.zeros(2, 4), None, None, ADV, MASK, epsilon=epsilon)
    assert problems[0] in str(from_config.value) and str(from_loss.value).startswith(f"grpo {problems[0]}")
