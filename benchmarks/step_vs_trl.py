"""One GRPO step of unigrad against one of TRL's GRPOTrainer, interleaved in one process.

Setup (issue 6): a 1.06 M-parameter char-level Llama (hidden 128, 4 layers, 4 heads, tied embeddings;
random weights, so every completion runs to the token budget in both), 2 arithmetic prompts x 8 samples
x 16 new tokens per step, temperature 1, no top-k/top-p, GRPO loss (sequence mean of token means),
beta 0, one iteration, AdamW lr 1e-6, grad clip 1.0, float32 on the CPU. Both load the same saved
model and tokenizer; both score with the same arithmetic verifier.

Interleaving: TRL's trainer runs its loop; a callback times each TRL step (on_step_begin ->
on_step_end) and then runs one unigrad step, timed on its own. Machine drift hits both alike.

    python benchmarks/step_vs_trl.py [--steps 30] [--threads N]

Prints median step times, their ratio, unigrad's phase split, the learner phase against a bare transformers
forward + backward over the same step's tensors (full logits, flat [prompt; completion], timed after each unigrad
step), completion tokens per second and the process's peak RSS; last,
`step_ratio_vs_trl=<unigrad median / TRL median>`. TRL is an optional benchmark dependency
(`pip install -e ".[test]"` brings it).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS_PER_STEP, G, NEW_TOKENS, LR = 2, 8, 16, 1e-6


def build_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from unigrad.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(model_max_length=256)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def unigrad_context(path: Path):
    from unigrad.config import load_config
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import get_tasks
    from unigrad.train.run import build_step_context

    cfg = load_config(None, [f"model.name={path}", "tasks=[arithmetic]", "objective=grpo",
                             f"prompts_per_step={PROMPTS_PER_STEP}", f"rollout.num_generations={G}",
                             f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.temperature=1.0",
                             f"micro_batch_size={PROMPTS_PER_STEP * G}", f"optim.lr={LR}", "optim.max_grad_norm=1.0"])
    model, tok = load_model_and_tokenizer(str(path))
    ctx, _, _ = build_step_context(cfg, model, tok, get_tasks("arithmetic"))
    return ctx


def trl_trainer(path: Path, steps: int, out: Path, callback):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from unigrad.tasks import get_task
    from unigrad.tasks.base import Example

    task = get_task("arithmetic")
    examples = task.examples("train", 512, seed=0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": e.prompt}], "answer": e.answer}
                              for e in examples])

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return task.verify(texts, [Example(prompt="", answer=a, demonstration=a, task="arithmetic") for a in answer])

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_STEP * G, num_generations=G,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, beta=0.0,
        loss_type="grpo", num_iterations=1, gradient_accumulation_steps=1, max_steps=steps, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.99, logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, disable_dropout=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    return GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                       callbacks=[callback])


def bare_forward_backward(model, ro, temperature: float) -> float:
    """Seconds for one plain transformers forward over [prompt; completion] (full logits), the sampled tokens'
    log-probs summed, and backward: the floor the learner phase is compared with. Leaves no gradient behind."""
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    mask = torch.cat([ro.prompt_mask, ro.completion_mask], 1).long()
    t0 = time.perf_counter()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    plen = ro.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, plen - 1 : -1].float() / temperature, -1)
    (logp.gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1) * ro.completion_mask).sum().backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    from transformers import TrainerCallback

    from unigrad.train.step import train_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = 3
    tmp = Path(tempfile.mkdtemp(prefix="unigrad-bench-"))
    build_model(tmp / "model")
    ctx = unigrad_context(tmp / "model")
    captured = {}  # the rollout of unigrad's latest step, for the bare forward/backward on the same tensors
    generate = ctx.engine.generate

    def capture(*a, **k):
        captured["rollout"] = generate(*a, **k)
        return captured["rollout"]

    ctx.engine.generate = capture
    times: dict[str, list[float]] = {"trl": [], "unigrad": []}
    phases: dict[str, list[float]] = {}
    tokens: list[float] = []

    class Interleave(TrainerCallback):
        step = 0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            elapsed = time.perf_counter() - self.t0
            self.step += 1
            t0 = time.perf_counter()
            metrics, _ = train_step(ctx, self.step)
            mine = time.perf_counter() - t0
            bare = bare_forward_backward(ctx.learner.model, captured["rollout"], ctx.sampling.temperature)
            if self.step > warmup:
                times.setdefault("bare", []).append(bare)
                times["trl"].append(elapsed)
                times["unigrad"].append(mine)
                tokens.append(metrics["response_length/mean"] * PROMPTS_PER_STEP * G)
                for key in ("rollout", "reward", "learner", "optimizer", "weight_sync"):
                    phases.setdefault(key, []).append(metrics[f"time/{key}"])
                phases.setdefault("other (metrics, diagnostics)", []).append(
                    mine - sum(metrics[f"time/{k}"] for k in ("rollout", "reward", "learner", "optimizer",
                                                             "weight_sync")))

    trainer = trl_trainer(tmp / "model", args.steps + warmup, tmp / "trl", Interleave())
    trainer.train()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: 1.06 M-parameter char Llama (random weights); {PROMPTS_PER_STEP} prompts x {G} samples x "
          f"{NEW_TOKENS} new tokens; torch threads {torch.get_num_threads()}; {len(times['trl'])} timed steps each")
    print(f"TRL GRPOTrainer step median {med['trl']:.3f} s")
    print(f"unigrad step median        {med['unigrad']:.3f} s")
    split = ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in phases.items())
    print(f"unigrad split (medians, s): {split}")
    learner = statistics.median(phases["learner"])
    print(f"learner phase / bare transformers forward+backward on the same tensors: {learner:.3f} / "
          f"{med['bare']:.3f} s = {learner / med['bare']:.2f}")
    print(f"unigrad completion tokens/s: {statistics.median(tokens) / med['unigrad']:.0f}; "
          f"TRL: {PROMPTS_PER_STEP * G * NEW_TOKENS / med['trl']:.0f} (at the full budget)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process (both together): {peak:.0f} MB")
    print(f"step_ratio_vs_trl={med['unigrad'] / med['trl']:.3f}")


if __name__ == "__main__":
    main()
