"""`Objective`: one post-training objective, composed from named parts.

The unified policy-gradient estimator (UPGE, arXiv 2509.04419, eq. 3) is

    grad = 1_stable * (1 / pi_ref) * A_hat * grad(pi_theta)

An `Objective` names one choice for each part plus the behaviour correction (TIS / IcePop),
the advantage estimator, the aggregation and the regularisers. It is a frozen, validated
value: presets are instances of it, and `compute_policy_loss` accepts a preset name, an
`Objective`, or a plain dict of fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The parts' modules register their choices; each field below allows exactly the registered names.
from unigrad.objective import advantages, aggregation, corrections, ratios, regularisers, stabilisers  # noqa: F401
from unigrad.objective.registry import (
    ADVANTAGE,
    AGGREGATION,
    CORRECTION,
    KL_ESTIMATOR,
    RATIO,
    REGISTRIES,
    STABILISER,
    Registry,
)

RatioLevel = RATIO.literal()
Stabiliser = STABILISER.literal()
Correction = CORRECTION.literal()
SequenceRatioForm = Literal["geometric", "product"]
AdvantageEstimator = ADVANTAGE.literal()
Aggregation = AGGREGATION.literal()
NormaliserScope = Literal["global", "local"]
KLEstimator = KL_ESTIMATOR.literal()
OffPolicyRatio = Literal["none", "self"]


class Objective(BaseModel):
    """A policy-gradient objective as a composition of parts (see docs/objectives.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- reference denominator: which ratio multiplies the advantage --------------------------
    ratio: RatioLevel = Field("token", description=RATIO.field_description())
    shaping: float | None = Field(
        None,
        gt=0,
        description="gamma of the shaping f(p) = p / (p + gamma) used where pi_ref = 1 (ratio 'none' and "
        "LUFFY's off-policy tokens); None means f(p) = p.",
    )
    off_policy_ratio: OffPolicyRatio | None = Field(
        None,
        description="how tokens flagged by `off_policy_mask` (e.g. demonstrations) enter the loss: "
        "'none' (pi_ref = 1, shaped, LUFFY) or 'self' (SFT form); None: no off-policy tokens expected.",
    )

    # -- stabilisation mask -------------------------------------------------------------------
    stabiliser: Stabiliser = Field("clip", description=STABILISER.field_description())
    epsilon: float = Field(0.2, ge=0, description="lower clip range: ratio floor is 1 - epsilon")
    epsilon_high: float | None = Field(
        None, ge=0, description="upper clip range (DAPO clip-higher); None means equal to epsilon"
    )
    dual_clip_c: float = Field(3.0, gt=1, description="dual-clip cap for negative advantages (loss <= c*|A|)")
    tau_pos: float = Field(1.0, gt=0, description="SAPO gate temperature for A > 0")
    tau_neg: float = Field(1.05, gt=0, description="SAPO gate temperature for A <= 0")
    cispo_max: float = Field(5.0, gt=0, description="CISPO truncation of the (detached) ratio: min(r, cispo_max)")
    log_ratio_clamp: float | None = Field(
        20.0, gt=0, description="clamp log-ratios to +-this before exp, as verl does; None disables"
    )

    # -- behaviour correction (rollout engine vs trainer) ----------------------------------------
    correction: Correction = Field("none", description=CORRECTION.field_description())
    correction_form: SequenceRatioForm = Field(
        "geometric",
        description="sequence-level rho for seq_tis / seq_mask: geometric mean of token rhos (length-"
        "normalised) or their product (TRL's sequence_* modes)",
    )
    tis_cap: float = Field(2.0, gt=0, description="TIS truncation C: w = min(rho, C)")
    tis_floor: float | None = Field(None, ge=0, description="optional lower truncation for tis / seq_tis")
    icepop_low: float = Field(0.5, ge=0, description="IcePop alpha: tokens with rho < alpha get weight 0")
    icepop_high: float = Field(5.0, gt=0, description="IcePop beta: tokens with rho > beta get weight 0")
    masked_tokens_in_denominator: bool = Field(
        True,
        description="whether tokens zeroed by icepop / seq_mask still count in the token normalisers",
    )

    # -- advantage ----------------------------------------------------------------------------
    advantage: AdvantageEstimator = Field("grpo", description=ADVANTAGE.field_description())
    advantage_eps: float = Field(1e-6, gt=0, description="added to the std in std-normalised advantages")
    per_task_advantage: bool = Field(
        False, description="also standardise advantages within each task (after the group step)"
    )

    # -- aggregation ----------------------------------------------------------------------------
    aggregation: Aggregation = Field("seq_mean_token_mean", description=AGGREGATION.field_description())
    normaliser_scope: NormaliserScope = Field(
        "global",
        description="global: normalisers passed in for the whole optimizer batch; local: token_mean over "
        "this call's tokens only (TRL's bnpo); not invariant to micro-batching by design",
    )

    # -- regularisers ---------------------------------------------------------------------------
    beta: float = Field(0.0, ge=0, description="KL-to-reference coefficient (long-run reports suggest 0.001)")
    kl_estimator: KLEstimator = Field("k3", description=KL_ESTIMATOR.field_description())
    kl_clamp: float | None = Field(10.0, gt=0, description="clamp the per-token KL to +-this; None disables")
    kl_ratio_weighted: bool = Field(
        False,
        description="multiply the per-token KL by the policy ratio (TRL's use_bias_correction_kl, its default)",
    )
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus: loss -= entropy_coef * mean entropy")

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def uses_old_logprobs(self) -> bool:
        """Whether the ratio depends on pi_old (otherwise old log-probs are irrelevant)."""
        return RATIO.has(self.ratio, "uses_old_logprobs")

    @property
    def correction_zeroes_tokens(self) -> bool:
        """Whether the behaviour correction can take tokens out of the loss (IcePop's band, seq_mask)."""
        return CORRECTION.has(self.correction, "zeroes_tokens")

    @property
    def needs_infer_logprobs(self) -> bool:
        return CORRECTION.has(self.correction, "reads_infer_logprobs")

    @property
    def is_supervised(self) -> bool:
        """Whether the advantage is the constant of supervised learning on demonstrations (A = 1)."""
        return ADVANTAGE.has(self.advantage, "is_supervised")

    @property
    def normalises_by_tokens(self) -> bool:
        """Whether the aggregation divides by a token count (otherwise by sequences)."""
        return AGGREGATION.has(self.aggregation, "per_token_normaliser")

    @property
    def needs_ref_logprobs(self) -> bool:
        return self.beta > 0

    @model_validator(mode="after")
    def _parts_fit_together(self) -> Objective:
        if not self.uses_old_logprobs and STABILISER.has(self.stabiliser, "needs_old_logprobs"):
            raise ValueError(
                f"ratio={self.ratio!r} has no pi_old to stabilise against; use stabiliser='none' "
                f"(got {self.stabiliser!r})"
            )
        if STABILISER.has(self.stabiliser, "clips") and self.epsilon >= 1:
            raise ValueError(f"epsilon must be < 1 for clipping (got {self.epsilon})")
        if self.tis_floor is not None and self.tis_floor > self.tis_cap:
            raise ValueError(f"tis_floor ({self.tis_floor}) must not exceed tis_cap ({self.tis_cap})")
        if self.icepop_low >= self.icepop_high:
            raise ValueError(f"icepop_low ({self.icepop_low}) must be < icepop_high ({self.icepop_high})")
        if self.normaliser_scope == "local" and not self.normalises_by_tokens:
            token_means = " or ".join(f"aggregation={n!r}" for n in AGGREGATION.with_trait("per_token_normaliser"))
            raise ValueError(f"normaliser_scope='local' only applies to {token_means}")
        return self

    def parts(self) -> dict[str, str]:
        """The part choices with their active parameters (the registries' labels), for tables and logs."""
        out = {"ratio": RATIO[self.ratio].label(self), "stabiliser": STABILISER[self.stabiliser].label(self),
               "correction": CORRECTION[self.correction].label(self),
               "advantage": ADVANTAGE[self.advantage].label(self),
               "aggregation": AGGREGATION[self.aggregation].label(self)}
        if self.off_policy_ratio is not None:
            shaped = f", f(p)=p/(p+{self.shaping:g})" if self.shaping is not None else ""
            out["off_policy"] = f"{self.off_policy_ratio}{shaped}"
        if self.beta > 0:
            out["kl"] = f"{self.kl_estimator} beta={self.beta:g}"
        return out


def _follow_registry(field: str, registry: Registry) -> None:
    """Keep `Objective.<field>` allowing exactly the registered names, described by their summaries."""

    def refresh() -> None:
        info = Objective.model_fields[field]
        info.annotation = registry.literal()
        info.description = registry.field_description()
        Objective.model_rebuild(force=True)

    registry.on_change(refresh)


for _registry in REGISTRIES:
    _follow_registry(_registry.field, _registry)
