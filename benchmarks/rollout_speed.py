"""Time TransformersEngine.generate against transformers' own `model.generate` on the same batch.

2 prompts x 8 samples x 16 new tokens (no EOS, so every row makes exactly 16 tokens) on a ~1M-parameter Llama
(hidden 128, 4 layers, 4 heads, vocab 100, tied embeddings), plain sampling at temperature 1. Repeats are interleaved
(engine, generate, engine, ...) so drift in machine load hits both alike; medians are printed.

    python benchmarks/rollout_speed.py [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unigrad.rollout.base import SamplingParams
from unigrad.rollout.transformers_engine import TransformersEngine

PAD = 0


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=2,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 4, 6], [26, 43, 38, 32, 79, 5, 7, 9, 11]]
    n, new_tokens = 8, 16
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)

    engines = {
        "engine fp32": TransformersEngine(model, PAD, None),
        "engine bf16": TransformersEngine(model, PAD, None, dtype=torch.bfloat16),
    }
    width = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention_mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()

    def run_engine(engine: TransformersEngine) -> None:
        r = engine.generate(prompts, n, sampling)
        assert r.completion_ids.shape == (len(prompts) * n, new_tokens)

    def run_hf() -> None:
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=n,
                max_new_tokens=new_tokens,
                pad_token_id=PAD,
            )
        assert out.shape == (len(prompts) * n, width + new_tokens)

    runners = {name: (lambda e=e: run_engine(e)) for name, e in engines.items()}
    runners["transformers generate"] = run_hf
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(3):  # warm-up
        for fn in runners.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    print(
        f"model {n_params / 1e6:.2f}M params, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(prompts)} prompts x {n} samples x {new_tokens} new tokens, {args.repeats} interleaved repeats"
    )
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, med in medians.items():
        print(f"  {name:<22} median {med * 1e3:7.1f} ms   (min {min(times[name]) * 1e3:6.1f} ms)")
    hf = medians["transformers generate"]
    for name in engines:
        print(f"  ratio {name} / transformers generate: {medians[name] / hf:.2f}")


if __name__ == "__main__":
    main()
