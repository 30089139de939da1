"""Mismatch KL against the engine's noise scale: rollout.logit_noise (any model) and rollout.router_noise (MoE).

For each sigma, the float32 engine samples G completions of arithmetic and countdown prompts with the noise on; the
learner (the same weights, float32, no noise) rescores them, and `mismatch_metrics` gives the k3 KL. On the MoE model
router noise is measured with and without rollout routing replay, with the routing agreement.

    python benchmarks/mismatch_noise.py --model unigrad-tiny --kind logit
    python benchmarks/mismatch_noise.py --model unigrad-tiny-moe --kind router
"""

from __future__ import annotations

import argparse

import torch

from unigrad.diagnostics.mismatch import mismatch_metrics
from unigrad.diagnostics.routing import routing_agreement
from unigrad.models.loading import load_model_and_tokenizer
from unigrad.rollout.base import SamplingParams
from unigrad.rollout.engine_instruments import EngineInstruments
from unigrad.rollout.logprobs import ScoringOptions, TokenSequences, score_sequences
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.tasks import get_task
from unigrad.train.learning.batching import encode_prompt


def measure(model, tok, prompts, kind: str, sigma: float, seed: int) -> dict[str, float]:
    settings = EngineInstruments(logit_noise=sigma) if kind == "logit" else EngineInstruments(router_noise=sigma)
    engine = TransformersEngine(model, tok.pad_token_id, tok.eos_token_id, instruments=settings)
    ro = engine.generate(prompts, 8, SamplingParams(temperature=1.0, max_new_tokens=32, seed=seed))
    seqs = TokenSequences(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    with torch.no_grad():
        own = score_sequences(model, seqs, ScoringOptions(record_routing=ro.routing is not None))
    out = {"kl_k3": mismatch_metrics(own.logprobs, ro.infer_logprobs, ro.completion_mask)["mismatch/kl_k3"]}
    if ro.routing is not None:
        with torch.no_grad():
            replayed = score_sequences(model, TokenSequences(ro.prompt_ids, ro.prompt_mask, ro.completion_ids,
                                                             ro.completion_mask, routing=ro.routing)).logprobs
        out["kl_k3_replay"] = mismatch_metrics(replayed, ro.infer_logprobs, ro.completion_mask)["mismatch/kl_k3"]
        real = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
        out["agreement"] = routing_agreement(ro.routing, own.routing, real)[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unigrad-tiny")
    parser.add_argument("--kind", choices=("logit", "router"), default="logit")
    parser.add_argument("--sigmas", default="0,0.1,0.3,1,3")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    prompts = []
    for name in ("arithmetic", "countdown"):
        task = get_task(name)
        prompts += [encode_prompt(tok, ex.prompt) for ex in task.examples("test", args.prompts // 2, seed=args.seed)]
    print(f"| {args.kind} noise sigma | mismatch kl_k3 | kl_k3 with replay | routing agreement |")
    print("|---|---|---|---|")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        m = measure(model, tok, prompts, args.kind, sigma, args.seed)
        print(f"| {sigma:g} | {m['kl_k3']:.3g} | {m.get('kl_k3_replay', float('nan')):.3g} | "
              f"{m.get('agreement', float('nan')):.3f} |", flush=True)


if __name__ == "__main__":
    main()
