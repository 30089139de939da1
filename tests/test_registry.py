"""One registry per objective part: the config's allowed values, dispatch, labels, formulas and metric names all come
from it."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from unigrad.objective import (
    METRICS,
    PRESETS,
    LossInputs,
    ObjectiveError,
    compute_policy_loss,
    policy_loss,
    resolve_objective,
)
from unigrad.objective.registry import (
    ADVANTAGE,
    AGGREGATION,
    CORRECTION,
    KL_ESTIMATOR,
    RATIO,
    STABILISER,
    PartText,
    Registry,
)
from unigrad.objective.spec import Objective
from unigrad.objective.stabilisers import Stabilised, StabiliserInput

ROOT = Path(__file__).resolve().parents[1]

FIELDS = {"ratio": RATIO, "stabiliser": STABILISER, "correction": CORRECTION, "advantage": ADVANTAGE,
          "aggregation": AGGREGATION, "kl_estimator": KL_ESTIMATOR}


@pytest.mark.parametrize("field", list(FIELDS))
def test_an_objective_field_allows_exactly_the_registered_names(field):
    allowed = typing.get_args(Objective.model_fields[field].annotation)
    assert allowed == FIELDS[field].names()
    with pytest.raises(ValueError, match=field):
        Objective(**{field: "not_a_part"})


@pytest.mark.parametrize("registry", list(FIELDS.values()), ids=list(FIELDS))
def test_every_part_has_a_label_and_a_formula_for_every_preset(registry):
    for part in registry:
        for preset in PRESETS.values():
            assert isinstance(part.label(preset.objective), str) and part.label(preset.objective)
            assert isinstance(part.formula(preset.objective), str)


def test_an_unknown_name_is_an_error_that_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown stabiliser 'bogus'; valid: none, clip, dual_clip"):
        STABILISER["bogus"]
    registry = Registry("thing")
    registry.register("a", text=PartText(lambda o: "x"))(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a", text=PartText(lambda o: "y"))


def _metrics_with(**fields) -> set[str]:
    g = torch.Generator().manual_seed(0)
    logp = (torch.rand(3, 4, generator=g) * -2).requires_grad_()
    old = logp.detach() + torch.randn(3, 4, generator=g) * 0.3
    infer = old + torch.randn(3, 4, generator=g) * 0.5
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = compute_policy_loss(logp, mask, torch.tensor([1.0, -1.0, 0.5]), resolve_objective("grpo", **fields),
                              old_logprobs=old, infer_logprobs=infer, max_length=4)
    return set(out.metrics)


@pytest.mark.parametrize("name", STABILISER.names())
def test_a_stabilisers_registered_metrics_are_the_ones_it_adds(name):
    fields = {"stabiliser": name} if name != "none" else {"stabiliser": "none"}
    added = _metrics_with(**fields) - _metrics_with(stabiliser="none")
    assert added == set(STABILISER[name].metrics)
    assert set(STABILISER[name].metrics) <= set(METRICS)


@pytest.mark.parametrize("name", CORRECTION.names())
def test_a_corrections_registered_metrics_are_the_ones_it_adds(name):
    added = _metrics_with(correction=name) - _metrics_with(correction="none")
    assert added == set(CORRECTION[name].metrics)
    assert set(CORRECTION[name].metrics) <= set(METRICS)


def test_the_parts_of_a_preset_are_its_registered_labels():
    obj = resolve_objective("dapo", correction="icepop", icepop_low=0.4)
    assert obj.parts()["stabiliser"] == "clip [0.8, 1.28]"
    assert obj.parts()["correction"] == "icepop [0.4, 5]"
    assert resolve_objective("luffy").parts()["ratio"] == RATIO["token"].label(resolve_objective("luffy"))


def test_the_keyword_signature_and_the_typed_inputs_give_identical_results():
    from unigrad.objective import LossInputs, policy_loss

    g = torch.Generator().manual_seed(1)
    logp = (torch.rand(4, 5, generator=g) * -2).requires_grad_()
    tensors = {"old_logprobs": logp.detach() + 0.2 * torch.randn(4, 5, generator=g),
               "infer_logprobs": logp.detach() + 0.3 * torch.randn(4, 5, generator=g),
               "ref_logprobs": logp.detach() + 0.1 * torch.randn(4, 5, generator=g),
               "off_policy_mask": torch.tensor([False, True, False, False])}
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 0, 2])[:, None]
    adv = torch.tensor([1.0, -0.5, 0.3, -1.0])
    obj = resolve_objective("luffy", correction="tis", beta=0.01)
    keyword = compute_policy_loss(logp, mask, adv, "luffy", max_length=5, num_tokens=20.0, num_sequences=8.0,
                                  correction="tis", beta=0.01, **tensors)
    (grad_keyword,) = torch.autograd.grad(keyword.loss, logp)
    typed = policy_loss(LossInputs(logp, mask, adv, max_length=5, num_tokens=20.0, num_sequences=8.0, **tensors), obj)
    (grad_typed,) = torch.autograd.grad(typed.loss, logp)
    assert torch.equal(keyword.loss, typed.loss) and torch.equal(grad_keyword, grad_typed)
    assert keyword.metrics == typed.metrics and grad_typed.abs().sum() > 0


@dataclass(frozen=True)
class _Scale:
    k: float


@pytest.fixture
def scaled_stabiliser():
    """A stabiliser added the way a new part is: one function, one registration (its parameter is the existing
    `epsilon` field: l = -(1 + epsilon) * r * A), removed again afterwards."""

    @STABILISER.register(
        "scaled", traits=("needs_old_logprobs",), args=lambda o: _Scale(1 + o.epsilon),
        metrics={"toy/positive_fraction": "fraction of tokens with A > 0"},
        text=PartText(
            lambda o: "ℓ = −k·r·A", summary="the unstabilised term times 1 + epsilon",
            label=lambda o: f"scaled k={1 + o.epsilon:g}",
        ),
    )
    def _scaled(x: StabiliserInput, args: _Scale) -> Stabilised:
        return Stabilised(-args.k * x.ratio * x.adv, {"toy/positive_fraction": x.adv > 0})

    try:
        yield _scaled
    finally:
        if "scaled" in STABILISER:
            STABILISER.unregister("scaled")


def test_a_part_added_in_one_registration_works_end_to_end_and_appears_everywhere(scaled_stabiliser):
    text = (ROOT / "docs" / "objectives.md").read_text()
    assert "scaled" in typing.get_args(Objective.model_fields["stabiliser"].annotation)
    assert "scaled: the unstabilised term times 1 + epsilon" in Objective.model_fields["stabiliser"].description
    obj = resolve_objective("grpo", stabiliser="scaled", epsilon=0.5)
    assert obj.parts()["stabiliser"] == "scaled k=1.5"
    with pytest.raises(ObjectiveError, match="no pi_old to stabilise against"):  # its trait, not its name
        resolve_objective("sft", stabiliser="scaled")

    g = torch.Generator().manual_seed(3)
    logp = (torch.rand(2, 3, generator=g) * -2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(2, 3, generator=g)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([0.7, -1.2])
    out = policy_loss(LossInputs(logp, mask, adv, old_logprobs=old), obj)
    (grad,) = torch.autograd.grad(out.loss, logp)
    # by hand: seq_mean_token_mean of -1.5 r_t A_i, r_t = exp(logp - old): d/dlogp_t = -1.5 r_t A_i / (|y_i| * 2)
    r = torch.exp(logp.detach() - old)
    lengths = torch.tensor([[3.0], [1.0]])
    expected = torch.where(mask, -1.5 * r * adv[:, None] / (lengths * 2), torch.zeros_like(r))
    torch.testing.assert_close(grad, expected)
    per_sequence = (-1.5 * r * adv[:, None] * mask).sum(-1) / lengths[:, 0]
    torch.testing.assert_close(out.loss.detach(), per_sequence.sum() / 2)
    assert out.metrics["toy/positive_fraction"] == pytest.approx(3 / 4)  # 3 of the 4 tokens have A > 0
    assert METRICS["toy/positive_fraction"] == "fraction of tokens with A > 0"

    from unigrad.preset_table import metrics_table, part_table, update_docs

    assert "| `scaled` | the unstabilised term times 1 + epsilon |  |" in part_table(STABILISER)
    assert "| `toy/positive_fraction` | fraction of tokens with A > 0 | `stabiliser=scaled` |" in metrics_table()
    assert update_docs(text) != text  # the page no longer matches the registry: the docs test would fail


def test_a_removed_part_is_gone_from_the_objective_and_the_metrics(scaled_stabiliser):
    resolve_objective("grpo", stabiliser="scaled")  # cached, and the cache must not outlive the part
    STABILISER.unregister("scaled")
    with pytest.raises(ObjectiveError, match="stabiliser"):
        resolve_objective("grpo", stabiliser="scaled")
    assert "toy/positive_fraction" not in METRICS
    assert "scaled" not in Objective.model_fields["stabiliser"].description
    assert typing.get_args(Objective.model_fields["stabiliser"].annotation) == STABILISER.names()


@pytest.mark.parametrize("field", list(FIELDS))
def test_an_objective_fields_description_names_every_registered_choice(field):
    description = Objective.model_fields[field].description
    for part in FIELDS[field]:
        assert part.summary and f"{part.name}: {part.summary}" in description


def test_a_parts_typed_arguments_refuse_bad_values():
    from unigrad.objective.corrections import Band, Truncation
    from unigrad.objective.stabilisers import ClipRange, DualClipRange, GateTemperatures, WeightCap

    for bad in (lambda: ClipRange(1.0, 0.2), lambda: ClipRange(0.2, -0.1), lambda: DualClipRange(0.2, 0.2, 1.0),
                lambda: GateTemperatures(0.0, 1.0), lambda: WeightCap(0.0), lambda: Band(2.0, 1.0),
                lambda: Truncation(1.0, floor=2.0)):
        with pytest.raises(ValueError):
            bad()
    assert DualClipRange(0.2, 0.28, 3.0).c == 3.0 and Band(0.0, 5.0).low == 0.0
