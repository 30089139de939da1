"""A pool of rollout engines as Ray actors, itself a `RolloutEngine`.

Each actor holds a `TransformersEngine` on its own copy of the model. `generate` splits the call's prompts into
contiguous blocks, one per actor, each prompt keeping the random stream it has in a single engine
(`SamplingParams.prompt_seeds`), and merges the actors' rollouts back in prompt order, padded as one engine pads
them. So a pool returns exactly what one engine returns for the same seed. `load_weights` puts the learner's
state dict into Ray's object store once; every actor reads it from there.

Ray places the actors: on one machine they are processes; on a cluster (`ray start` on each node, then
`ray.init(address="auto")` before building the pool) they spread over nodes. `actor_options` passes Ray resource
requests through (e.g. `{"num_gpus": 1}` for one GPU per engine). Install with `pip install "unigrad[ray]"`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .base import Rollout, SamplingParams, merge_rollouts, resolve_prompt_seeds  # noqa: F401 - re-exported


class EngineHost:
    """One engine on its own copy of the model, built from (config, state dict): inside a Ray actor process (wrapped
    by `ray.remote` on first use) or the asynchronous rollout worker (unigrad.rollout.async_worker)."""

    def __init__(self, payload, pad_token_id, eos_token_id, dtype, decoder, threads):
        from transformers import AutoModelForCausalLM

        from .transformers_engine import TransformersEngine

        if threads:
            torch.set_num_threads(threads)
        config, state = payload
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state)
        model.eval()
        self.engine = TransformersEngine(model, pad_token_id, eos_token_id, dtype=dtype, decoder=decoder)

    def load_weights(self, state) -> None:
        self.engine.load_weights(state)

    def generate(self, prompts, n, sampling) -> Rollout:
        return self.engine.generate(prompts, n, sampling)

    def decoder(self) -> str:
        return self.engine.decoder


class RayRolloutPool:
    """`num_engines` `TransformersEngine`s as Ray actors behind the `RolloutEngine` protocol."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int | Sequence[int] | None,
                 num_engines: int = 2, *, dtype: torch.dtype | None = None, decoder: str = "auto",
                 threads_per_engine: int = 1, actor_options: dict | None = None) -> None:
        try:
            import ray
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError('the Ray rollout pool needs ray: pip install "unigrad[ray]"') from err
        if num_engines < 1:
            raise ValueError("num_engines must be >= 1")
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        self._ray = ray
        self.pad_token_id = int(pad_token_id)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        payload = ray.put((model.config, state))
        actor = ray.remote(EngineHost).options(num_cpus=threads_per_engine, **(actor_options or {}))
        self.actors = [actor.remote(payload, pad_token_id, eos_token_id, dtype, decoder, threads_per_engine)
                       for _ in range(num_engines)]
        self.decoder = ray.get(self.actors[0].decoder.remote())

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put the weights into the object store once; every actor copies them into its model."""
        ref = self._ray.put({k: v.detach().cpu() for k, v in state_dict.items()})
        self._ray.get([a.load_weights.remote(ref) for a in self.actors])

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        seeds = resolve_prompt_seeds(sampling, len(prompts))
        per, extra = divmod(len(prompts), len(self.actors))
        futures, lo = [], 0
        for i, actor in enumerate(self.actors):
            hi = lo + per + (i < extra)
            if hi > lo:
                block = dataclasses.replace(sampling, prompt_seeds=tuple(seeds[lo:hi]))
                futures.append(actor.generate.remote(prompts[lo:hi], n, block))
            lo = hi
        return merge_rollouts(self._ray.get(futures), self.pad_token_id)

    def shutdown(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
