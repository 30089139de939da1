"""unigrad inside verl: its objectives as verl policy losses, its metrics from a verl batch.

With unigrad installed next to verl (`pip install "unigrad[verl]"`), `import verl` loads this module through
the `verl.plugins` entry point (on the driver and in every Ray worker), which registers one verl policy loss
per unigrad preset that verl can feed, named `unigrad_<preset>`:

    python -m verl.trainer.main_ppo ... actor_rollout_ref.actor.policy_loss.loss_mode=unigrad_gspo

The loss is `unigrad.objective.compute_policy_loss` on verl's tensors:
- normalisers come from verl's `config.global_batch_info` (the global token and sequence counts of the mini-batch,
  over data-parallel ranks) and the result is multiplied by `dp_size`, because verl's FSDP/Megatron backends
  average gradients over ranks; with no global info the micro-batch's own counts are used, as in verl;
- the aggregation is the preset's own (e.g. Dr. GRPO's sum / (B * L_max)), not verl's `loss_agg_mode`; L_max is
  `loss_scale_factor` when verl sets it, else the padded response length (verl's own default);
- verl's rollout-correction weights (`rollout_is_weights`, from `algorithm.rollout_correction`) multiply each
  token's policy term, as in verl's own losses. Presets that need inputs verl does not pass to a policy loss are
  not registered: TIS / IcePop (the rollout engine's log-probs: use verl's rollout correction instead), LUFFY
  (the demonstration mask), KL in the loss (verl adds its own `use_kl_loss` term), and SFT.

`batch_metrics(batch)` computes unigrad's mismatch metrics (trainer vs rollout log-probs) and per-task reward,
accuracy, |advantage| and lengths from a verl `DataProto` (tasks = its `data_source`), for `metrics.update(...)`
in a verl trainer.
"""

from __future__ import annotations

from typing import Any

import torch

from unigrad.objective import compute_policy_loss, resolve_objective
from unigrad.objective.presets import PRESETS

LOSS_PREFIX = "unigrad_"


def verl_compatible_presets() -> list[str]:
    """Presets whose inputs a verl policy loss receives (old and new log-probs, advantages, mask, IS weights)."""
    out = []
    for name, preset in PRESETS.items():
        obj = preset.objective
        if obj.needs_infer_logprobs or obj.needs_ref_logprobs or obj.off_policy_ratio is not None:
            continue
        if obj.is_supervised:
            continue
        out.append(name)
    return out


def _number(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def make_policy_loss(preset: str, **overrides: Any):
    """A function with verl's policy-loss signature computing unigrad's `preset` (with `overrides`)."""
    objective = resolve_objective(preset, **overrides)

    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        info = dict(getattr(config, "global_batch_info", None) or {})
        dp_size = int(info.get("dp_size") or 1)
        num_tokens, num_sequences = _number(info.get("batch_num_tokens")), _number(info.get("global_batch_size"))
        if dp_size > 1 and (num_tokens is None or num_sequences is None):
            raise ValueError(f"{LOSS_PREFIX}{preset}: with dp_size={dp_size} verl must pass the global "
                             "batch_num_tokens and global_batch_size in config.global_batch_info")
        max_length = _number(info.get("loss_scale_factor")) or float(response_mask.shape[-1])
        out = compute_policy_loss(log_prob, response_mask.bool(), advantages, objective, old_logprobs=old_log_prob,
                                  max_length=max_length, num_tokens=num_tokens, num_sequences=num_sequences,
                                  token_weights=rollout_is_weights)
        metrics = {f"actor/unigrad/{k}": v for k, v in out.metrics.items()}
        return out.loss * dp_size, metrics

    policy_loss.__name__ = f"{LOSS_PREFIX}{preset}"
    policy_loss.__doc__ = f"unigrad preset {preset!r} as a verl policy loss (see unigrad.integrations.verl)."
    return policy_loss


def register(presets: list[str] | None = None) -> list[str]:
    """Register `unigrad_<preset>` verl policy losses (all compatible presets by default); returns their names."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    names = []
    for preset in presets or verl_compatible_presets():
        names.append(f"{LOSS_PREFIX}{preset}")
        register_policy_loss(names[-1])(make_policy_loss(preset))
    return names


def batch_metrics(batch: Any, task_key: str = "data_source") -> dict[str, float]:
    """unigrad's mismatch and per-task metrics from a verl `DataProto` after advantages were computed.

    Reads `responses`, `response_mask` (or the response part of `attention_mask`), `attention_mask`,
    `token_level_scores` (the verifier reward, summed over tokens), `advantages`, and, when present,
    `old_log_probs` with `rollout_log_probs` (the mismatch metrics) and `entropys`; tasks from
    `non_tensor_batch[task_key]`.
    """
    from unigrad.diagnostics.mismatch import mismatch_metrics
    from unigrad.train.step import SampledRows, step_metrics

    t = batch.batch
    response_len = t["responses"].shape[-1]
    mask = (t["response_mask"] if "response_mask" in t.keys() else t["attention_mask"][:, -response_len:]).bool()
    prompt_lengths = t["attention_mask"][:, :-response_len].sum(-1)
    rewards = t["token_level_scores"].sum(-1).float()
    adv = (t["advantages"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,) per-sequence mean advantage
    sources = [str(s) for s in batch.non_tensor_batch.get(task_key, ["all"] * len(rewards))]
    names = sorted(set(sources))
    row_task = torch.tensor([names.index(s) for s in sources])
    rows = SampledRows(rewards, row_task, mask.sum(-1), prompt_lengths, torch.zeros(len(rewards), dtype=torch.bool),
                       adv)
    m = step_metrics(names, rows, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    m = {k: v for k, v in m.items() if not k.startswith("hpt/")}
    if "old_log_probs" in t.keys() and "rollout_log_probs" in t.keys():
        entropy = t["entropys"] if "entropys" in t.keys() else None
        m.update(mismatch_metrics(t["old_log_probs"].float(), t["rollout_log_probs"].float(), mask, entropy=entropy))
    return {f"unigrad/{k}": v for k, v in m.items()}
