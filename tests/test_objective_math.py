"""Every preset and part against values and gradients derived by hand on tiny tensors.

Conventions: one or two sequences, log-probs chosen so that ratios are round numbers
(r = e^x), and the expected loss / d loss / d logp written out from the formula in the
comment next to it.
"""

import math

import pytest
import torch

from unigrad.objective import PRESETS, compute_policy_loss


def leaf(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype).requires_grad_()


def run(logp, mask, adv, objective, **kw):
    out = compute_policy_loss(logp, torch.tensor(mask), torch.tensor(adv, dtype=torch.float32), objective, **kw)
    out.loss.backward()
    return out


# --- clip (PPO / GRPO) ----------------------------------------------------------------------


def test_clip_positive_advantage_above_band_is_clipped_with_zero_gradient():
    # r = e^0.3 = 1.3499 > 1.2, A = +1: loss = -min(1.3499, 1.2) = -1.2, gradient 0.
    logp = leaf([[0.3]])
    out = run(logp, [[True]], [1.0], "grpo", old_logprobs=torch.zeros(1, 1))
    assert out.loss.item() == pytest.approx(-1.2)
    assert logp.grad.item() == 0.0
    assert out.metrics["clip/high_fraction"] == 1.0 and out.metrics["clip/region_fraction"] == 1.0


def test_clip_negative_advantage_above_band_keeps_full_gradient():
    # r = e^0.3, A = -1: loss = -min(-r, -1.2) = r; d loss / d logp = r.
    logp = leaf([[0.3]])
    out = run(logp, [[True]], [-1.0], "grpo", old_logprobs=torch.zeros(1, 1))
    r = math.exp(0.3)
    assert out.loss.item() == pytest.approx(r)
    assert logp.grad.item() == pytest.approx(r)
    assert out.metrics["clip/region_fraction"] == 0.0


def test_clip_negative_advantage_below_band_is_clipped():
    # r = e^-0.5 = 0.6065 < 0.8, A = -2: loss = -min(-2r, -1.6) = 1.6, gradient 0.
    logp = leaf([[-0.5]])
    out = run(logp, [[True]], [-2.0], "grpo", old_logprobs=torch.zeros(1, 1))
    assert out.loss.item() == pytest.approx(1.6)
    assert logp.grad.item() == 0.0
    assert out.metrics["clip/low_fraction"] == 1.0


def test_dapo_clip_higher_bound_is_1_28():
    # r = e^0.24 = 1.2712 < 1.28: not clipped under DAPO, clipped under GRPO (1.2).
    old = torch.zeros(1, 1)
    dapo = run(leaf([[0.24]]), [[True]], [1.0], "dapo", old_logprobs=old)
    grpo = run(leaf([[0.24]]), [[True]], [1.0], "grpo", old_logprobs=old)
    assert dapo.loss.item() == pytest.approx(-math.exp(0.24))
    assert grpo.loss.item() == pytest.approx(-1.2)


def test_dual_clip_caps_negative_advantage_loss_at_c():
    # r = 5, A = -1: clip loss = -min(-5, -1.2) = 5 -> capped at c*|A| = 3, gradient 0.
    logp = leaf([[math.log(5.0)]])
    out = run(logp, [[True]], [-1.0], "grpo", old_logprobs=torch.zeros(1, 1), stabiliser="dual_clip")
    assert out.loss.item() == pytest.approx(3.0)
    assert logp.grad.item() == 0.0
    assert out.metrics["clip/dual_fraction"] == 1.0


# --- SAPO soft gate -------------------------------------------------------------------------


@pytest.mark.parametrize("adv,tau", [(1.0, 1.0), (-1.0, 1.05)])
def test_sapo_on_policy_value_and_unit_gradient_weight(adv, tau):
    # r = 1: loss = -sigmoid(0) * 4/tau * A = -2A/tau; d/dlogp = -4 s (1-s) r A = -A (weight 1).
    logp = leaf([[-0.7]])
    out = run(logp, [[True]], [adv], "sapo")
    assert out.loss.item() == pytest.approx(-2 * adv / tau)
    assert logp.grad.item() == pytest.approx(-adv)
    assert out.metrics["gate/weight_mean"] == pytest.approx(1.0)


def test_sapo_gradient_off_policy_matches_closed_form():
    # r = e^0.5, A = 1, tau = 1: d/dlogp = -4 s (1 - s) r A with s = sigmoid(r - 1).
    logp = leaf([[0.5]])
    run(logp, [[True]], [1.0], "sapo", old_logprobs=torch.zeros(1, 1))
    r = math.exp(0.5)
    s = 1 / (1 + math.exp(-(r - 1)))
    assert logp.grad.item() == pytest.approx(-4 * s * (1 - s) * r)


# --- GSPO -----------------------------------------------------------------------------------


def test_gspo_sequence_ratio_is_geometric_mean_and_gradient_is_shared():
    # log s = mean(0.3, -0.1, 0.1) = 0.1; with a wide clip, loss = -s*A and every token's
    # gradient is -s*A/3 (the sequence weight shared by all its tokens).
    logp = leaf([[0.3, -0.1, 0.1]])
    out = run(logp, [[True] * 3], [1.0], "gspo", old_logprobs=torch.zeros(1, 3), epsilon=0.5, epsilon_high=0.5)
    s = math.exp(0.1)
    assert out.loss.item() == pytest.approx(-s)
    assert torch.allclose(logp.grad, torch.full((1, 3), -s / 3))
    assert out.metrics["ratio/mean"] == pytest.approx(s)


def test_gspo_token_form_has_sequence_value_and_per_token_gradient():
    # sequence_token: value s at every token; d/dlogp_t = -s*A_t / |y| with per-token A.
    logp = leaf([[0.3, -0.1, 0.1]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    out = compute_policy_loss(logp, torch.ones(1, 3, dtype=torch.bool), adv, "gspo", old_logprobs=torch.zeros(1, 3),
                              ratio="sequence_token", epsilon=0.5, epsilon_high=0.5)
    out.loss.backward()
    s = math.exp(0.1)
    assert out.loss.item() == pytest.approx(-s * (1 - 1 + 2) / 3)
    assert torch.allclose(logp.grad, -s * adv / 3)


def test_gspo_token_and_sequence_forms_agree_for_sequence_advantages():
    torch.manual_seed(0)
    base = torch.randn(3, 4) * 0.1 - 1
    old = base + torch.randn(3, 4) * 0.05
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 0.3])
    grads = []
    for ratio in ("sequence", "sequence_token"):
        logp = base.clone().requires_grad_()
        out = compute_policy_loss(logp, mask, adv, "gspo", old_logprobs=old, ratio=ratio, epsilon=0.9, epsilon_high=0.9)
        out.loss.backward()
        grads.append(logp.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


# --- CISPO ----------------------------------------------------------------------------------


def test_cispo_truncates_detached_weight_but_keeps_gradient():
    # r = e^2 = 7.39 > 5: loss = -5 * A * logp; gradient -5A (the weight is detached).
    logp = leaf([[2.0]])
    out = run(logp, [[True]], [0.5], "cispo", old_logprobs=torch.zeros(1, 1))
    assert out.loss.item() == pytest.approx(-5 * 0.5 * 2.0)
    assert logp.grad.item() == pytest.approx(-5 * 0.5)
    assert out.metrics["clip/truncated_fraction"] == 1.0


# --- SFT, REINFORCE, none-ratio (LUFFY) ------------------------------------------------------


def test_sft_is_token_mean_nll():
    # A = 1: loss = -mean over unmasked tokens of logp (the value is the NLL, the gradient the
    # UPGE form grad(pi)/pi); gradient -1/N per token.
    logp = leaf([[-1.0, -2.0], [-0.5, -9.0]])
    out = run(logp, [[True, True], [True, False]], [1.0, 1.0], "sft")
    assert out.loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [-1 / 3, 0.0]]))


def test_reinforce_is_sequence_sum():
    # On-policy r = 1: loss = -sum_t A_i / N_seq; gradient -A_i / N_seq per token.
    logp = leaf([[-1.0, -2.0], [-0.5, -1.0]])
    out = run(logp, [[True, True], [True, False]], [2.0, -1.0], "reinforce")
    assert out.loss.item() == pytest.approx((-2 * 2 + 1) / 2)
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0], [0.5, 0.0]]))


def test_luffy_off_policy_tokens_use_shaped_probability():
    # Off-policy token: loss = -A * p/(p+0.1) with p = 0.5 -> -A/1.2;
    # d/dlogp = -A * 0.1/(p+0.1)^2 * p. On-policy token (r = 1, A = 1): -1. Token mean over 2.
    logp = leaf([[math.log(0.5)], [-1.0]])
    adv = [2.0, 1.0]
    out = run(logp, [[True], [True]], adv, "luffy", off_policy_mask=torch.tensor([True, False]))
    p = 0.5
    assert out.loss.item() == pytest.approx((-2.0 * p / (p + 0.1) - 1.0) / 2)
    assert logp.grad[0, 0].item() == pytest.approx(-2.0 * 0.1 / (p + 0.1) ** 2 * p / 2)
    assert logp.grad[1, 0].item() == pytest.approx(-1.0 / 2)
    assert out.metrics["off_policy_fraction"] == 0.5


def test_none_ratio_without_shaping_is_probability():
    # pi_ref = 1: loss = -A * p; gradient -A * p.
    logp = leaf([[math.log(0.25)]])
    out = run(logp, [[True]], [1.0], {"ratio": "none", "stabiliser": "none", "aggregation": "token_mean"})
    assert out.loss.item() == pytest.approx(-0.25)
    assert logp.grad.item() == pytest.approx(-0.25)


# --- behaviour corrections (TIS, IcePop) -----------------------------------------------------


def test_tis_truncates_rho_at_cap():
    # on-policy, rho = exp(old - infer) = e^1 = 2.718 -> w = 2; loss = -w*A, gradient -w*A.
    logp = leaf([[-1.0]])
    out = run(logp, [[True]], [1.0], "grpo_tis", infer_logprobs=torch.tensor([[-2.0]]))
    assert out.loss.item() == pytest.approx(-2.0)
    assert logp.grad.item() == pytest.approx(-2.0)
    assert out.metrics["correction/rho_max"] == pytest.approx(math.e)
    assert out.metrics["correction/truncated_fraction"] == 1.0


def test_icepop_keeps_rho_inside_band_and_zeroes_outside():
    # rho = e^2 (> 5, out), e^-1 (< 0.5, out), e^0.5 (kept, weight e^0.5). Token mean over 3.
    logp = leaf([[0.0, 0.0, 0.0]])
    infer = torch.tensor([[-2.0, 1.0, -0.5]])
    out = run(logp, [[True] * 3], [1.0], "grpo_icepop", infer_logprobs=infer, aggregation="token_mean")
    assert out.loss.item() == pytest.approx(-math.exp(0.5) / 3)
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -math.exp(0.5) / 3]]))
    assert out.metrics["correction/masked_fraction"] == pytest.approx(2 / 3)


def test_icepop_masked_tokens_can_leave_the_denominator():
    logp = leaf([[0.0, 0.0, 0.0]])
    infer = torch.tensor([[-2.0, 1.0, -0.5]])
    out = run(logp, [[True] * 3], [1.0], "grpo_icepop", infer_logprobs=infer, aggregation="token_mean",
              masked_tokens_in_denominator=False)
    assert out.loss.item() == pytest.approx(-math.exp(0.5))


@pytest.mark.parametrize("form,log_rho", [("geometric", 0.5), ("product", 1.5)])
def test_sequence_level_truncation_forms(form, log_rho):
    # token log-rho = 0.5, 0.5, 0.5: geometric rho = e^0.5 = 1.65 (< 2 kept), product e^1.5 = 4.48 -> 2.
    logp = leaf([[0.0, 0.0, 0.0]])
    infer = torch.full((1, 3), -0.5)
    out = run(logp, [[True] * 3], [1.0], "grpo", infer_logprobs=infer, correction="seq_tis", correction_form=form)
    assert out.loss.item() == pytest.approx(-min(math.exp(log_rho), 2.0))


def test_seq_mask_zeroes_whole_sequence():
    # sequence 1: geometric rho = e^3 > 5 -> every token 0; sequence 2: rho = 1 -> kept.
    logp = leaf([[0.0, 0.0], [0.0, 0.0]])
    infer = torch.tensor([[-3.0, -3.0], [0.0, 0.0]])
    out = run(logp, [[True, True], [True, True]], [1.0, 1.0], "grpo", infer_logprobs=infer, correction="seq_mask")
    assert out.loss.item() == pytest.approx(-0.5)
    assert torch.equal(logp.grad[0], torch.zeros(2))
    assert out.metrics["correction/masked_fraction"] == 0.5


# --- aggregation ------------------------------------------------------------------------------


def test_aggregations_on_two_sequences():
    # on-policy, r = 1, A = (+1, -1), lengths 2 and 1, per-token loss -A:
    #   token_mean: (-1 -1 +1)/3; seq_mean_token_mean: (-1 + 1)/2 = 0;
    #   seq_mean_token_sum: (-2 + 1)/2; seq_mean_token_sum_norm with L_max = 4: -1/(2*4).
    expected = {"token_mean": -1 / 3, "seq_mean_token_mean": 0.0, "seq_mean_token_sum": -0.5,
                "seq_mean_token_sum_norm": -1 / 8}
    grads = {"token_mean": [-1 / 3, -1 / 3, 1 / 3], "seq_mean_token_mean": [-1 / 4, -1 / 4, 1 / 2],
             "seq_mean_token_sum": [-1 / 2, -1 / 2, 1 / 2], "seq_mean_token_sum_norm": [-1 / 8, -1 / 8, 1 / 8]}
    for mode, value in expected.items():
        logp = leaf([[-1.0, -1.0], [-1.0, -1.0]])
        out = run(logp, [[True, True], [True, False]], [1.0, -1.0], "grpo", aggregation=mode, max_length=4)
        assert out.loss.item() == pytest.approx(value), mode
        got = [logp.grad[0, 0].item(), logp.grad[0, 1].item(), logp.grad[1, 0].item()]
        assert got == pytest.approx(grads[mode]), mode
        assert logp.grad[1, 1].item() == 0.0


def test_dr_grpo_uses_max_length():
    logp = leaf([[-1.0, -1.0], [-1.0, -1.0]])
    out = run(logp, [[True, True], [True, False]], [1.0, -1.0], "dr_grpo", max_length=4)
    assert out.loss.item() == pytest.approx(-1 / 8)


def test_empty_sequence_counts_in_sequence_mean_without_nan():
    logp = leaf([[-1.0, -1.0], [-1.0, -1.0]])
    out = run(logp, [[True, True], [False, False]], [1.0, 1.0], "grpo")
    assert out.loss.item() == pytest.approx(-0.5)  # (-1 + 0) / 2 sequences
    assert torch.isfinite(logp.grad).all()


# --- KL and entropy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator,value,grad",
    [
        # d = ref - logp = -0.5
        ("k1", 0.5, 1.0),  # logp - ref; d/dlogp = 1
        ("k2", 0.125, 0.5),  # d^2/2; d/dlogp = -d
        ("k3", math.exp(-0.5) + 0.5 - 1, 1 - math.exp(-0.5)),  # e^d - d - 1; d/dlogp = 1 - e^d
    ],
)
def test_kl_estimators(estimator, value, grad):
    logp = leaf([[-1.0]])
    beta = 0.1
    out = run(logp, [[True]], [0.0], "grpo", ref_logprobs=torch.tensor([[-1.5]]), beta=beta, kl_estimator=estimator)
    assert out.loss.item() == pytest.approx(beta * value)
    assert logp.grad.item() == pytest.approx(beta * grad)
    assert out.metrics["kl"] == pytest.approx(value)


def test_kl_clamp():
    # d = 30: k3 = e^20 - 20 - 1 after the +-20 log clamp, then clamped to 10 with zero gradient.
    logp = leaf([[-30.0]])
    out = run(logp, [[True]], [0.0], "grpo", ref_logprobs=torch.tensor([[0.0]]), beta=1.0)
    assert out.loss.item() == pytest.approx(10.0)
    assert logp.grad.item() == 0.0
    unclamped = compute_policy_loss(leaf([[-3.0]]), torch.tensor([[True]]), torch.zeros(1), "grpo",
                                    ref_logprobs=torch.tensor([[0.0]]), beta=1.0, kl_clamp=None)
    assert unclamped.loss.item() == pytest.approx(math.exp(3) - 3 - 1)


def test_kl_ratio_weighted_changes_gradient_not_on_policy_value():
    # KL_t * r with r = pi/sg(pi) on-policy: same value, gradient gains KL_t * 1.
    ref = torch.tensor([[-1.5]])
    plain, weighted = leaf([[-1.0]]), leaf([[-1.0]])
    a = run(plain, [[True]], [0.0], "grpo", ref_logprobs=ref, beta=1.0)
    b = run(weighted, [[True]], [0.0], "grpo", ref_logprobs=ref, beta=1.0, kl_ratio_weighted=True)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert a.loss.item() == pytest.approx(b.loss.item())
    assert weighted.grad.item() == pytest.approx(plain.grad.item() + k3)


def test_entropy_bonus_is_token_mean():
    logp = leaf([[-1.0, -1.0]])
    entropy = torch.tensor([[2.0, 4.0]], requires_grad=True)
    out = compute_policy_loss(logp, torch.tensor([[True, False]]), torch.zeros(1), "grpo", entropy=entropy,
                              entropy_coef=0.5)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.5 * 2.0)
    assert entropy.grad.tolist() == [[-0.5, 0.0]]


# --- every preset: value and gradient against an independent per-token formula -----------------


def _reference_loss(name, logp, old, infer, mask, adv, max_length):
    """Independent, loop-based re-statement of each preset (plain Python floats)."""
    o = PRESETS[name].objective
    B, T = len(mask), len(mask[0])
    eh = o.epsilon if o.epsilon_high is None else o.epsilon_high
    per_tok = [[0.0] * T for _ in range(B)]
    for i in range(B):
        idx = [t for t in range(T) if mask[i][t]]
        log_s = sum(logp[i][t] - old[i][t] for t in idx) / max(len(idx), 1)
        for t in idx:
            a = adv[i]
            r = math.exp(log_s) if o.ratio == "sequence" else math.exp(logp[i][t] - old[i][t])
            if o.stabiliser == "clip":
                loss = -min(r * a, min(max(r, 1 - o.epsilon), 1 + eh) * a)
            elif o.stabiliser == "soft_gate":
                tau = o.tau_pos if a > 0 else o.tau_neg
                loss = -1 / (1 + math.exp(-tau * (r - 1))) * 4 / tau * a
            elif o.stabiliser == "cispo":
                loss = -min(r, o.cispo_max) * a * logp[i][t]
            elif o.ratio == "self":
                loss = -a * logp[i][t]  # value of the SFT surrogate: the NLL
            else:
                loss = -r * a
            rho = math.exp(old[i][t] - infer[i][t])
            if o.correction == "tis":
                loss *= min(rho, o.tis_cap)
            elif o.correction == "icepop":
                loss *= rho if o.icepop_low <= rho <= o.icepop_high else 0.0
            per_tok[i][t] = loss
    n_tok = sum(sum(row) for row in mask)
    if o.aggregation == "token_mean":
        return sum(map(sum, per_tok)) / n_tok
    if o.aggregation == "seq_mean_token_mean":
        return sum(sum(per_tok[i]) / max(sum(mask[i]), 1) for i in range(B)) / B
    if o.aggregation == "seq_mean_token_sum":
        return sum(map(sum, per_tok)) / B
    return sum(map(sum, per_tok)) / (B * max_length)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "luffy"])
def test_every_preset_matches_independent_formula_and_finite_difference(name):
    torch.manual_seed(1)
    B, T = 3, 4
    logp0 = (torch.rand(B, T) * -2 - 0.1).double()
    old = logp0 + torch.randn(B, T).double() * 0.3
    infer = old + torch.randn(B, T).double() * 0.8
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.7, 0.4]).double()
    if name == "sft":
        adv = torch.ones(B).double()
    kw = dict(old_logprobs=old, infer_logprobs=infer, max_length=6)

    def loss_of(lp):
        return compute_policy_loss(lp, mask, adv, name, **kw).loss.double()

    logp = logp0.clone().requires_grad_()
    out = compute_policy_loss(logp, mask, adv, name, **kw)
    out.loss.backward()
    expected = _reference_loss(name, logp0.tolist(), old.tolist(), infer.tolist(), mask.tolist(), adv.tolist(), 6)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # gradient vs central finite differences of the loss (float32 inside: h = 1e-3, loose tolerance)
    if name == "cispo":
        # CISPO's weight is detached, so its gradient is not the derivative of its value:
        # d loss / d logp_t = -min(r_t, eps_max) * A_i / N_tok.
        r = torch.exp(logp0 - old).clamp(max=5.0)
        expected_grad = torch.where(mask, -r * adv[:, None] / mask.sum(), torch.zeros_like(r))
        assert torch.allclose(logp.grad, expected_grad, atol=1e-6)
        return
    h = 1e-3
    for i, t in [(0, 0), (0, 2), (1, 1), (1, 3), (2, 0)]:
        bumped = [logp0.clone(), logp0.clone()]
        bumped[0][i, t] += h
        bumped[1][i, t] -= h
        fd = (loss_of(bumped[0]) - loss_of(bumped[1])).item() / (2 * h)
        assert logp.grad[i, t].item() == pytest.approx(fd, abs=2e-3), (name, i, t)
    assert torch.equal(logp.grad[~mask], torch.zeros(int((~mask).sum()), dtype=logp.grad.dtype))
