"""A real training step on a random tiny char-level Llama, and a recorder of what it feeds the optimizer.

Shared by the step-level tests (per-task gradients, demonstrations): plain functions, imported by name."""

import torch
from model_helpers import char_token_ids, tiny_model
from transformers import LlamaForCausalLM

from unigrad.config import OptimSection, TrainConfig, validate_config
from unigrad.data.samplers import TaskSampler
from unigrad.diagnostics.task_gradients import TaskGradients
from unigrad.models.tokenizer import build_char_tokenizer
from unigrad.objective import resolve_objective
from unigrad.rollout.base import SamplingParams
from unigrad.rollout.transformers_engine import TransformersEngine
from unigrad.tasks import get_tasks
from unigrad.train.learning.batching import encode_prompt
from unigrad.train.learning.learner import Learner
from unigrad.train.producing.routing import TrainingMode
from unigrad.train.step import StepContext

TASKS = ("arithmetic", "countdown", "table_qa")
POOL = 20  # training examples per task
SAMPLER_SEED = 1


def small_char_llama(tok, seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    """A random 2-layer Llama over the char tokenizer `tok`, weights drawn from `seed`; 2 heads of `hidden_size` / 2
    (16 by default, which vLLM's CPU attention refuses: its tests take hidden_size=64)."""
    return tiny_model(len(tok), seed=seed, hidden_size=hidden_size, max_position_embeddings=256,
                      tie_word_embeddings=True, **char_token_ids(tok))


def turn_ending_llama(tok, seed: int = 3) -> LlamaForCausalLM:
    """`small_char_llama` taught, in 60 Adam steps, to end an assistant turn after a few characters, also after an
    observation (a random model rarely writes its end-of-turn token, so its multi-turn episodes would all be cut
    after turn 1)."""
    model = small_char_llama(tok, seed)
    teach_turn_ending(model, tok)
    return model


def teach_texts(model, tok, texts: list[str], steps: int, lr: float = 1e-2):
    """Train `model` on `texts` (whole strings, special tokens written out) for `steps` passes, one Adam step per
    text: the way tests teach a small model a fixed reply. Returns the model in eval mode, gradients cleared."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = [torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]) for text in texts]
    for _ in range(steps):
        for ids in batch:
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def teach_turn_ending(model, tok, steps: int = 60) -> None:
    """Train `model` (char tokenizer `tok`) for `steps` Adam passes over three chats whose assistant turns end after
    a few characters, also after an observation."""
    was_training = model.training
    teach_texts(model, tok, ["<bos><|user|>q0<|assistant|>12<eos>", "<bos><|user|>q1<|assistant|>7<eos><|user|>"
                             "seen 1<|assistant|>abc<eos>", "<bos><|user|>x<|assistant|>4<eos><|user|>seen 2"
                             "<|assistant|>9<eos>"], steps)
    model.train(was_training)


# step_context's keyword names for settings, as the config keys they set.
SETTINGS = {"prompts_per_step": "prompts_per_step", "micro_batch_size": "micro_batch_size",
            "num_iterations": "num_iterations", "seed": "seed", "samples_per_step": "samples_per_step",
            "reward_timeout": "reward_timeout", "num_generations": "rollout.num_generations",
            "dynamic_sampling": "rollout.dynamic_sampling", "max_resample": "rollout.max_resample",
            "overlong_buffer": "rollout.overlong_buffer", "overlong_penalty": "rollout.overlong_penalty",
            "max_turns": "rollout.max_turns", "mini_batches": "optim.mini_batches",
            "sample_gradients": "diagnostics.sample_gradients", "grad_norm_cap": "monitors.grad_norm_cap"}


def step_config(objective, mode: TrainingMode | None = None, sampling: SamplingParams | None = None,
                **settings) -> TrainConfig:
    """The config of `step_context`'s step: 6 prompts x 4 rollouts of 6 tokens at temperature 1, micro-batches of
    3, `settings` under step_context's names (SETTINGS); `mode` as the objective that makes it (all: sft, failed:
    HPT with `objective` as its RL part)."""
    sampling = sampling or SamplingParams(temperature=1.0, max_new_tokens=6)
    data = {"prompts_per_step": 6, "micro_batch_size": 3, "seed": 0,
            "rollout": {"num_generations": 4, "temperature": sampling.temperature, "top_p": sampling.top_p,
                        "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens},
            "objective": objective if isinstance(objective, str) else "grpo"}
    if mode is not None and mode.demonstrations == "all":
        data["objective"] = "sft"
    if mode is not None and mode.demonstrations == "failed":
        data["objective"] = "hpt"
        data["hybrid"] = {"gamma": mode.hpt_gamma, "rl_coef": mode.rl_coef, "sft_coef": mode.sft_coef,
                          "rl_objective": objective if isinstance(objective, str) else "dr_grpo"}
    for name, value in settings.items():
        *sections, key = SETTINGS[name].split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    cfg = validate_config(data)
    assert mode is None or TrainingMode.from_config(cfg) == mode, (mode, TrainingMode.from_config(cfg))
    return cfg


def step_context(task_gradients: bool = False, seed: int = 0, objective="grpo", mode: TrainingMode | None = None,
                 sampling: SamplingParams | None = None, **fields) -> StepContext:
    """6 prompts x 4 rollouts of 6 tokens over three built-in tasks; `fields` override StepContext fields or, under
    the names of SETTINGS, the config's settings."""
    tok = build_char_tokenizer(model_max_length=256)
    model = small_char_llama(tok, seed)
    tasks = [t for spec in TASKS for t in get_tasks(spec)]
    pools = [t.examples("train", POOL, seed=k) for k, t in enumerate(tasks)]
    learner = Learner(model, OptimSection(lr=1e-3, schedule="constant"))
    settings = {name: fields.pop(name) for name in list(fields) if name in SETTINGS}
    return StepContext(**{
        "tokenizer": tok, "learner": learner, "engine": TransformersEngine(model, tok.pad_token_id, tok.eos_token_id),
        "tasks": tasks, "pools": pools, "pool_prompt_ids": [[encode_prompt(tok, e.prompt) for e in p] for p in pools],
        "sampler": TaskSampler([POOL] * len(tasks), seed=SAMPLER_SEED, names=[t.name for t in tasks]),
        "objective": resolve_objective(objective),
        "config": step_config(objective, mode, sampling, seed=seed, **settings),
        "task_gradients": TaskGradients(learner.params) if task_gradients else None, **fields})


def replayed_picks(ctx: StepContext) -> list[tuple[int, int]]:
    """The (task, example) pairs the step's sampler draws first, from a fresh sampler with the same seed."""
    return TaskSampler([POOL] * len(ctx.tasks), seed=SAMPLER_SEED).sample(ctx.prompts_per_step)


def length_rewards(ctx: StepContext) -> None:
    """Rewards on a random model are mostly 0; a reward that depends on the completion gives every group a
    spread, so advantages are non-zero."""
    for task in ctx.tasks:
        task.verify = lambda texts, examples: [float(len(t) % 3 == 0) for t in texts]


def observe(ctx: StepContext) -> dict:
    """Record the rollout, the engine calls and the gradient the optimizer sees (without changing either)."""
    seen = {"generate_calls": []}
    generate, clip_and_step = ctx.engine.generate, ctx.learner.clip_and_step

    def record_generate(prompts, n, sampling):
        seen["generate_calls"].append((len(prompts), n))
        seen["rollout"] = generate(prompts, n, sampling)
        return seen["rollout"]

    def record_step(*args):
        seen["grad"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in ctx.learner.params]).clone()
        return clip_and_step(*args)

    ctx.engine.generate, ctx.learner.clip_and_step = record_generate, record_step
    return seen


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
