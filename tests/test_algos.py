"""Unit tests for services/trainer/algos.py: every function against hand-computed values."""

import json
import math

import pytest
import torch

from chatrl.services.trainer import algos
from chatrl.services.trainer.algos import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    kl_per_token,
    last_token_index,
    lm_loss,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_rewards,
    pairwise_loss,
    policy_loss,
    ppo_ptx_loss,
    ranking_loss,
    reward_bias,
    shift_for_lm,
    value_loss,
)

torch.set_num_threads(1)

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, atol=tol, rtol=0)


def softplus(x):  # -log σ(x) = log(1 + e^{-x})
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------ masked stats

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]  # counted values: 1, 2, 5


def test_masked_mean_hand_values():
    # (1 + 2 + 5) / 3 = 8/3 over the whole batch (not the mean of row means (1.5 + 5) / 2)
    assert close(masked_mean(t(X), t(M)), 8 / 3)
    # per row: [(1+2)/2, 5/1]
    assert close(masked_mean(t(X), t(M), dim=1), [1.5, 5.0])
    # bool mask works the same
    assert close(masked_mean(t(X), t(M).bool()), 8 / 3)
    # empty mask → 0, not NaN
    assert close(masked_mean(t(X), torch.zeros(2, 3)), 0.0)


def test_masked_mean_ignores_nonfinite_outside_mask():
    x = t(X)
    x[0, 2] = float("-inf")
    x[1, 0] = float("nan")
    assert close(masked_mean(x, t(M)), 8 / 3)


def test_masked_var_hand_values():
    # values 1, 2, 5; mean 8/3; squared deviations 25/9 + 4/9 + 49/9 = 78/9
    # biased: 78/27 = 26/9; unbiased: (78/9) / 2 = 13/3
    assert close(masked_var(t(X), t(M), unbiased=False), 26 / 9)
    assert close(masked_var(t(X), t(M)), 13 / 3)
    # a single counted value: no division by zero
    single = masked_var(t(X), t([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.isfinite(single) and close(single, 0.0)


def test_masked_whiten_hand_values():
    out = masked_whiten(t(X), t(M), eps=0.0)
    s = math.sqrt(13 / 3)
    expected = [[(1 - 8 / 3) / s, (2 - 8 / 3) / s, 0.0], [0.0, (5 - 8 / 3) / s, 0.0]]
    assert close(out, expected)
    # shift_mean=False: only rescaled, mean 8/3 added back on counted tokens
    out2 = masked_whiten(t(X), t(M), shift_mean=False, eps=0.0)
    assert close(out2, [[e + 8 / 3 if m else 0.0 for e, m in zip(er, mr)] for er, mr in zip(expected, M)])
    # whitened counted values: mean 0, unbiased var 1
    assert close(masked_mean(out, t(M)), 0.0) and close(masked_var(out, t(M)), 1.0, tol=1e-4)


def test_last_token_index():
    mask = t([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 0, -1, 3]
    assert last_token_index(mask.bool()).tolist() == [2, 0, -1, 3]


# ------------------------------------------------------------------------------------------ LM losses

# V = 2. position 0: logits [0, 0]   → p(0) = 1/2
#        position 1: [ln 3, 0]       → p(0) = 3/4, p(1) = 1/4
#        position 2: [0, ln 3]       → p(0) = 1/4
LOGITS = [[[0.0, 0.0], [LN3, 0.0], [0.0, LN3]]]
TARGETS = [[0, 0, 0]]


def test_shift_for_lm():
    ids = t([[5, 6, 7, 8]], torch.long)
    inputs, targets, tmask = shift_for_lm(ids, t([[0, 0, 1, 1]]))
    assert inputs.tolist() == [[5, 6, 7]]
    assert targets.tolist() == [[6, 7, 8]]
    assert tmask.tolist() == [[0.0, 1.0, 1.0]]  # target 6 is not an assistant token
    assert shift_for_lm(ids)[2].tolist() == [[1.0, 1.0, 1.0]]


def test_lm_loss_hand_values():
    logits, targets = t(LOGITS), t(TARGETS, torch.long)
    # CE = [ln 2, ln(4/3), ln 4]; all tokens: ln(2 · 4/3 · 4) / 3 = ln(32/3) / 3
    assert close(lm_loss(logits, targets), math.log(32 / 3) / 3)
    # SFT mask [1, 1, 0]: (ln 2 + ln 4/3) / 2 = ln(8/3) / 2
    assert close(lm_loss(logits, targets, t([[1, 1, 0]])), math.log(8 / 3) / 2)
    # ignore_index behaves like a 0 in the mask
    assert close(lm_loss(logits, t([[0, 0, -100]], torch.long)), math.log(8 / 3) / 2)
    # PPO-ptx: coefficient times the LM loss
    assert close(ppo_ptx_loss(logits, targets, coef=0.5), 0.5 * math.log(32 / 3) / 3)


def test_lm_loss_masked_padding_does_not_change_result():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = t([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    ref = lm_loss(logits, targets, mask)
    logits2 = logits.clone()
    logits2[0, 3:] = 1e4 * torch.randn(2, 7)  # garbage on padding
    targets2 = targets.clone()
    targets2[0, 3:] = 0
    assert close(lm_loss(logits2, targets2, mask), ref)
    # equals the mean of the per-token CE over the 7 counted tokens
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none")
    assert close(ref, ce[mask.reshape(-1).bool()].mean())


def test_logprobs_and_entropy_hand_values():
    lp = logprobs_from_logits(t(LOGITS), t(TARGETS, torch.long))
    assert close(lp, [[math.log(0.5), math.log(0.75), math.log(0.25)]])
    lp1 = logprobs_from_logits(t(LOGITS), t([[1, 1, 1]], torch.long))
    assert close(lp1, [[math.log(0.5), math.log(0.25), math.log(0.75)]])
    h = entropy_from_logits(t(LOGITS))
    h34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.562335
    assert close(h, [[LN2, h34, h34]])
    # uniform over 4 → ln 4, whatever the constant
    assert close(entropy_from_logits(torch.full((1, 1, 4), 3.0)), [[math.log(4)]])


# ------------------------------------------------------------------------------------------ reward model


def test_ranking_loss_k3_hand_values():
    # slots' rewards [0, 1, 2]; labeler ranking best-first: slot 2 > slot 0 > slot 1
    # pairs (w, l): (2, 0): 2 - 0 = 2;  (2, 1): 2 - 1 = 1;  (0, 1): 0 - 1 = -1
    rewards = t([[0.0, 1.0, 2.0]], torch.float64)
    loss, acc = ranking_loss(rewards, t([[2, 0, 1]], torch.long))
    expected = (softplus(2) + softplus(1) + softplus(-1)) / 3  # ≈ (0.126928 + 0.313262 + 1.313262) / 3
    assert close(loss, expected) and close(expected, 0.584484)
    assert acc == pytest.approx(2 / 3)  # (0, 1) is ordered wrong


def test_ranking_loss_averages_within_prompt_then_over_prompts():
    rewards = t([[0.0, 1.0, 2.0], [0.5, 0.5, 99.0], [3.0, -7.0, 11.0]], torch.float64)
    # prompt 1: 2 responses (slot 2 unused, value ignored); tie → loss ln 2, accuracy 0
    # prompt 2: one response → no pair, excluded
    ranking = t([[2, 0, 1], [1, 0, -1], [0, -1, -1]], torch.long)
    loss, acc = ranking_loss(rewards, ranking)
    k3 = (softplus(2) + softplus(1) + softplus(-1)) / 3
    assert close(loss, (k3 + LN2) / 2)  # per-pair averaging would give (3·k3 + ln 2) / 4
    assert acc == pytest.approx((2 / 3 + 0.0) / 2)
    # gradient: only ranked slots get one
    r = rewards.clone().requires_grad_(True)
    ranking_loss(r, ranking)[0].backward()
    assert r.grad[1, 2] == 0 and r.grad[2].abs().sum() == 0 and r.grad[0].abs().sum() > 0


def test_ranking_loss_skips_pairs_inside_a_tier_of_ties():
    # slots' rewards [0, 1, 2, 4]; best first 3 > 2 = 0 > 1 (positions 1 and 2 tied): tiers {3}, {2, 0}, {1}
    # pairs (w, l): (3, 2): 4 - 2 = 2;  (3, 0): 4;  (3, 1): 3;  (2, 1): 1;  (0, 1): -1 — and no (2, 0)
    rewards = t([[0.0, 1.0, 2.0, 4.0]], torch.float64)
    loss, acc = ranking_loss(rewards, t([[3, 2, 0, 1]], torch.long), t([[False, True, False]], torch.bool))
    expected = (softplus(2) + softplus(4) + softplus(3) + softplus(1) + softplus(-1)) / 5
    assert close(loss, expected) and close(expected, 0.364038, 1e-6)
    assert acc == pytest.approx(4 / 5)  # (0, 1) is ordered wrong


def test_ranking_loss_all_tied_prompt_has_no_pairs_and_no_ties_is_the_strict_loss():
    rewards = t([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]], torch.float64)
    ranking = t([[2, 0, 1], [2, 0, 1]], torch.long)
    # prompt 1 all tied → excluded; prompt 2 strict → the K = 3 hand value above
    loss, acc = ranking_loss(rewards, ranking, t([[True, True], [False, False]], torch.bool))
    assert close(loss, (softplus(2) + softplus(1) + softplus(-1)) / 3) and acc == pytest.approx(2 / 3)
    strict, _ = ranking_loss(rewards, ranking)
    assert close(ranking_loss(rewards, ranking, torch.zeros(2, 2, dtype=torch.bool))[0], strict)


def test_ranking_loss_k2_equals_pairwise_loss():
    torch.manual_seed(1)
    rewards = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    ranking = t([[0, 1], [1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], torch.long)
    loss_r, acc_r = ranking_loss(rewards, ranking)
    chosen = rewards.gather(1, ranking[:, :1]).squeeze(1)
    rejected = rewards.gather(1, ranking[:, 1:]).squeeze(1)
    loss_p, acc_p = pairwise_loss(chosen, rejected)
    assert close(loss_r, loss_p, 1e-12) and acc_r == pytest.approx(acc_p)
    g_r = torch.autograd.grad(loss_r, rewards)[0]
    g_p = torch.autograd.grad(loss_p, rewards)[0]
    assert close(g_r, g_p, 1e-12)


def test_pairwise_loss_hand_values():
    loss, acc = pairwise_loss(t([1.0, 0.0]), t([0.0, 1.0]))
    assert close(loss, (softplus(1) + softplus(-1)) / 2)  # (0.313262 + 1.313262) / 2
    assert acc == pytest.approx(0.5)


def test_reward_bias_and_normalize():
    scores = t([1.0, 2.0, 3.0, 6.0])
    bias = reward_bias(scores)
    assert isinstance(bias, float) and bias == pytest.approx(-3.0)  # -(12 / 4)
    assert reward_bias([1.0, 2.0, 3.0, 6.0]) == pytest.approx(-3.0)
    assert close(normalize_rewards(scores, bias), [-2.0, -1.0, 0.0, 3.0])  # SFT outputs now average 0
    assert close(normalize_rewards(scores, bias, scale=0.5), [-1.0, -0.5, 0.0, 1.5])


# ------------------------------------------------------------------------------------------ PPO


def test_kl_estimators_hand_values():
    # r = π_ref / π = 2 → d = logπ - logπ_ref = -ln 2 ;  r = 1/2 → d = ln 2
    lp = t([[math.log(0.25), math.log(0.5)]])
    ref = t([[math.log(0.5), math.log(0.25)]])
    assert close(kl_per_token(lp, ref, "k1"), [[-LN2, LN2]])
    # k3 = (r - 1) - ln r: r=2 → 1 - ln 2 = 0.306853; r=1/2 → -1/2 + ln 2 = 0.193147
    assert close(kl_per_token(lp, ref, "k3"), [[1 - LN2, -0.5 + LN2]])
    assert close(kl_per_token(lp, ref, "abs"), [[LN2, LN2]])
    assert close(kl_per_token(lp, ref, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "k4")


def test_kl_penalized_rewards_hand_values():
    # row 0: prompt, 2 response tokens, right pad; row 1: left part prompt, response at t=2,3
    mask = t([[0, 1, 1, 0], [0, 0, 1, 1]])
    ref = torch.zeros(2, 4)
    lp = t([[9.0, 0.5, -0.2, float("-inf")], [7.0, -3.0, 0.3, 0.1]])  # garbage outside the mask
    rewards, kl = kl_penalized_rewards(lp, ref, mask, t([1.0, -2.0]), beta=0.1)
    # row 0: -0.1·0.5 = -0.05;  -0.1·(-0.2) + 1.0 = 1.02 (score on the last response token)
    # row 1: -0.1·0.3 = -0.03;  -0.1·0.1 - 2.0 = -2.01
    assert close(rewards, [[0.0, -0.05, 1.02, 0.0], [0.0, 0.0, -0.03, -2.01]])
    assert close(kl, [[0.0, 0.5, -0.2, 0.0], [0.0, 0.0, 0.3, 0.1]])
    # k3 on row 0: d = 0.5 → e^{-0.5} - 1 + 0.5 = 0.106531;  d = -0.2 → e^{0.2} - 1 - 0.2 = 0.021403
    r3, kl3 = kl_penalized_rewards(lp, ref, mask, t([1.0, -2.0]), beta=0.1, kl_estimator="k3")
    k3a, k3b = math.exp(-0.5) - 0.5, math.exp(0.2) - 1.2
    assert close(kl3[0], [0.0, k3a, k3b, 0.0])
    assert close(r3[0], [0.0, -0.1 * k3a, -0.1 * k3b + 1.0, 0.0])
    # a row without response tokens gets neither penalty nor score
    r_empty, _ = kl_penalized_rewards(lp[:1], ref[:1], torch.zeros(1, 4), t([5.0]), beta=0.1)
    assert close(r_empty, torch.zeros(1, 4))


def test_gae_hand_values_1x3():
    # γ = 0.9, λ = 0.8, γλ = 0.72; rewards [1, 0, 2], values [0.5, 1.0, 1.5]; V after the end = 0
    # t=2: δ = 2 + 0.9·0 - 1.5 = 0.5                  A2 = 0.5
    # t=1: δ = 0 + 0.9·1.5 - 1.0 = 0.35               A1 = 0.35 + 0.72·0.5 = 0.71
    # t=0: δ = 1 + 0.9·1.0 - 0.5 = 1.4                A0 = 1.4 + 0.72·0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    adv, ret = gae(t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]]), torch.ones(1, 3), 0.9, 0.8)
    assert close(adv, [[1.9112, 0.71, 0.5]])
    assert close(ret, [[2.4112, 1.71, 2.0]])


def test_gae_prompt_and_padding_do_not_change_result():
    r, v = [1.0, 0.0, 2.0], [0.5, 1.0, 1.5]
    nan = float("nan")
    # row 0: 2 prompt tokens, response, 1 pad (right padding)
    # row 1: 1 left pad + 3 prompt tokens, response (left padding, response at the end)
    rewards = t([[7.0, 7.0] + r + [7.0], [7.0, 7.0, 7.0, 1.0, 0.0, 2.0]])
    values = t([[nan, 3.0] + v + [nan], [9.0, 9.0, nan, 0.5, 1.0, 1.5]])
    mask = t([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    assert close(adv, [[0, 0, 1.9112, 0.71, 0.5, 0], [0, 0, 0, 1.9112, 0.71, 0.5]])
    assert close(ret, [[0, 0, 2.4112, 1.71, 2.0, 0], [0, 0, 0, 2.4112, 1.71, 2.0]])


def test_gae_lambda_one_gamma_one_is_monte_carlo():
    # A_t = sum of rewards from t to the end - V_t
    rewards, values = t([[0.1, -0.2, 0.3, 1.0]]), t([[0.4, 0.3, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 4), 1.0, 1.0)
    assert close(ret, [[1.2, 1.1, 1.3, 1.0]])
    assert close(adv, [[0.8, 0.8, 1.1, 0.9]])
    # and it carries no gradient
    v = values.clone().requires_grad_(True)
    a2, r2 = gae(rewards, v, torch.ones(1, 4), 1.0, 1.0)
    assert not a2.requires_grad and not r2.requires_grad


# one token clipped (ratio 1.5 > 1.2 with A > 0), one at the boundary-free interior, one with ratio
# below 1-ε but A > 0 (the pessimistic unclipped term wins, so not clipped)
RATIOS = [1.5, 0.9, 0.5]
ADVS = [1.0, -2.0, 1.0]


def _policy_inputs(extra_pad=False):
    ratios, advs, mask = list(RATIOS), list(ADVS), [1.0, 1.0, 1.0]
    if extra_pad:
        ratios, advs, mask = ratios + [50.0], advs + [1e3], mask + [0.0]
    old = torch.zeros(1, len(ratios))
    lp = torch.log(t([ratios])).requires_grad_(True)
    return lp, old, t([advs]), t([mask])


def test_policy_loss_hand_values():
    lp, old, adv, mask = _policy_inputs()
    loss, stats = policy_loss(lp, old, adv, mask, clip_eps=0.2)
    # token 0: max(-1·1.5, -1·1.2) = -1.2 (clipped)
    # token 1: max(2·0.9, 2·0.9) = 1.8
    # token 2: max(-1·0.5, -1·0.8) = -0.5
    # loss = (-1.2 + 1.8 - 0.5) / 3 = 0.1 / 3
    assert close(loss, 0.1 / 3)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    assert stats["ratio_mean"] == pytest.approx(2.9 / 3)
    # approx_kl = mean((r - 1) - ln r) = (0.094535 + 0.005361 + 0.193147) / 3
    kl = sum((r - 1) - math.log(r) for r in RATIOS) / 3
    assert stats["approx_kl"] == pytest.approx(kl, abs=1e-6) and kl == pytest.approx(0.097681, abs=1e-6)
    assert all(isinstance(v, float) for v in stats.values())
    # d loss / d logπ = -A·ratio / 3 where unclipped, 0 where clipped: [0, 1.8/3, -0.5/3]
    loss.backward()
    assert close(lp.grad, [[0.0, 0.6, -0.5 / 3]])


def test_policy_loss_gradient_only_through_logprobs_and_padding_invariant():
    lp, old, adv, mask = _policy_inputs(extra_pad=True)
    old.requires_grad_(True)
    adv.requires_grad_(True)
    loss, stats = policy_loss(lp, old, adv, mask, clip_eps=0.2)
    assert close(loss, 0.1 / 3) and stats["clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    assert old.grad is None and adv.grad is None
    assert close(lp.grad, [[0.0, 0.6, -0.5 / 3, 0.0]])


def test_value_loss_hand_values():
    # ε = 0.2
    # token 0: v=1.0, old=0.5 → v_clip=0.7, R=1.0: max(0, 0.09) = 0.09 (clipped)
    # token 1: v=0.6, old=0.5 → v_clip=0.6, R=0.0: max(0.36, 0.36) = 0.36
    # token 2: v=0.0, old=0.5 → v_clip=0.3, R=1.0: max(1.0, 0.49) = 1.0
    # loss = 0.5 · (0.09 + 0.36 + 1.0) / 3 = 0.241667; a 4th masked-out token must not count
    values = t([[1.0, 0.6, 0.0, 100.0]]).requires_grad_(True)
    old = t([[0.5, 0.5, 0.5, 0.0]]).requires_grad_(True)
    returns = t([[1.0, 0.0, 1.0, -100.0]]).requires_grad_(True)
    loss, stats = value_loss(values, old, returns, t([[1, 1, 1, 0]]), clip_eps=0.2)
    assert close(loss, 0.5 * 1.45 / 3) and close(loss, 0.241667)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # d/dv of 0.5·(v-R)²/3 = (v - R)/3 where unclipped; 0 where the clipped term wins
    assert close(values.grad, [[0.0, 0.6 / 3, -1.0 / 3, 0.0]])
    assert old.grad is None and returns.grad is None


def test_adaptive_kl_controller_hand_values():
    c = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert c.value == 0.1
    # KL 9: e = 9/6 - 1 = 0.5 → clipped to 0.2; β = 0.1 · (1 + 0.2·256/10000) = 0.1 · 1.00512
    assert c.update(9.0, 256) == pytest.approx(0.100512)
    # KL 5.4: e = -0.1; β = 0.100512 · (1 - 0.1·0.0256) = 0.100512 · 0.99744 = 0.10025468928
    c.update(5.4, 256)
    assert c.value == pytest.approx(0.10025468928, abs=1e-12)
    # KL 0: e = -1 → clipped to -0.2; n_steps = horizon → β · 0.8
    c.update(0.0, 10000)
    assert c.value == pytest.approx(0.10025468928 * 0.8, abs=1e-12)
    # checkpoint round trip, plain JSON floats
    state = json.loads(json.dumps(c.state_dict()))
    c2 = AdaptiveKLController(1.0, 1.0, 1.0)
    c2.load_state_dict(state)
    assert (c2.value, c2.target, c2.horizon) == (c.value, 6.0, 10000.0)
    assert c2.update(6.0, 100) == c.value  # at target: unchanged


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    assert c.update(100.0, 256) == 0.05 and c.value == 0.05
    c2 = FixedKLController(0.0)
    c2.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert c2.value == 0.05


def test_module_is_pure():
    import inspect

    src = inspect.getsource(algos)
    assert "grpc" not in src and "import ray" not in src


# ------------------------------------------------------------------------------- critic-free RL and DPO

def test_group_ids_number_prompts_in_order_of_appearance():
    assert algos.group_ids(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


SCORES = [1.0, 3.0, 2.0, 2.0, 5.0]  # group 0: 1, 3, 2 (mean 2, unbiased std 1); group 1: 2, 2; group 2: 5
GROUPS = [0, 0, 0, 1, 1]


def test_grpo_advantages_are_group_standardised():
    adv = algos.group_advantages(t(SCORES[:4]), torch.tensor([0, 0, 0, 1]), "grpo")
    # group 0: (r - 2) / 1; group 1: all equal → 0 (not NaN)
    assert close(adv, [-1.0, 1.0, 0.0, 0.0])


def test_rloo_advantages_leave_the_response_out():
    adv = algos.group_advantages(t(SCORES[:3]), torch.tensor([0, 0, 0]), "rloo")
    # r_i - mean of the other two: 1 - 2.5, 3 - 1.5, 2 - 2
    assert close(adv, [-1.5, 1.5, 0.0])


def test_reinforce_pp_baseline_is_the_group_mean():
    adv = algos.group_advantages(t(SCORES), torch.tensor([0, 0, 0, 1, 2]), "reinforce_pp")
    # group 0 mean 2; group 1 = {2} alone; group 2 = {5} alone → no baseline, advantage 0
    assert close(adv, [-1.0, 1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("estimator", algos.GROUP_ESTIMATORS)
def test_degenerate_groups_teach_nothing(estimator):
    # all rewards equal, and a group of one sample: every advantage is exactly 0
    adv = algos.group_advantages(t([4.0, 4.0, 4.0, 7.0]), torch.tensor([0, 0, 0, 1]), estimator)
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="estimator"):
        algos.group_advantages(t([1.0]), torch.tensor([0]), "a2c")


def test_returns_to_go_sum_the_future_masked_rewards():
    r = t([[9.0, 1.0, 2.0, 3.0], [4.0, 5.0, 0.0, 0.0]])
    m = t([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert close(algos.returns_to_go(r, m), [[0, 6, 5, 3], [9, 5, 0, 0]])
    # γ = 0.5: 1 + .5·2 + .25·3 = 2.75, 2 + .5·3 = 3.5
    assert close(algos.returns_to_go(r, m, 0.5), [[0, 2.75, 3.5, 3], [6.5, 5, 0, 0]])


def test_loss_mean_token_vs_sequence():
    x = t([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    m = t([[1, 1, 1], [1, 0, 0]])
    assert close(algos.loss_mean(x, m, "token"), 16 / 4)  # every token weighs the same
    assert close(algos.loss_mean(x, m, "sequence"), (2.0 + 10.0) / 2)  # every response weighs the same
    # a row without tokens does not count as a response
    assert close(algos.loss_mean(t([[1.0, 3.0], [5.0, 5.0]]), t([[1, 1], [0, 0]]), "sequence"), 2.0)
    with pytest.raises(ValueError, match="loss_norm"):
        algos.loss_mean(x, m, "row")


def test_policy_loss_sequence_normalisation():
    # on-policy (ratio 1): per-token loss = -A; rows: [-1, -1] and [-4]
    lp = t([[-1.0, -1.0], [-1.0, -1.0]])
    adv = t([[1.0, 1.0], [4.0, 0.0]])
    m = t([[1, 1], [1, 0]])
    tok, _ = policy_loss(lp, lp, adv, m, 0.2)
    seq, _ = policy_loss(lp, lp, adv, m, 0.2, loss_norm="sequence")
    assert close(tok, -(1 + 1 + 4) / 3) and close(seq, -(1 + 4) / 2)


def test_kl_loss_k3_hand_values_and_gradient():
    lp = t([[math.log(0.5), math.log(0.25)]]).requires_grad_()
    ref = t([[math.log(0.25), math.log(0.25)]])
    loss = algos.kl_loss(lp, ref, t([[1, 1]]), "k3")
    # k3 with r = π_ref/π: token 0 r = 0.5 → 0.5 - 1 - log 0.5 = ln2 - 0.5; token 1 r = 1 → 0
    assert close(loss, (LN2 - 0.5) / 2)
    loss.backward()
    # d/dlogπ of (exp(-d) - 1 + d) = 1 - r: token 0 → 0.5, token 1 → 0; / 2 tokens
    assert close(lp.grad, [[0.25, 0.0]])


def test_ranking_pairs_are_all_c_k_2_pairs_best_first():
    assert algos.ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(algos.ranking_pairs(list(range(5)))) == 10
    assert algos.ranking_pairs([3]) == []


def test_dpo_loss_hand_values():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; β = 0.5 → -log σ(1)
    args = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))
    loss, st = algos.dpo_loss(*args, beta=0.5)
    assert close(loss, softplus(1.0)) and st["accuracy"] == 1.0
    assert close(st["margin"], 1.0) and close(st["chosen_reward"], 0.5) and close(st["rejected_reward"], -0.5)
    # label smoothing ε = 0.1: 0.9·(-log σ(1)) + 0.1·(-log σ(-1))
    ls, _ = algos.dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert close(ls, 0.9 * softplus(1.0) + 0.1 * softplus(-1.0))
    # IPO: (h - 1/(2β))² = (2 - 1)² = 1
    ipo, _ = algos.dpo_loss(*args, beta=0.5, loss="ipo")
    assert close(ipo, 1.0)


def test_dpo_loss_gradient_prefers_the_chosen_response():
    c, r = t([-1.0]).requires_grad_(), t([-1.0]).requires_grad_()
    loss, _ = algos.dpo_loss(c, r, t([-1.0]), t([-1.0]), beta=1.0)
    loss.backward()
    assert close(loss, LN2) and close(c.grad, [-0.5]) and close(r.grad, [0.5])  # σ(0) = 0.5


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_dpo_loss_refuses_a_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        algos.dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), beta=beta)


def test_logprob_gate_counts_same_version_rows_only():
    served = t([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    recomputed = t([[-1.0, -2.5, 7.0], [-3.0, -1.0, -1.0]])
    m = t([[1, 1, 0], [1, 1, 1]])
    g = algos.logprob_gate(recomputed, served, m, torch.tensor([True, False]))
    # row 1 is from another version (its gap of 2 is staleness); position (0, 2) is off the mask
    assert g == {"gate_max": 0.5, "gate_mean": 0.25, "gate_tokens": 2.0}
    assert algos.logprob_gate(recomputed, served, m, torch.tensor([False, False]))["gate_tokens"] == 0.0
