"""Peak memory of the learner's log-prob pass: unigrad's chunked `sequence_logprobs` against the naive computation.

Naive: the model's full (B, T, V) logits, a full log_softmax, then the sampled tokens' entries, as most RL code
does. unigrad: logits only for completion positions, a bounded chunk at a time, log-prob = logit - logsumexp, and
the chunk's logits recomputed in the backward pass. Both run forward and backward (the learner needs gradients)
on 4 x 2,048 tokens (64 prompt + 1,984 completion tokens a row) of a one-layer Llama (hidden 64) whose vocabulary
is 32k or 152k (Qwen2's). Each measurement runs in a fresh subprocess; its peak is the growth of the process's
maximum resident set over what the model and inputs already hold.

    python benchmarks/logprob_memory.py [--vocab 32000 152064] [--rows 4] [--tokens 2048]

The naive pass at 152k needs about 5 GB per (B, T, V) float32 tensor and holds several; it is skipped, with its
estimate printed, when that estimate exceeds 70% of the machine's memory. Last line:
`logprob_peak_ratio=<naive peak / unigrad peak at the largest vocabulary both ran>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = 64


def measure(method: str, vocab: int, rows: int, tokens: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unigrad.rollout.logprobs import sequence_logprobs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=tokens,
                         pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (rows, PROMPT), generator=gen)
    completion = torch.randint(1, vocab, (rows, tokens - PROMPT), generator=gen)
    prompt_mask, completion_mask = torch.ones_like(prompt, dtype=torch.bool), torch.ones_like(completion,
                                                                                              dtype=torch.bool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "unigrad":
        logp = sequence_logprobs(model, prompt, prompt_mask, completion, completion_mask)
    else:
        ids = torch.cat([prompt, completion], 1)
        logits = model(input_ids=ids).logits[:, PROMPT - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    logp.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
    return {"peak_mb": (peak - base) / 1024, "seconds": seconds, "logp_sum": float(logp.sum()), "grad_abs": grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.rows, args.tokens)))
        return
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    print(f"{args.rows} x {args.tokens} tokens ({PROMPT} prompt), one-layer Llama hidden 64, forward + backward; "
          f"machine memory {total_mb / 1024:.0f} GB")
    ratio = None
    for vocab in args.vocab:
        full_mb = args.rows * args.tokens * vocab * 4 / 2**20  # one (B, T, V) float32 tensor
        results = {}
        for method in ("unigrad", "naive"):
            if method == "naive" and 4 * full_mb > 0.7 * total_mb:
                print(f"  V={vocab:>6}  naive    skipped: needs about {4 * full_mb / 1024:.1f} GB "
                      f"(4 x {full_mb / 1024:.1f} GB logits-sized tensors)")
                continue
            out = subprocess.run([sys.executable, __file__, "--child", method, str(vocab), "--rows", str(args.rows),
                                  "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[method]
            print(f"  V={vocab:>6}  {method:<8} peak +{r['peak_mb']:8.0f} MB   {r['seconds']:6.2f} s   "
                  f"(one (B,T,V) float32 tensor: {full_mb:.0f} MB)")
        if len(results) == 2:
            a, b = results["unigrad"], results["naive"]
            same = abs(a["logp_sum"] - b["logp_sum"]) <= 1e-4 * abs(b["logp_sum"])
            print(f"  V={vocab:>6}  naive / unigrad peak: {b['peak_mb'] / a['peak_mb']:.1f}x; "
                  f"same log-probs: {same}; grad |sum| {a['grad_abs']:.4g} vs {b['grad_abs']:.4g}")
            ratio = b["peak_mb"] / a["peak_mb"]
    print(f"logprob_peak_ratio={ratio:.2f}" if ratio is not None else "logprob_peak_ratio=nan")


if __name__ == "__main__":
    main()
