"""Decoding for Llama-family models with a preallocated KV cache, in plain torch ops on the model's own weights.

On small models most of a transformers decode step is Python overhead: cache objects, mask builders, module hooks.
The arithmetic is a few small matmuls. This decoder computes the same layers with a handful of tensor operations a
layer, and writes keys and values into one preallocated tensor per layer. It reads the weights of the
`LlamaForCausalLM`-style module it is given, and holds no copy of its own except the fused q/k/v and gate/up matrices,
which it rebuilds at the start of every `generate` call, so it always follows the learner's latest weights.

It reproduces transformers' numerics step by step: RMSNorm in float32 and then cast back, rotary tables from the
model's own rotary module, softmax attention scaled by head_dim^-0.5, SiLU-gated MLP. So in float32 its logits
match the transformers forward to rounding error, and in bfloat16 it makes the same kind of error a bfloat16 engine
makes. Models it cannot reproduce exactly are left to the transformers path: `unsupported_reason` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Architectures whose decoder layer is: x += o(attn(rope(q), rope(k), v)) on rms(x); x += down(silu(gate) * up) on
# rms(x). Qwen2 adds biases to q/k/v, which the fused projection keeps.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class CacheAccess:
    """Where one forward pass of the decoder writes and reads the key/value cache."""

    write: slice  # cache positions the new keys and values go to
    read: int  # queries attend to cache positions [0, read)
    attn_mask: torch.Tensor  # (B, 1, T, read) bool: which of those positions each query sees
    kv_rows: torch.Tensor | None = None  # prefill: the prompt of each cache row (None: row i is input row i)


def unsupported_reason(model: nn.Module) -> str | None:
    """None if `StaticCacheDecoder` reproduces `model` exactly, else a short reason why it cannot."""
    if callable(getattr(model, "get_base_model", None)):
        return "a peft model (its adapters need their own forward)"
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (only silu)"
    if (getattr(config, "pretraining_tp", 1) or 1) > 1:
        return "pretraining_tp > 1"
    if getattr(config, "sliding_window", None) and (model_type != "qwen2" or getattr(config, "use_sliding_window",
                                                                                     False)):
        return "sliding-window attention"
    for attr in ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"{attr} is set"
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if decoder is None or type(head) is not nn.Linear or head.bias is not None:
        return "no plain lm_head"
    rotary = getattr(decoder, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if rotary is None or rope_type is None or "dynamic" in rope_type or "longrope" in rope_type:
        return f"rotary embedding {rope_type!r} (its tables change with the sequence length)"
    for layer in getattr(decoder, "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not nn.Linear for m in linears):  # e.g. peft's LoRA layers, quantised linears, MoE blocks
            return "a layer's projections are not plain nn.Linear (adapters, quantisation or experts)"
        if mlp.gate_proj.bias is not None or mlp.down_proj.bias is not None or attn.o_proj.bias is not None:
            return "biased MLP or output projection"
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            return "q/k normalisation"
    return None


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:  # one fused op, the same arithmetic
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StaticCacheDecoder:
    """Prefill distinct prompts once, then decode `rows` sequences one token at a time into a fixed-size cache.

    Use: `logits = prefill(ids, mask, row_src, max_new)` gives each row's next-token logits (rows, V); then
    `logits = step(tokens, t)` feeds the t-th generated token of every row (t = 0, 1, ...) and gives the next.
    `keep_rows(keep)` drops finished rows, after which `step` takes and returns only the kept rows.
    """

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"StaticCacheDecoder cannot run this model: {reason}")
        self.model = model
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.layers = list(model.model.layers)
        self._fuse_weights()

    def _fuse_weights(self) -> None:
        """q/k/v and gate/up as one matrix each, from the current weights (cheap: one copy of those weights)."""
        self.qkv, self.gate_up = [], []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            bias = None
            if a.q_proj.bias is not None:
                bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.qkv.append((weight, bias))
            self.gate_up.append(torch.cat([m.gate_proj.weight, m.up_proj.weight]))

    # -------------------------------------------------------------------------------------------------- layers

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheAccess) -> torch.Tensor:
        """Run every layer on x (B, T, hidden); keys/values go to cache positions `cache.write` (of rows
        `cache.kv_rows` or all), queries attend to cache positions [0, cache.read) under `cache.attn_mask`."""
        write, read, attn_mask, kv_rows = cache.write, cache.read, cache.attn_mask, cache.kv_rows
        b, t, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm)
            qk, v = F.linear(h, *self.qkv[i]).split([q_size + kv_size, kv_size], dim=-1)
            qk = _rotate(qk.view(b, t, self.num_heads + self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # one rotation for queries and keys
            v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if kv_rows is None:
                self.keys[i][:, :, write], self.values[i][:, :, write] = k, v
                keys, values = self.keys[i][:, :, :read], self.values[i][:, :, :read]
            else:  # prefill: attend among the distinct prompts, store each prompt's keys for all its rows
                self.keys[i][:, :, write], self.values[i][:, :, write] = k[kv_rows], v[kv_rows]
                keys, values = k, v
            if self.num_kv_heads != self.num_heads:
                rep = self.num_heads // self.num_kv_heads
                keys = keys.repeat_interleave(rep, dim=1)
                values = values.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, q_size))
            h = _rms_norm(x, layer.post_attention_layernorm)
            gate, up = F.linear(h, self.gate_up[i]).chunk(2, dim=-1)
            x = x + mlp.down_proj(F.silu(gate) * up)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(_rms_norm(x, self.model.model.norm))

    # -------------------------------------------------------------------------------------------------- public

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, row_src: torch.Tensor, max_new: int) -> torch.Tensor:
        """ids/mask (P, Lp) left-padded distinct prompts; row_src (rows,) the prompt of each row. Returns (rows, V)."""
        self._fuse_weights()
        p, prompt_len = ids.shape
        rows, dev = row_src.shape[0], ids.device
        embed = self.model.model.embed_tokens
        dtype = embed.weight.dtype
        total = prompt_len + max_new
        shape = (rows, self.num_kv_heads, total, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        # Rotary tables for every position a row can reach, from the model's own rotary module.
        positions = torch.arange(total, device=dev).unsqueeze(0)
        cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=dtype, device=dev), positions)
        self.cos, self.sin = cos[0], sin[0]  # (total, head_dim)
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # positions count real tokens only (left padding -> 0)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(prompt_len, dtype=torch.bool, device=dev)  # padding queries see themselves: no empty rows
        attn_mask = (causal & mask[:, None, None, :]) | eye
        x = self._forward(embed(ids), self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1),
                          CacheAccess(slice(0, prompt_len), prompt_len, attn_mask, kv_rows=row_src))
        self.prompt_len = prompt_len
        self.key_mask = torch.ones(rows, total, dtype=torch.bool, device=dev)
        self.key_mask[:, :prompt_len] = mask[row_src]
        self.next_position = mask.sum(-1)[row_src]  # (rows,) position of the first generated token
        return self._logits(x[:, -1])[row_src]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop every row not in `keep` (indices into the current rows) from the cache, e.g. finished rows."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.key_mask, self.next_position = self.key_mask[keep], self.next_position[keep]

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed generated token t of every row (rows,); returns the next-token logits (rows, V)."""
        at = self.prompt_len + t
        pos = self.next_position + t
        x = self.model.model.embed_tokens(tokens).unsqueeze(1)  # (rows, 1, hidden)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]
        attn_mask = self.key_mask[:, None, None, : at + 1]
        x = self._forward(x, cos, sin, CacheAccess(slice(at, at + 1), at + 1, attn_mask))
        return self._logits(x[:, 0])
