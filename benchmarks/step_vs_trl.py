"""One GRPO step of unigrad against one of TRL's GRPOTrainer, interleaved in one process.

Setup (`--shape tiny`, the default): a 1.06 M-parameter char-level Llama (hidden 128, 4 layers, 4 heads,
tied embeddings; random weights, so every completion runs to the token budget in both), 2 arithmetic prompts x 8
samples x 16 new tokens per step, temperature 1, no top-k/top-p, GRPO loss (sequence mean of token means),
beta 0, one iteration, AdamW lr 1e-6, grad clip 1.0, float32 on the CPU. Both load the same saved
model and tokenizer; both score with the same arithmetic verifier.

`--shape qwen2-0.5b --device cuda` (benchmarks/gpu/check.sh): the same on a GPU with Qwen2.5-0.5B's shape (hidden
896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings: 494 M parameters),
random weights from a config (no hub), 8 prompts x 8 samples x 256 new tokens, micro-batches of 16 rows (TRL:
per-device batch 16, 4 accumulation steps, one generation of 64 rows per optimizer step; unigrad:
micro_batch_size=16), float32 in both. The char tokenizer's 102 tokens are padded with 151,834 filler tokens to the
model's vocabulary, so the lm_head and the log-softmax cost what they cost in Qwen2.5-0.5B; a random model samples
mostly fillers (decoded as `<|fNNN|>`), and with EOS one token in 151,936 nearly every completion runs to 256 tokens
in both.

Interleaving: TRL's trainer runs its loop; a callback times each TRL step (on_step_begin -> on_step_end) and then
runs one unigrad step, timed on its own. Machine drift hits both alike. On CUDA every timer synchronises first.

    python benchmarks/step_vs_trl.py [--steps 30] [--threads N]
    python benchmarks/step_vs_trl.py --shape qwen2-0.5b --device cuda [--steps 5] [--json out.json]
    python benchmarks/step_vs_trl.py --shape qwen2-0.5b --dry-run     # settings, parameter count; no model built

Prints median step times, their ratio, unigrad's phase split, the learner phase against a bare transformers
forward + backward over the same step's tensors (full logits, flat [prompt; completion], per micro-batch, timed
after each unigrad step), completion tokens per second and the process's peak RSS (and peak GPU memory); last,
`step_ratio_vs_trl=<unigrad median / TRL median>`. TRL is an optional benchmark dependency
(`pip install -e ".[test]"` brings it).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LR = 1e-6


@dataclass(frozen=True)
class Shape:
    """A model shape: the architecture's config fields; vocab_size None = the char tokenizer's own 102 tokens."""

    arch: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None
    max_position_embeddings: int
    # per-step defaults for this shape: prompts, samples, new tokens, rows per micro-batch, timed and warm-up steps
    prompts: int
    samples: int
    new_tokens: int
    micro_batch: int
    steps: int
    warmup: int


SHAPES = {
    "tiny": Shape("llama", 128, 512, 4, 4, 4, None, 256, prompts=2, samples=8, new_tokens=16, micro_batch=16,
                  steps=30, warmup=3),
    # Qwen2.5-0.5B's config (vocabulary included); max_position_embeddings only needs to cover prompt + 256 tokens.
    "qwen2-0.5b": Shape("qwen2", 896, 4864, 24, 14, 2, 151_936, 1024, prompts=8, samples=8, new_tokens=256,
                        micro_batch=16, steps=5, warmup=1),
    # The qwen2-0.5b path (filler vocabulary, GQA, micro-batches) at a size a CPU runs in seconds: a smoke test.
    "qwen2-smoke": Shape("qwen2", 64, 128, 2, 4, 2, 151_936, 256, prompts=2, samples=4, new_tokens=8,
                         micro_batch=4, steps=2, warmup=1),
}


@dataclass(frozen=True)
class Settings:
    shape: str
    device: str
    prompts: int
    samples: int
    new_tokens: int
    micro_batch: int

    @property
    def rows(self) -> int:
        return self.prompts * self.samples


def build_tokenizer(vocab_size: int | None):
    """The char tokenizer (unigrad.models.tokenizer); with `vocab_size`, its vocabulary padded with filler tokens
    to that size (same ids for the 102 real tokens, fillers after them)."""
    from unigrad.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(model_max_length=2048)
    if vocab_size is None or vocab_size == len(tok):
        return tok
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from unigrad.models import tokenizer as chars

    vocab = {t: i for i, t in enumerate(chars.VOCAB)}
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the char tokenizer's {len(vocab)} tokens")
    vocab.update({f"<|f{i}|>": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=chars.UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # fillers are never produced by encoding
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (*chars.SPECIAL_TOKENS, chars.UNK)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=chars.BOS, eos_token=chars.EOS, pad_token=chars.PAD,
        unk_token=chars.UNK, additional_special_tokens=[chars.USER, chars.ASSISTANT],
        chat_template=chars.CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=2048,
        padding_side="left")


def model_config(shape: Shape, tok):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape.arch]
    return cls(vocab_size=shape.vocab_size or len(tok), hidden_size=shape.hidden_size,
               intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
               num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
               max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=True,
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def count_parameters(cfg) -> int:
    """Parameters of the causal LM `cfg` describes, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # tied embeddings are counted once


def build_model(path: Path, shape: Shape, device: str) -> int:
    """Random weights of `shape` (seed 0, initialised on `device`), saved with the tokenizer; returns the number
    of parameters."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(shape.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, tok), dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def unigrad_context(path: Path, s: Settings):
    from unigrad.config import load_config
    from unigrad.models.loading import load_model_and_tokenizer
    from unigrad.tasks import get_tasks
    from unigrad.train.lifecycle.build import build_step_context

    cfg = load_config(None, [f"model.name={path}", "tasks=[arithmetic]", "objective=grpo",
                             f"prompts_per_step={s.prompts}", f"rollout.num_generations={s.samples}",
                             f"rollout.max_new_tokens={s.new_tokens}", "rollout.temperature=1.0",
                             f"micro_batch_size={s.micro_batch}", f"optim.lr={LR}", "optim.max_grad_norm=1.0",
                             "optim.schedule=constant",
                             f"model.device={s.device}"])
    model, tok = load_model_and_tokenizer(str(path), device=s.device)
    ctx, _, _ = build_step_context(cfg, model, tok, get_tasks("arithmetic"))
    return ctx


def grpo_args(out: Path, steps: int, s: Settings):
    """TRL's GRPOConfig for the same step: one generation of prompts x samples rows per optimizer step, trained in
    micro-batches of `micro_batch` rows (gradient accumulation), so no old log-probs are computed (as in unigrad)."""
    from trl import GRPOConfig

    if s.rows % s.micro_batch:
        raise ValueError(f"micro_batch {s.micro_batch} must divide prompts x samples = {s.rows}")
    return GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=s.micro_batch, num_generations=s.samples,
        gradient_accumulation_steps=s.rows // s.micro_batch, max_completion_length=s.new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, beta=0.0, loss_type="grpo", num_iterations=1,
        max_steps=steps, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta2=0.99, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=s.device == "cpu",
        bf16=False, fp16=False, seed=0, disable_dropout=True, dataloader_num_workers=0,
    )


def trl_trainer(path: Path, steps: int, out: Path, callback, s: Settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from unigrad.tasks import get_task
    from unigrad.tasks.base import Example

    task = get_task("arithmetic")
    examples = task.examples("train", 512, seed=0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": e.prompt}], "answer": e.answer}
                              for e in examples])

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return task.verify(texts, [Example(prompt="", answer=a, demonstration=a, task="arithmetic") for a in answer])

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return GRPOTrainer(model=model, reward_funcs=reward, args=grpo_args(out, steps, s), train_dataset=data,
                       processing_class=tok, callbacks=[callback])


def bare_forward_backward(model, ro, temperature: float, micro_batch: int) -> float:
    """Seconds for plain transformers forwards over [prompt; completion] (full logits), the sampled tokens'
    log-probs summed, and backwards, one micro-batch of rows at a time: the floor the learner phase is compared
    with. Leaves no gradient behind."""
    device = next(model.parameters()).device
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1).to(device)
    mask = torch.cat([ro.prompt_mask, ro.completion_mask], 1).long().to(device)
    completion_ids, completion_mask = ro.completion_ids.to(device), ro.completion_mask.to(device)
    plen = ro.prompt_ids.shape[1]
    sync(device)
    t0 = time.perf_counter()
    for lo in range(0, ids.shape[0], micro_batch):
        rows = slice(lo, lo + micro_batch)
        logits = model(input_ids=ids[rows], attention_mask=mask[rows],
                       position_ids=(mask[rows].cumsum(-1) - 1).clamp_min(0)).logits
        logp = torch.log_softmax(logits[:, plen - 1 : -1].float() / temperature, -1)
        (logp.gather(-1, completion_ids[rows].unsqueeze(-1)).squeeze(-1) * completion_mask[rows]).sum().backward()
        del logits, logp
    sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def settings_from_args(args) -> tuple[Shape, Settings, int, int]:
    shape = SHAPES[args.shape]
    s = Settings(args.shape, args.device, args.prompts or shape.prompts, args.samples or shape.samples,
                 args.new_tokens or shape.new_tokens, args.micro_batch or shape.micro_batch)
    steps = args.steps or shape.steps
    warmup = shape.warmup if args.warmup is None else args.warmup
    return shape, s, steps, warmup


def dry_run(args) -> dict:
    """What the run would do, without building or loading a model: the settings, the parameter count (meta
    device) and TRL's config built from them (when TRL is installed), so a typo fails here and not on a GPU."""
    shape, s, steps, warmup = settings_from_args(args)
    tok = build_tokenizer(shape.vocab_size)
    out = {"dry_run": True, "settings": asdict(s), "shape": asdict(shape), "steps": steps, "warmup": warmup,
           "tokenizer_size": len(tok), "params": count_parameters(model_config(shape, tok))}
    try:
        import trl  # noqa: F401
    except ImportError:
        out["trl_config"] = "skipped: trl is not installed"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = grpo_args(Path(tmp), steps + warmup, s)
        out["trl_config"] = {"generation_batch_size": cfg.generation_batch_size,
                             "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> dict:
    from transformers import TrainerCallback

    from unigrad.train.step import train_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape and its step defaults")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both trainers)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps of each (0: the shape's default; tiny 30)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: tiny 3, qwen2-0.5b 1)")
    ap.add_argument("--prompts", type=int, default=0, help="prompts per step (0: the shape's default)")
    ap.add_argument("--samples", type=int, default=0, help="samples per prompt (0: the shape's default)")
    ap.add_argument("--new-tokens", type=int, default=0, help="max new tokens (0: the shape's default)")
    ap.add_argument("--micro-batch", type=int, default=0, help="rows per learner pass (0: the shape's default)")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="stop after the step pair that passes this many seconds since the start (0: no limit)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="print the settings and parameter count; build nothing")
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, s, steps, warmup = settings_from_args(args)
    if torch.device(s.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {s.device}: torch sees no CUDA device")
    tmp = Path(tempfile.mkdtemp(prefix="unigrad-bench-"))
    params = build_model(tmp / "model", shape, s.device)
    ctx = unigrad_context(tmp / "model", s)
    captured = {}  # the rollout of unigrad's latest step, for the bare forward/backward on the same tensors
    generate = ctx.engine.generate

    def capture(*a, **k):
        captured["rollout"] = generate(*a, **k)
        return captured["rollout"]

    ctx.engine.generate = capture
    times: dict[str, list[float]] = {"trl": [], "unigrad": [], "bare": []}
    phases: dict[str, list[float]] = {}
    tokens: list[float] = []

    class Interleave(TrainerCallback):
        step = 0

        def on_step_begin(self, *a, **k):
            sync(s.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **k):
            sync(s.device)
            elapsed = time.perf_counter() - self.t0
            self.step += 1
            t0 = time.perf_counter()
            metrics, _ = train_step(ctx, self.step)
            sync(s.device)
            mine = time.perf_counter() - t0
            bare = bare_forward_backward(ctx.learner.model, captured["rollout"], ctx.sampling.temperature,
                                         s.micro_batch)
            if self.step > warmup:
                times["bare"].append(bare)
                times["trl"].append(elapsed)
                times["unigrad"].append(mine)
                tokens.append(metrics["response_length/mean"] * s.rows)
                for key in ("rollout", "reward", "learner", "optimizer", "weight_sync"):
                    phases.setdefault(key, []).append(metrics[f"time/{key}"])
                phases.setdefault("other (metrics, diagnostics)", []).append(
                    mine - sum(metrics[f"time/{k}"] for k in ("rollout", "reward", "learner", "optimizer",
                                                             "weight_sync")))
            print(f"step {self.step}{' (warm-up)' if self.step <= warmup else ''}: TRL {elapsed:.3f} s, "
                  f"unigrad {mine:.3f} s, bare forward+backward {bare:.3f} s", flush=True)
            if args.max_seconds and self.step > warmup and time.perf_counter() - started > args.max_seconds:
                print(f"--max-seconds {args.max_seconds:g} reached: stopping after {self.step - warmup} timed steps")
                control.should_training_stop = True
            return control

    trainer = trl_trainer(tmp / "model", steps + warmup, tmp / "trl", Interleave(), s)
    trainer.train()
    if not times["trl"]:
        sys.exit("no timed step finished")

    med = {k: statistics.median(v) for k, v in times.items()}
    learner = statistics.median(phases["learner"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "shape": s.shape, "params": params, "device": s.device, "settings": asdict(s), "timed_steps": len(times["trl"]),
        "trl_step_s": med["trl"], "unigrad_step_s": med["unigrad"], "ratio": med["unigrad"] / med["trl"],
        "unigrad_phases_s": {k: statistics.median(v) for k, v in phases.items()},
        "bare_forward_backward_s": med["bare"], "unigrad_tokens_per_s": statistics.median(tokens) / med["unigrad"],
        "trl_tokens_per_s_at_budget": s.rows * s.new_tokens / med["trl"],
        "unigrad_response_length_mean": statistics.median(tokens) / s.rows,
        "times_s": times, "peak_rss_mb": peak, "torch_threads": torch.get_num_threads(),
    }
    print(f"model: {params / 1e6:.2f} M-parameter {shape.arch} ({s.shape}, random weights) on {s.device}; "
          f"{s.prompts} prompts x {s.samples} samples x {s.new_tokens} new tokens, micro-batches of {s.micro_batch} "
          f"rows; torch threads {torch.get_num_threads()}; {len(times['trl'])} timed steps each")
    if torch.device(s.device).type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"GPU: {result['gpu']}; peak memory allocated {result['peak_gpu_memory_gb']:.1f} GiB (both together)")
    print(f"TRL GRPOTrainer step median {med['trl']:.3f} s")
    print(f"unigrad step median        {med['unigrad']:.3f} s")
    split = ", ".join(f"{k} {v:.3f}" for k, v in result["unigrad_phases_s"].items())
    print(f"unigrad split (medians, s): {split}")
    print(f"learner phase / bare transformers forward+backward on the same tensors: {learner:.3f} / "
          f"{med['bare']:.3f} s = {learner / med['bare']:.2f}")
    print(f"unigrad completion tokens/s: {result['unigrad_tokens_per_s']:.0f}; "
          f"TRL: {result['trl_tokens_per_s_at_budget']:.0f} (at the full budget)")
    print(f"peak RSS of the process (both together): {peak:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"step_ratio_vs_trl={result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
