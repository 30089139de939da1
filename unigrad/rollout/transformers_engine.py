"""A `RolloutEngine` on a plain transformers causal LM: shared-prefix KV-cache sampling, CPU or GPU.

Per call, each distinct prompt is prefilled once (prompts left-padded to a common length, position ids counting only
real tokens); the cache's batch dimension is then expanded so every prompt's n samples share its prefill, and
decoding proceeds one token per step with the `DynamicCache`, the 2-D attention mask growing by one column per step.
Finished rows are fed the pad token until they are a quarter of the batch; then they leave the cache and the batch
(`keep_rows`), and so on until every row has stopped or `max_new_tokens` is reached.

The engine may run its own copy of the model in another dtype (e.g. bfloat16 rollouts for a float32 learner); that
is a genuine train-inference mismatch, visible as `Rollout.infer_logprobs` != the learner's log-probs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .base import Rollout, SamplingParams, check_generate_args, eos_id_list, resolve_prompt_seeds
from .engine_instruments import CallInstruments, CallRows, EngineInstruments
from .logprobs import cache_kwargs, output_cache, position_ids_from_mask
from .padding import pad_rows
from .sampling import select_next_tokens
from .static_decoder import StaticCacheDecoder, unsupported_reason

DECODERS = ("auto", "static", "transformers")


def _cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and persistent buffers to `dtype` in place of `module.to(dtype)`.

    Non-persistent floating buffers (e.g. rotary `inv_freq`) stay as they are: transformers builds them in float32
    even for half-precision checkpoints, and rounding them to bfloat16 would add an error real engines don't have.
    """
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buf.to(dtype)


class TransformersEngine:
    """Sample completions with a transformers causal LM (`AutoModelForCausalLM`), implementing `RolloutEngine`.

    If `dtype` (default: the model's) and `device` match the model's, the engine shares the learner's module and
    `load_weights` with the learner's own state dict is a no-op; otherwise it holds a deep copy cast to `dtype` on
    `device`. `eos_token_id` may be one id, several, or None (never stop early). Rollout tensors live on `device`.

    `decoder`: "static" decodes with `StaticCacheDecoder` (preallocated KV cache, plain torch ops; Llama, Mistral,
    Qwen2 without adapters), "transformers" with the model's own forward and a `DynamicCache` (any causal LM),
    "auto" (default) the first where it applies. Both draw the same tokens from the same seed up to rounding.

    `infer_logprobs` are float32 log-probs under the distribution sampled from (temperature, then top-k, then top-p,
    renormalised); for greedy decoding (temperature 0) they are the log-probs under the unfiltered temperature-1
    softmax. `sequence_logprobs` never filters, so with top-k / top-p the two differ by design.
    """

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        decoder: str = "auto",
        instruments: EngineInstruments | None = None,
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        learner_param = next(model.parameters())
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else learner_param.dtype
        same_device = learner_param.device.type == self.device.type and (
            self.device.index is None or learner_param.device.index == self.device.index
        )
        self.shares_learner_module = self.dtype == learner_param.dtype and same_device
        if self.shares_learner_module:
            self.model = model
        else:
            self.model = copy.deepcopy(model).to(self.device)
            _cast_parameters(self.model, self.dtype)
            if getattr(self.model, "config", None) is not None:
                self.model.config.dtype = self.dtype
            self.model.requires_grad_(False)
            self.model.eval()
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = eos_id_list(eos_token_id)
        # Logit / router noise and the routing record (`unigrad.rollout.engine_instruments`); record: MoE models.
        self.instruments = (instruments or EngineInstruments()).resolved(self.model)
        # Which decode loop runs: the static-cache one where it reproduces the model exactly, else transformers'.
        reason = unsupported_reason(self.model)
        if decoder == "static" and reason is not None:
            raise ValueError(f"decoder='static' cannot run this model: {reason}")
        self.static_decoder = StaticCacheDecoder(self.model) if decoder != "transformers" and reason is None else None
        self.decoder = "static" if self.static_decoder is not None else "transformers"
        self.decoder_fallback_reason = reason if decoder == "auto" else None
        # Finished rows leave the decoder's batch once live rows are at most this fraction of it (0: never).
        self.compact_fraction = 0.75

    # ------------------------------------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy the learner's weights into the engine's tensors in place (casting dtype / device, no reallocation).

        Keys must match the engine model's state dict, except that of a group of tied tensors one key suffices.
        """
        own = self.model.state_dict()
        unexpected = sorted(set(state_dict) - set(own))
        if unexpected:
            raise KeyError(f"load_weights: unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        by_storage: dict[object, list[str]] = {}  # tied tensors (same storage) form one group
        for key, tensor in own.items():
            storage = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else key
            by_storage.setdefault(storage, []).append(key)
        missing = [keys[0] for keys in by_storage.values() if not any(k in state_dict for k in keys)]
        if missing:
            raise KeyError(f"load_weights: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for keys in by_storage.values():
            dst = own[keys[0]]
            src = state_dict[next(k for k in keys if k in state_dict)]
            if src.shape != dst.shape:
                raise ValueError(f"load_weights: {keys[0]} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            if src.data_ptr() == dst.data_ptr() and src.dtype == dst.dtype and src.device == dst.device:
                continue  # the very same tensor (engine shares the learner's module)
            dst.copy_(src)

    # ------------------------------------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Rollout:
        """Sample `n` completions per prompt; rows p*n .. p*n+n-1 belong to prompt p (see `Rollout`)."""
        check_generate_args(prompts, n, sampling)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                fields = self._generate(prompts, n, sampling)
        finally:
            self.model.train(was_training)
        # Tensors made under inference_mode cannot be saved for backward (e.g. as embedding indices in the learner's
        # forward); cloning outside of it gives ordinary tensors.
        return Rollout(**{name: t.clone() if t is not None else None for name, t in fields.items()})

    def _transformers_prefill(self, ids, mask, row_src, all_distinct: bool, n: int, max_new: int):
        """Prefill with the model's own forward; returns (first logits (rows, V), next_logits(tokens, t),
        keep_rows(keep)), the same interface as `StaticCacheDecoder`."""
        rows, prompt_len, dev = row_src.shape[0], ids.shape[1], ids.device
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask),
                         use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, cache))
        cache = output_cache(out)
        if all_distinct:
            cache.batch_repeat_interleave(n)  # row_src is 0,0,..,1,1,..: plain expansion
        else:
            cache.batch_select_indices(row_src)  # repeated prompts share one prefill too
        attention = torch.ones(rows, prompt_len + max_new, dtype=torch.long, device=dev)
        attention[:, :prompt_len] = mask[row_src]
        next_position = mask.sum(-1)[row_src]  # position of the first generated token

        def next_logits(tokens: torch.Tensor, t: int) -> torch.Tensor:
            out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=attention[:, : prompt_len + t + 1],
                             position_ids=(next_position + t).unsqueeze(-1), use_cache=True,
                             **cache_kwargs(self.model, cache))
            return out.logits[:, -1]

        def keep_rows(keep: torch.Tensor) -> None:
            nonlocal attention, next_position
            cache.batch_select_indices(keep)
            attention, next_position = attention[keep], next_position[keep]

        return out.logits[:, -1][row_src], next_logits, keep_rows

    def _generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> dict[str, torch.Tensor]:
        call = _Call.of(prompts, n, sampling, self.pad_token_id, self.device)
        out = _Decoded.empty(call.rows, call.max_new, self.pad_token_id, self.device)
        instruments = None
        if call.max_new > 0:
            # One random stream per prompt (rows p*n .. p*n+n-1): a prompt's samples do not depend on the others.
            seeds = resolve_prompt_seeds(sampling, len(prompts))
            rows = CallRows(call.which, call.mask, call.row_src, n, call.max_new)
            instruments = CallInstruments(self.model, self.instruments, seeds, rows)
            with instruments:  # router noise / the routing record while the model runs
                self._decode(call, seeds, instruments, out)
        steps = out.steps
        return {
            "prompt_ids": call.ids[call.row_src],
            "prompt_mask": call.mask[call.row_src],
            "completion_ids": out.completion[:, :steps],
            "completion_mask": out.completion_mask[:, :steps],
            "infer_logprobs": out.logprobs[:, :steps],
            "group_ids": torch.arange(len(prompts), device=self.device).repeat_interleave(n),
            "truncated": ~out.finished,
            "routing": instruments.routing_record(steps) if instruments is not None else None,
        }

    def _prefill(self, call: _Call, instruments: CallInstruments):
        """(last logits of every row, next_logits(tokens, t), keep_rows(keep)) from the static decoder or
        transformers' cache."""
        instruments.before_prefill()
        if self.static_decoder is not None:
            logits = self.static_decoder.prefill(call.ids, call.mask, call.row_src, call.max_new)
            next_logits, keep_rows = self.static_decoder.step, self.static_decoder.keep_rows
        else:
            logits, next_logits, keep_rows = self._transformers_prefill(
                call.ids, call.mask, call.row_src, call.distinct == call.prompts, call.n, call.max_new)
        instruments.after_prefill()
        return logits, next_logits, keep_rows

    def _decode(self, call: _Call, seeds: list[int], instruments: CallInstruments, out: _Decoded) -> None:
        """Sample up to `call.max_new` tokens per row into `out`, until every row has written an end token."""
        streams = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        logits, next_logits, keep_rows = self._prefill(call, instruments)
        # Rows still in the decoder's batch. Finished rows leave it once they are a quarter of it; they keep their
        # last logits, so the tokens do not depend on when rows leave.
        live = torch.arange(call.rows, device=self.device)
        for t in range(call.max_new):
            noise = None
            if call.sampling.temperature > 0:  # every row draws every step, finished or not: streams stay aligned
                noise = torch.empty(call.rows, logits.shape[-1], device=self.device)
                for p, stream in enumerate(streams):
                    noise[p * call.n : (p + 1) * call.n].exponential_(generator=stream)
            tokens, token_logprobs = select_next_tokens(instruments.noisy_logits(logits), call.sampling, noise)
            if out.record(t, tokens, token_logprobs, eos):
                break
            still = ~out.finished[live]
            if int(still.sum()) <= self.compact_fraction * len(live):
                keep = torch.nonzero(still).flatten()
                keep_rows(keep)
                live = live[keep]
            instruments.before_step(live)
            if len(live) == call.rows:
                logits = next_logits(out.completion[:, t], t)
            else:
                logits[live] = next_logits(out.completion[live, t], t)
            instruments.after_step(live, t)


@dataclass
class _Call:
    """One `generate` call's prompts as the decoder takes them: each distinct prompt once, left-padded."""

    ids: torch.Tensor  # (D, P) the distinct prompts
    mask: torch.Tensor  # (D, P) bool
    which: list[int]  # (prompts,) the distinct prompt of each prompt
    row_src: torch.Tensor  # (N,) the distinct prompt of each row, n rows per prompt
    n: int
    sampling: SamplingParams

    @classmethod
    def of(cls, prompts: list[list[int]], n: int, sampling: SamplingParams, pad: int, device) -> _Call:
        index_of: dict[tuple[int, ...], int] = {}
        which = [index_of.setdefault(tuple(p), len(index_of)) for p in prompts]
        ids, mask = pad_rows(list(index_of), "left", pad)
        row_src = torch.tensor(which, dtype=torch.long, device=device).repeat_interleave(n)
        return cls(ids.to(device), mask.to(device), which, row_src, n, sampling)

    @property
    def rows(self) -> int:
        return self.row_src.shape[0]

    @property
    def prompts(self) -> int:
        return len(self.which)

    @property
    def distinct(self) -> int:
        return self.ids.shape[0]

    @property
    def max_new(self) -> int:
        return max(0, self.sampling.max_new_tokens)


@dataclass
class _Decoded:
    """What the decode loop has written: one column per step, pad and log-prob 0 after a row's end token."""

    completion: torch.Tensor  # (N, max_new) long
    logprobs: torch.Tensor  # (N, max_new) float32
    completion_mask: torch.Tensor  # (N, max_new) bool
    finished: torch.Tensor  # (N,) bool: the row has written an end token
    pad: int
    steps: int = 0

    @classmethod
    def empty(cls, rows: int, max_new: int, pad: int, device) -> _Decoded:
        return cls(torch.full((rows, max_new), pad, dtype=torch.long, device=device),
                   torch.zeros(rows, max_new, dtype=torch.float32, device=device),
                   torch.zeros(rows, max_new, dtype=torch.bool, device=device),
                   torch.zeros(rows, dtype=torch.bool, device=device), pad)

    def record(self, t: int, tokens: torch.Tensor, token_logprobs: torch.Tensor, eos: torch.Tensor) -> bool:
        """Write step `t`'s tokens of the rows not yet finished; True when decoding is over (the last step, or
        every row finished)."""
        active = ~self.finished
        self.completion[:, t] = torch.where(active, tokens, self.pad)
        self.logprobs[:, t] = torch.where(active, token_logprobs, 0.0)
        self.completion_mask[:, t] = active
        self.finished |= active & torch.isin(tokens, eos)
        self.steps = t + 1
        return self.steps == self.completion.shape[1] or bool(self.finished.all())
