"""One registry per objective part: the config's allowed values, dispatch, labels, formulas and metric names all come
from it."""

from __future__ import annotations

import typing

import pytest
import torch

from unigrad.objective import METRICS, PRESETS, compute_policy_loss, resolve_objective
from unigrad.objective.registry import ADVANTAGE, AGGREGATION, CORRECTION, KL_ESTIMATOR, RATIO, STABILISER, Registry
from unigrad.objective.spec import Objective

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
    registry.register("a", formula=lambda o: "x")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a", formula=lambda o: "y")


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
