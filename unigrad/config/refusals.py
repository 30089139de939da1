"""The refusals that need no machine: settings that cannot run together, decided here once (the config's
validators ask them, and so does unigrad.train.lifecycle.feasibility with the run's process count)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unigrad.config.train_config import TrainConfig


def asynchronous_rollouts_refusal(cfg: TrainConfig, processes: int) -> str | None:
    """Why rollout.max_staleness > 0 cannot run with `cfg` over `processes` processes (None: it can); the one place
    that decides it (the config's validators ask with 1 process, unigrad.train.lifecycle.feasibility with the run's)."""
    if not cfg.rollout.max_staleness:
        return None
    if processes > 1:
        return ("rollout.max_staleness > 0 runs in one process for now (one engine worker beside one learner): "
                "drop --nproc, or set rollout.max_staleness=0")
    refused = {"objective=sft (nothing is sampled)": cfg.objective == "sft",
               "rollout.dynamic_sampling (its extra draws are synchronous)": bool(cfg.rollout.dynamic_sampling),
               "rollout.num_engines > 1": cfg.rollout.num_engines > 1,
               "sharding=fsdp": cfg.sharding == "fsdp",
               "model.lora_r > 0 (the worker's copy is a plain model)": cfg.model.lora_r > 0}
    for what, present in refused.items():
        if present:
            return (f"rollout.max_staleness > 0 with {what} is not supported yet: use rollout.max_staleness=0 "
                    "(synchronous), or drop the other setting")
    return None


def single_process_refusal(cfg: TrainConfig) -> str | None:
    """Why `cfg` cannot run over several data-parallel processes (None: it can)."""
    if (reason := asynchronous_rollouts_refusal(cfg, processes=2)) is not None:
        return reason
    if cfg.rollout.dynamic_sampling:
        return ("rollout.dynamic_sampling runs in one process for now (its extra draws are not dealt over "
                "processes): drop --nproc, or set rollout.dynamic_sampling=false")
    return None
