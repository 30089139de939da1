"""Mismatch metrics on tensors with a known answer."""

import math

import pytest
import torch

from unigrad.diagnostics.mismatch import mismatch_metrics, position_bins


def test_identical_logprobs_give_zero_mismatch_and_no_masked_tokens():
    logp = torch.log(torch.rand(3, 10).clamp(min=0.01))
    mask = torch.ones(3, 10, dtype=torch.bool)
    m = mismatch_metrics(logp, logp.clone(), mask, entropy=torch.ones(3, 10))
    for key in ("abs_logp_diff_mean", "abs_logp_diff_max", "kl_k1", "kl_k3", "chi2", "masked_fraction"):
        assert m[f"mismatch/{key}"] == 0.0, key
    assert m["mismatch/rho_min"] == m["mismatch/rho_max"] == 1.0
    assert math.isnan(m["mismatch/entropy_masked"]) and m["mismatch/entropy_all"] == 1.0


def test_a_planted_out_of_band_token_is_counted_and_values_match_by_hand():
    train = torch.zeros(2, 4)
    infer = torch.zeros(2, 4)
    infer[0, 1] = math.log(10.0)  # rho = p_train / p_infer = 0.1 < 0.5: outside the band
    infer[1, 2] = -math.log(2.0)  # rho = 2: inside
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    infer[0, 3] = 100.0  # a padded position must not count
    entropy = torch.tensor([[0.1, 3.0, 0.1, 9.0], [0.1, 0.1, 0.1, 9.0]])
    m = mismatch_metrics(train, infer, mask, entropy=entropy, low=0.5, high=5.0)
    n = 6
    assert m["mismatch/masked_fraction"] == pytest.approx(1 / n)
    assert m["mismatch/abs_logp_diff_max"] == pytest.approx(math.log(10))
    assert m["mismatch/abs_logp_diff_mean"] == pytest.approx((math.log(10) + math.log(2)) / n)
    assert m["mismatch/kl_k1"] == pytest.approx((math.log(10) - math.log(2)) / n)
    k3 = (0.1 - 1 - math.log(0.1)) + (2 - 1 - math.log(2))
    assert m["mismatch/kl_k3"] == pytest.approx(k3 / n)
    assert m["mismatch/chi2"] == pytest.approx(((0.1 - 1) ** 2 + (2 - 1) ** 2) / n)
    assert (m["mismatch/rho_min"], m["mismatch/rho_max"]) == (pytest.approx(0.1), pytest.approx(2.0))
    assert m["mismatch/rho_mean"] == pytest.approx((4 + 0.1 + 2) / n)
    assert m["mismatch/entropy_masked"] == pytest.approx(3.0)
    assert m["mismatch/entropy_all"] == pytest.approx((0.1 * 5 + 3.0) / n)
    assert m["mismatch/abs_logp_diff/pos_0_3"] == pytest.approx(m["mismatch/abs_logp_diff_mean"])


def test_position_bins_grow_geometrically_and_mismatch_is_binned():
    assert position_bins(20) == [(0, 3), (4, 7), (8, 15), (16, 31)]  # names never depend on the width
    assert position_bins(32) == position_bins(20) and position_bins(33)[-1] == (32, 63)
    train = torch.zeros(1, 20)
    infer = torch.zeros(1, 20)
    infer[0, 16:] = 0.5  # the gap grows late in the sequence
    m = mismatch_metrics(train, infer, torch.ones(1, 20, dtype=torch.bool))
    assert m["mismatch/abs_logp_diff/pos_0_3"] == 0.0 and m["mismatch/abs_logp_diff/pos_16_31"] == pytest.approx(0.5)
    assert mismatch_metrics(train, infer, torch.zeros(1, 20, dtype=torch.bool)) == {}


def test_k3_is_nonnegative_and_close_to_the_exact_kl_on_samples():
    # Sample tokens from q over a 3-token vocabulary; the k1 and k3 means approach KL(q || p).
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([0.6, 0.3, 0.1])
    p = torch.tensor([0.5, 0.3, 0.2])
    tokens = torch.multinomial(q, 200_000, replacement=True, generator=gen)
    infer, train = q.log()[tokens][None], p.log()[tokens][None]
    m = mismatch_metrics(train, infer, torch.ones_like(infer, dtype=torch.bool))
    exact = float((q * (q / p).log()).sum())
    assert m["mismatch/kl_k3"] >= 0
    assert m["mismatch/kl_k1"] == pytest.approx(exact, abs=3e-3)
    assert m["mismatch/kl_k3"] == pytest.approx(exact, abs=3e-3)
    assert m["mismatch/chi2"] == pytest.approx(float(((p - q) ** 2 / q).sum()), abs=5e-3)
