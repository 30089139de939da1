"""Parity with TRL 1.16: unigrad's loss and gradient equal TRL's on the same tensors.

TRL is the oracle, called as-is (nothing of it is re-implemented here):

- the loss is `GRPOTrainer._compute_loss`, called unbound on a minimal fake trainer (`run_trl`)
  whose `_get_per_token_logps_and_entropies` returns *our* leaf tensor, so TRL's loss is a
  function of exactly the log-probs unigrad sees and both gradients can be compared;
- the vLLM importance-sampling ratio is computed inline in
  `GRPOTrainer._generate_and_score_completions`; its block is cut out of TRL's source and
  executed (`trl_importance_sampling_ratio`). If TRL moves that block, the test fails.

Everything is float32: unigrad always computes in float32 and TRL in the input dtype, so both
run the same precision; the only differences are summation order and `torch.where` vs
multiply-by-mask, which stay far below atol=1e-6 / rtol=1e-5.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import textwrap
import types

import pytest
import torch

# TRL is a pinned test dependency (pyproject: trl>=1.16,<1.17): imported plainly, so a missing TRL is an
# error rather than a silently skipped parity guarantee.
from accelerate import Accelerator
from trl import GRPOConfig, GRPOTrainer

from unigrad.objective import compute_policy_loss

# TRL's own defaults, read from its config dataclass (no GRPOConfig instance needed).
TRL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
TOL = dict(atol=1e-6, rtol=1e-5)
MAX_COMPLETION_LENGTH = 12  # the generation budget L_max; larger than the padded width T, as in real batches


@functools.cache
def _accelerator() -> Accelerator:
    # A real single-process CPU Accelerator: gather / reduce / num_processes behave as in TRL's own runs.
    return Accelerator(cpu=True)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    logprobs: torch.Tensor  # (B, T) log pi_theta (values; each run makes its own leaf)
    mask: torch.Tensor  # (B, T) long 0/1, like TRL's completion_mask
    advantages: torch.Tensor  # (B,)
    old: torch.Tensor  # (B, T) log pi_old (trainer, before the update)
    ref: torch.Tensor  # (B, T) reference model
    infer: torch.Tensor  # (B, T) rollout engine (vLLM's sampling_per_token_logps)
    entropy: torch.Tensor  # (B, T)

    @property
    def num_tokens(self) -> float:
        return float(self.mask.sum())


def make_batch(lengths, width, *, seed=0, old_noise=0.3, infer_noise=0.3, ref_noise=0.3) -> Batch:
    """Random log-probs; masked positions hold finite garbage that neither side may use."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    logprobs = -3.0 * torch.rand(b, width, generator=g) - 0.05
    old = logprobs + old_noise * torch.randn(b, width, generator=g)
    # Deterministic outliers so every rule has something to act on: ratio e^2 > 5 (CISPO's eps_max, and
    # clipped high with A > 0) and e^-1.5 (clipped low with A < 0).
    old[0, 1] = logprobs[0, 1] - 2.0
    old[1, 0] = logprobs[1, 0] + 1.5
    infer = old + infer_noise * torch.randn(b, width, generator=g)
    # rho = pi_old / pi_infer: e^1.5 = 4.5 > TRL's C = 3 on row 0, e^-1.5 = 0.22 < 0.5 on row 1.
    infer[0, 0] = old[0, 0] - 1.5
    infer[1, 1] = old[1, 1] + 1.5
    ref = logprobs + ref_noise * torch.randn(b, width, generator=g)
    entropy = 2.0 * torch.rand(b, width, generator=g)
    signs = torch.tensor([1.0, -1.0] * b)[:b]
    advantages = signs * (0.3 + torch.rand(b, generator=g))
    return Batch(logprobs, mask, advantages, old, ref, infer, entropy)


# Variable lengths, including a length-1 and an empty completion (both count in N_seq, as in TRL).
TOKEN_BATCH = make_batch([8, 7, 5, 3, 8, 1, 0, 6], width=8)
# Short sequences for TRL's sequence_* IS modes: the *product* of token rhos explodes with length.
SHORT_BATCH = make_batch([5, 4, 4, 3, 2, 2, 1, 0], width=5, seed=1, infer_noise=0.5)


# ---------------------------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    loss: torch.Tensor
    grad: torch.Tensor  # d loss / d logprobs, (B, T)
    metrics: dict
    is_ratio: torch.Tensor | None = None  # TRL's vllm importance-sampling ratio, when used


@functools.cache
def _trl_is_ratio_block() -> str:
    """The source of TRL's inline vLLM IS-ratio computation, dedented, ready to exec."""
    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(
        (
            i
            for i in range(len(lines) - 1)
            if lines[i].strip() == "if self.use_vllm and self.vllm_importance_sampling_correction:"
            and lines[i + 1].strip().startswith("mask = completion_mask if tool_mask is None")
        ),
        None,
    )
    end = None
    if start is not None:
        marker = "# Compute the per-token log probabilities for the reference model"
        end = next((i for i in range(start, len(lines)) if lines[i].strip() == marker), None)
    if start is None or end is None:
        pytest.fail(
            "TRL changed: could not find the vLLM importance-sampling block in "
            "GRPOTrainer._generate_and_score_completions (markers 'if self.use_vllm and "
            "self.vllm_importance_sampling_correction:' + 'mask = completion_mask if tool_mask is None' ... "
            "'# Compute the per-token log probabilities for the reference model'). Update this test."
        )
    block = textwrap.dedent("\n".join(lines[start:end]))
    assert "vllm_importance_sampling_ratio" in block, "TRL changed: the IS block no longer sets the ratio"
    return block


def trl_importance_sampling_ratio(trainer, completion_mask, old, infer) -> torch.Tensor:
    """Run TRL's own IS-ratio block: (B, T) for token_* modes, (B, 1) for sequence_* modes."""
    namespace = dict(
        self=trainer, completion_mask=completion_mask, tool_mask=None,
        old_per_token_logps=old, sampling_per_token_logps=infer, torch=torch, math=math,
    )
    exec(_trl_is_ratio_block(), namespace)  # noqa: S102 - TRL's own code is the oracle
    return namespace["vllm_importance_sampling_ratio"]


def run_trl(
    batch: Batch,
    *,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    epsilon_low: float = TRL_DEFAULTS["epsilon"],
    epsilon_high: float | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = TRL_DEFAULTS["use_bias_correction_kl"],
    on_policy: bool = False,
    is_mode: str | None = None,
    is_clip_min: float | None = TRL_DEFAULTS["vllm_importance_sampling_clip_min"],
    is_clip_max: float | None = TRL_DEFAULTS["vllm_importance_sampling_clip_max"],
) -> Result:
    """Build a fake GRPOTrainer carrying exactly what `_compute_loss` reads, and run TRL's loss on it.

    `is_mode` set: vLLM IS correction on, with the ratio from TRL's own block (mode = TRL's
    vllm_importance_sampling_mode). `on_policy`: no old_per_token_logps in the inputs, so TRL uses
    per_token_logps.detach().
    """
    logprobs = batch.logprobs.clone().requires_grad_(True)
    b, t = logprobs.shape
    args = types.SimpleNamespace(
        use_bias_correction_kl=use_bias_correction_kl,
        delta=TRL_DEFAULTS["delta"],
        sapo_temperature_pos=TRL_DEFAULTS["sapo_temperature_pos"],
        sapo_temperature_neg=TRL_DEFAULTS["sapo_temperature_neg"],
        steps_per_generation=1,  # one generation batch = one optimizer step = this call
    )
    trainer = types.SimpleNamespace(
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,  # as GRPOTrainer.__init__
        beta=beta,
        args=args,
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        use_vllm=is_mode is not None,
        vllm_importance_sampling_correction=is_mode is not None,
        vllm_importance_sampling_mode=is_mode,
        vllm_importance_sampling_clip_min=is_clip_min,
        vllm_importance_sampling_clip_max=is_clip_max,
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        model=types.SimpleNamespace(training=True),
        accelerator=_accelerator(),
        _entropy_bonus_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        # TRL's loss is computed on our leaf tensor (the model forward is what we replace).
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, batch.entropy.clone(), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": batch.mask.clone(),
        "advantages": batch.advantages.clone(),
        "num_items_in_batch": batch.mask.sum(),  # read by dapo / cispo
    }
    if not on_policy:
        inputs["old_per_token_logps"] = batch.old.clone()
    if beta > 0:
        inputs["ref_per_token_logps"] = batch.ref.clone()
    is_ratio = None
    if is_mode is not None:
        is_ratio = trl_importance_sampling_ratio(trainer, batch.mask.clone(), batch.old.clone(), batch.infer.clone())
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return Result(loss.detach(), grad, metrics, is_ratio)


def run_unigrad(batch: Batch, objective: str, *, on_policy: bool = False, **overrides) -> Result:
    logprobs = batch.logprobs.clone().requires_grad_(True)
    out = compute_policy_loss(
        logprobs, batch.mask, batch.advantages, objective,
        old_logprobs=None if on_policy else batch.old,
        infer_logprobs=batch.infer,
        ref_logprobs=batch.ref,
        max_length=MAX_COMPLETION_LENGTH,
        # This call is the whole optimizer batch (TRL: steps_per_generation = accumulation = 1).
        num_tokens=batch.num_tokens,
        num_sequences=float(batch.mask.shape[0]),
        entropy=batch.entropy,
        **overrides,
    )
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    return Result(out.loss.detach(), grad, out.metrics)


def assert_same(ours: Result, theirs: Result) -> None:
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL, msg=lambda m: f"loss differs from TRL: {m}")
    torch.testing.assert_close(ours.grad, theirs.grad, **TOL, msg=lambda m: f"gradient differs from TRL: {m}")


def differs(ours: Result, theirs: Result, *, by: float = 1e-4) -> bool:
    return bool((ours.loss - theirs.loss).abs() > by or (ours.grad - theirs.grad).abs().max() > by)


# ---------------------------------------------------------------------------------------------------------------
# 1-2. Loss types
# ---------------------------------------------------------------------------------------------------------------

# unigrad preset -> the TRL trainer settings that implement it. unigrad's preset defaults (epsilon 0.2,
# SAPO temperatures 1.0 / 1.05) are not overridden: the test also pins that they equal TRL's defaults.
TRL_SETTINGS = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),  # divides by B * max_completion_length (= our max_length)
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),  # divides by num_items_in_batch (= our num_tokens)
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
    "sapo": dict(loss_type="sapo"),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),  # TRL's epsilon_high is CISPO's eps_max
}
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no_kl", "kl"])
@pytest.mark.parametrize("preset", list(TRL_SETTINGS))
def test_loss_and_gradient_match_trl(preset, beta):
    theirs = run_trl(TOKEN_BATCH, beta=beta, use_bias_correction_kl=True, **TRL_SETTINGS[preset])
    # TRL's use_bias_correction_kl=True multiplies the KL by the ratio and does not clamp it.
    kl = dict(beta=beta, kl_ratio_weighted=True, kl_clamp=None) if beta > 0 else {}
    ours = run_unigrad(TOKEN_BATCH, preset, **kl)

    # Not vacuous: the stabiliser must be active somewhere (and not everywhere).
    if preset in CLIPPED:
        assert 0 < theirs.metrics["clip_ratio/region_mean"] < 1
        assert 0 < ours.metrics["clip/region_fraction"] < 1
        assert theirs.grad.abs().max() > 1e-3  # some tokens (GSPO: sequences) keep their gradient
    elif preset == "cispo":
        assert ours.metrics["clip/truncated_fraction"] > 0  # some ratio > eps_max = 5
    else:  # sapo: the gate is far from its linear regime on some tokens
        assert ours.metrics["ratio/max"] > 2 and ours.metrics["ratio/min"] < 0.5
    assert_same(ours, theirs)


@pytest.mark.parametrize("preset", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_metrics_match_trl(preset):
    theirs = run_trl(TOKEN_BATCH, beta=0.04, use_bias_correction_kl=True, **TRL_SETTINGS[preset])
    ours = run_unigrad(TOKEN_BATCH, preset, beta=0.04, kl_ratio_weighted=True, kl_clamp=None)
    pairs = {
        "clip/low_fraction": "clip_ratio/low_mean",
        "clip/high_fraction": "clip_ratio/high_mean",
        "clip/region_fraction": "clip_ratio/region_mean",
        "entropy": "entropy",
        "kl": "kl",  # both the ratio-weighted per-token KL, token mean
    }
    assert theirs.metrics["clip_ratio/low_mean"] > 0 and theirs.metrics["clip_ratio/high_mean"] > 0
    for ours_name, trl_name in pairs.items():
        assert ours.metrics[ours_name] == pytest.approx(theirs.metrics[trl_name], abs=1e-6), ours_name
    # (GSPO is left out on purpose: TRL averages its sequence-level clip flags per *sequence*, unigrad per token.)


# ---------------------------------------------------------------------------------------------------------------
# KL: TRL's default multiplies it by the ratio, unigrad's does not
# ---------------------------------------------------------------------------------------------------------------


def test_kl_default_differs_from_trl_bias_corrected():
    assert TRL_DEFAULTS["use_bias_correction_kl"] is True  # if TRL flips its default, revisit docs/objectives.md
    batch = make_batch([8, 7, 5, 3, 8, 1, 0, 6], width=8, seed=3, ref_noise=0.8)
    beta = 0.1
    ours = run_unigrad(batch, "grpo", on_policy=True, beta=beta)  # unigrad defaults: no ratio weighting
    trl_default = run_trl(batch, beta=beta, on_policy=True)

    # On-policy the ratio is 1 in value, so the loss VALUE is the same ...
    torch.testing.assert_close(ours.loss, trl_default.loss, **TOL)
    # ... but d(ratio * KL) = KL * d(logp) + d(KL): TRL's gradient has the extra beta * KL_t term,
    # spread by GRPO's aggregation (1 / (|y_i| * B)).
    assert (ours.grad - trl_default.grad).abs().max() > 1e-3
    d = batch.ref - batch.logprobs
    k3 = torch.exp(d) - d - 1
    lengths = batch.mask.sum(-1, keepdim=True).clamp(min=1)
    extra = beta * k3 * batch.mask / (lengths * batch.mask.shape[0])
    torch.testing.assert_close(trl_default.grad - ours.grad, extra, **TOL)

    # With use_bias_correction_kl=False TRL is unigrad's default, on- and off-policy.
    assert_same(ours, run_trl(batch, beta=beta, on_policy=True, use_bias_correction_kl=False))
    assert_same(
        run_unigrad(batch, "grpo", beta=beta),
        run_trl(batch, beta=beta, use_bias_correction_kl=False),
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. vLLM importance-sampling correction (TRL's four modes)
# ---------------------------------------------------------------------------------------------------------------


def unigrad_correction(mode: str, clip_min: float | None, clip_max: float) -> dict:
    """unigrad's objective overrides equivalent to TRL's vllm_importance_sampling_mode."""
    low = 0.0 if clip_min is None else clip_min  # TRL masks below -inf when clip_min is None: nothing
    return {
        "token_truncate": dict(correction="tis", tis_cap=clip_max, tis_floor=clip_min),
        "token_mask": dict(correction="icepop", icepop_low=low, icepop_high=clip_max),
        "sequence_truncate": dict(correction="seq_tis", correction_form="product", tis_cap=clip_max,
                                  tis_floor=clip_min),
        "sequence_mask": dict(correction="seq_mask", correction_form="product", icepop_low=low,
                              icepop_high=clip_max),
    }[mode]


IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no_kl", "kl"])
@pytest.mark.parametrize("clip_min", [None, 0.5], ids=["no_min", "min0.5"])
@pytest.mark.parametrize("mode", IS_MODES)
def test_vllm_importance_sampling_matches_trl(mode, clip_min, beta):
    clip_max = TRL_DEFAULTS["vllm_importance_sampling_clip_max"]  # 3.0
    theirs = run_trl(SHORT_BATCH, beta=beta, is_mode=mode, is_clip_min=clip_min, is_clip_max=clip_max)
    kl = dict(beta=beta, kl_ratio_weighted=True, kl_clamp=None) if beta > 0 else {}
    ours = run_unigrad(SHORT_BATCH, "grpo", **unigrad_correction(mode, clip_min, clip_max), **kl)

    # Not vacuous: the rule truncates / masks some tokens (or sequences) and leaves others alone.
    rows = SHORT_BATCH.mask.sum(-1) > 0
    w = theirs.is_ratio[rows] if mode.startswith("sequence") else theirs.is_ratio[SHORT_BATCH.mask.bool()]
    if mode.endswith("truncate"):
        hit = (w == clip_max) | (w == clip_min) if clip_min is not None else w == clip_max
        assert ours.metrics["correction/truncated_fraction"] > 0
    else:
        hit = w == 0
        assert ours.metrics["correction/masked_fraction"] > 0
    assert bool(hit.any()) and not bool(hit.all()), f"{mode}: TRL's IS weights {w.flatten().tolist()}"
    assert_same(ours, theirs)


@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask"])
def test_geometric_sequence_form_differs_from_trl_product(mode):
    """unigrad's default sequence rho is the length-normalised geometric mean; TRL's is the product."""
    clip_max = TRL_DEFAULTS["vllm_importance_sampling_clip_max"]
    theirs = run_trl(SHORT_BATCH, is_mode=mode, is_clip_max=clip_max)
    overrides = unigrad_correction(mode, None, clip_max)
    assert_same(run_unigrad(SHORT_BATCH, "grpo", **overrides), theirs)
    overrides.pop("correction_form")  # back to unigrad's default, "geometric"
    ours = run_unigrad(SHORT_BATCH, "grpo", **overrides)
    assert differs(ours, theirs)
