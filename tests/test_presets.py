"""The registry, its errors, the docs table generated from it, and the `unigrad presets` CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unigrad.objective import PRESETS, Objective, ObjectiveError, compute_policy_loss, resolve_objective
from unigrad.preset_table import markdown_table, update_docs

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["sft", "reinforce", "ppo", "grpo", "dr_grpo", "dapo", "bnpo", "gspo", "sapo", "cispo", "grpo_tis",
            "grpo_icepop", "luffy"]


def test_registry_holds_every_required_preset_with_a_source():
    assert set(REQUIRED) <= set(PRESETS)
    for p in PRESETS.values():
        assert p.url.startswith("https://") and p.paper


def test_documented_defaults():
    assert resolve_objective("dapo").epsilon_upper == 0.28
    assert resolve_objective("gspo").epsilon == 3e-4 and resolve_objective("gspo").epsilon_high == 4e-4
    sapo = resolve_objective("sapo")
    assert (sapo.tau_pos, sapo.tau_neg) == (1.0, 1.05)
    assert resolve_objective("grpo_icepop").icepop_low == 0.5 and resolve_objective("grpo_icepop").icepop_high == 5
    assert resolve_objective("grpo_tis").tis_cap == 2.0
    assert resolve_objective("grpo").beta == 0.0


def test_overrides_and_composition():
    o = resolve_objective("grpo", epsilon_high=0.28, beta=0.001)
    assert o.epsilon_upper == 0.28 and o.beta == 0.001
    assert resolve_objective("grpo").epsilon_high is None  # the preset itself is untouched
    custom = resolve_objective({"ratio": "sequence", "stabiliser": "soft_gate"})
    assert isinstance(custom, Objective) and custom.ratio == "sequence"


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ObjectiveError, match="unknown objective preset 'grpoo'; valid presets: sft, reinforce"):
        resolve_objective("grpoo")


def test_unknown_override_lists_valid_options():
    with pytest.raises(ObjectiveError, match=r"unknown objective option\(s\) epsilon_hihg; valid options: ratio"):
        compute_policy_loss(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1), "grpo",
                            epsilon_hihg=0.3)


def test_out_of_range_and_incompatible_values_name_the_key():
    with pytest.raises(ObjectiveError, match="epsilon: Input should be greater than or equal to 0"):
        resolve_objective("grpo", epsilon=-0.1)
    with pytest.raises(ObjectiveError, match="stabiliser: Input should be"):
        resolve_objective("grpo", stabiliser="clipp")
    with pytest.raises(ObjectiveError, match="ratio='self' has no pi_old"):
        resolve_objective("sft", stabiliser="clip")
    with pytest.raises(ObjectiveError, match="icepop_low"):
        resolve_objective("grpo_icepop", icepop_low=6.0)


def test_missing_inputs_are_clear_errors():
    lp, m, a = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2)
    with pytest.raises(ObjectiveError, match="infer_logprobs"):
        compute_policy_loss(lp, m, a, "grpo_tis")
    with pytest.raises(ObjectiveError, match="ref_logprobs"):
        compute_policy_loss(lp, m, a, "grpo", beta=0.1)
    with pytest.raises(ObjectiveError, match="off_policy_ratio"):
        compute_policy_loss(lp, m, a, "grpo", off_policy_mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        compute_policy_loss(lp, m, a, "grpo", old_logprobs=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss(lp, m, torch.zeros(3), "grpo")
    with pytest.raises(ValueError, match="needs max_length"):
        compute_policy_loss(lp, m, a, "dr_grpo")
    with pytest.raises(ValueError, match="only 0 and 1"):
        compute_policy_loss(lp, torch.full((2, 3), 2), a, "grpo")


def test_docs_table_is_generated_from_the_registry():
    text = (ROOT / "docs" / "objectives.md").read_text()
    assert update_docs(text) == text, "run `unigrad presets --update-docs docs/objectives.md`"
    for name in PRESETS:
        assert f"| `{name}` |" in markdown_table()


def test_cli_presets_prints_every_preset():
    out = subprocess.run([sys.executable, "-m", "unigrad.cli", "presets", "--width", "250"], capture_output=True,
                         text=True, check=True).stdout
    for p in PRESETS.values():
        assert p.name in out and p.url in out
    md = subprocess.run([sys.executable, "-m", "unigrad.cli", "presets", "--markdown"], capture_output=True,
                        text=True, check=True).stdout
    assert md.strip() == markdown_table().strip()


def test_gspo_and_sapo_take_grpos_gradient_on_policy_and_part_once_the_ratio_moves():
    """On-policy (one optimizer step per batch) the ratio is 1 with gradient grad log pi: GSPO's sequence ratio
    gives (1/|y|) sum_t grad log pi_t (GRPO's seq-mean-token-mean term), and SAPO's gate has slope 1 at r = 1. So
    the three presets differ only once the policy has moved away from the one that sampled (num_iterations > 1)."""
    torch.manual_seed(0)
    logprobs = -3 * torch.rand(4, 6)  # (B, T) log-probs of the sampled tokens
    mask = torch.arange(6) < torch.tensor([[6], [3], [2], [5]])
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    old = (logprobs - 0.3 * torch.randn(4, 6)).detach()  # a policy one update away

    def grad(preset, old_logprobs=None):
        logp = logprobs.clone().requires_grad_(True)
        compute_policy_loss(logp, mask, adv, resolve_objective(preset), old_logprobs=old_logprobs,
                            num_tokens=float(mask.sum()), num_sequences=4.0).loss.backward()
        return logp.grad

    torch.testing.assert_close(grad("gspo"), grad("grpo"), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad("sapo"), grad("grpo"), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(grad("gspo", old), grad("grpo", old), atol=1e-4)
    assert not torch.allclose(grad("sapo", old), grad("grpo", old), atol=1e-4)
