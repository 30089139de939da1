"""The preset registry: named compositions of the objective's parts, each with its source.

`unigrad presets`, the table in docs/objectives.md and the tests are all generated from
`PRESETS`, so they cannot drift apart. `resolve_objective` turns a preset name (or an
`Objective`, or a dict of fields) plus overrides into one validated `Objective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from unigrad.objective.registry import REGISTRIES
from unigrad.objective.spec import Objective


@dataclass(frozen=True)
class Preset:
    name: str
    objective: Objective
    paper: str
    url: str
    note: str = ""


def _preset(name: str, paper: str, url: str, note: str = "", **fields: Any) -> Preset:
    return Preset(name, Objective(**fields), paper, url, note)


_GRPO = dict(ratio="token", stabiliser="clip", epsilon=0.2, advantage="grpo", aggregation="seq_mean_token_mean")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset(
            "sft", "Towards a Unified View of LLM Post-Training (UPGE)", "https://arxiv.org/abs/2509.04419",
            "pi_ref = sg(pi_theta), A = 1: the token-mean NLL of the demonstrations.",
            ratio="self", stabiliser="none", advantage="sft", aggregation="token_mean",
        ),
        _preset(
            "reinforce", "Williams 1992, Simple statistical gradient-following algorithms", "https://doi.org/10.1007/BF00992696",
            "A = R with no baseline; the gradient of a whole sequence's log-likelihood.",
            ratio="token", stabiliser="none", advantage="reinforce", aggregation="seq_mean_token_sum",
        ),
        _preset(
            "ppo", "Proximal Policy Optimization", "https://arxiv.org/abs/1707.06347",
            "No critic: outcome reward whitened over the batch stands in for GAE (gamma = lambda = 1, V = 0).",
            ratio="token", stabiliser="clip", epsilon=0.2, advantage="whiten", aggregation="token_mean",
        ),
        _preset("grpo", "DeepSeekMath (GRPO)", "https://arxiv.org/abs/2402.03300",
                "beta = 0 by default (TRL and DAPO practice); community reports on long TRL "
                "runs suggest 0.001.", **_GRPO),
        _preset(
            "dr_grpo", "Understanding R1-Zero-Like Training (Dr. GRPO)", "https://arxiv.org/abs/2503.20783",
            "No std in the advantage, no per-sequence length normaliser: sum / (B * L_max).",
            **{**_GRPO, "advantage": "dr_grpo", "aggregation": "seq_mean_token_sum_norm"},
        ),
        _preset(
            "dapo", "DAPO", "https://arxiv.org/abs/2503.14476",
            "Clip-higher and token-level mean; the trainer adds dynamic sampling and overlong reward shaping "
            "(rollout.dynamic_sampling, rollout.overlong_buffer; on by default with this preset).",
            **{**_GRPO, "epsilon_high": 0.28, "aggregation": "token_mean"},
        ),
        _preset(
            "bnpo", "TRL loss_type='bnpo'", "https://huggingface.co/docs/trl/main/en/grpo_trainer",
            "Token mean over the tokens of each micro-batch (local), as TRL's bnpo; not micro-batch invariant.",
            **{**_GRPO, "aggregation": "token_mean", "normaliser_scope": "local"},
        ),
        _preset(
            "gspo", "Group Sequence Policy Optimization", "https://arxiv.org/abs/2507.18071",
            "Sequence-level geometric-mean ratio; clip range 3e-4 / 4e-4 from the paper.",
            **{**_GRPO, "ratio": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        ),
        _preset(
            "sapo", "Soft Adaptive Policy Optimization", "https://arxiv.org/abs/2511.20347",
            "Sigmoid gate instead of a hard clip; tau_neg > tau_pos damps negative-advantage tokens more.",
            **{**_GRPO, "stabiliser": "soft_gate", "tau_pos": 1.0, "tau_neg": 1.05},
        ),
        _preset(
            "cispo", "MiniMax-M1 (CISPO)", "https://arxiv.org/abs/2506.13585",
            "Truncate the detached IS weight, keep every token's gradient; eps_max = 5 as in ScaleRL.",
            **{**_GRPO, "stabiliser": "cispo", "cispo_max": 5.0, "aggregation": "token_mean"},
        ),
        _preset(
            "grpo_tis", "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training (TIS)",
            "https://fengyao.notion.site/off-policy-rl",
            "Token-level truncated IS against the rollout engine's log-probs, C = 2 (verl; TRL uses 3).",
            **{**_GRPO, "correction": "tis", "tis_cap": 2.0},
        ),
        _preset(
            "grpo_icepop", "Every Step Evolves: Scaling RL for Trillion-Scale Thinking Model (IcePop)",
            "https://arxiv.org/abs/2510.18855",
            "Double-sided token mask: rho outside [0.5, 5] gets weight 0 (slime defaults to [0, 2]).",
            **{**_GRPO, "correction": "icepop", "icepop_low": 0.5, "icepop_high": 5.0},
        ),
        _preset(
            "decoupled_ppo", "AReaL: A Large-Scale Asynchronous Reinforcement Learning System (decoupled PPO)",
            "https://arxiv.org/abs/2505.24298",
            "Clip current against the proximal policy, weigh by proximal/behaviour and drop tokens above 5 (AReaL's "
            "behav_imp_weight_cap in its example configs); for stale or mini-batched data.",
            **{**_GRPO, "aggregation": "token_mean", "correction": "icepop", "icepop_low": 0.0, "icepop_high": 5.0},
        ),
        _preset(
            "luffy", "Learning to Reason under Off-Policy Guidance (LUFFY)", "https://arxiv.org/abs/2504.14945",
            "On-policy tokens: clipped GRPO; demonstration tokens (off_policy_mask): -A * p/(p+0.1), no clip.",
            **{**_GRPO, "aggregation": "token_mean", "off_policy_ratio": "none", "shaping": 0.1},
        ),
    ]
}

OBJECTIVE_FIELDS = tuple(Objective.model_fields)


class ObjectiveError(ValueError):
    """An unknown preset, an unknown override or an invalid value."""


def _describe_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        if e["loc"]:
            where = ".".join(str(p) for p in e["loc"])
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
        else:  # a rule across fields: the message names them
            lines.append(e["msg"].removeprefix("Value error, "))
    return "; ".join(lines)


def _build(fields: dict[str, Any]) -> Objective:
    unknown = sorted(set(fields) - set(OBJECTIVE_FIELDS))
    if unknown:
        raise ObjectiveError(
            f"unknown objective option(s) {', '.join(unknown)}; valid options: {', '.join(OBJECTIVE_FIELDS)}"
        )
    try:
        return Objective(**fields)
    except ValidationError as err:
        raise ObjectiveError(f"invalid objective: {_describe_validation_error(err)}") from None


@lru_cache(maxsize=256)
def _resolve_cached(name: str, overrides: tuple[tuple[str, Any], ...]) -> Objective:
    return _build({**get_preset(name).objective.model_dump(), **dict(overrides)})


for _registry in REGISTRIES:  # a part registered or removed changes what an override may name
    _registry.on_change(_resolve_cached.cache_clear)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ObjectiveError(f"unknown objective preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def resolve_objective(objective: str | Objective | dict[str, Any] = "grpo", **overrides: Any) -> Objective:
    """One validated `Objective` from a preset name / Objective / dict, plus field overrides."""
    if isinstance(objective, str):
        try:
            return _resolve_cached(objective, tuple(sorted(overrides.items())))
        except TypeError:  # an unhashable override value: skip the cache
            return _build({**get_preset(objective).objective.model_dump(), **overrides})
    if isinstance(objective, Objective):
        return objective if not overrides else _build({**objective.model_dump(), **overrides})
    if isinstance(objective, dict):
        return _build({**objective, **overrides})
    raise ObjectiveError(
        f"objective must be a preset name, an Objective or a dict, not {type(objective).__name__}"
    )
