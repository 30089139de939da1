"""The config sections besides the rollout (rollout.py): model, optimiser and schedule, HPT's hybrid switch,
evaluation, the task sampler, the combination of task gradients, diagnostics, stability monitors, the code
sandbox; and the experiment trackers report_to may name."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from unigrad.config.base import _Section
from unigrad.objective.presets import PRESETS

TRACKERS = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # report_to's names -> module to import


def check_trackers_installed(names: list[str]) -> None:
    """Raise ValueError naming the first tracker of report_to that is unknown or not installed
    (unigrad.train.lifecycle.trackers opens them)."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose from {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"{name!r} is not installed (pip install {name})")



# The model a run trains when none is named: the char-level tiny model, or, when the run's episodes offer tools
# (a built-in tool task or `tools=`), the chat model whose pretraining saw tool calls (unigrad-tiny never calls
# a tool: docs/environments.md). Set by config.train_config.set_dependent_defaults.
DEFAULT_MODEL = "unigrad-tiny"
DEFAULT_TOOL_MODEL = "unigrad-chat"


class ModelSection(_Section):
    name: str = Field(DEFAULT_MODEL, description="'unigrad-tiny' (built locally; 'unigrad-tiny-moe' its mixture-of-"
                      "experts twin; 'unigrad-chat' a BPE chat model whose template renders tools, the default when "
                      "the tasks offer tools: a built-in tool task such as countdown_calc, or `tools=`), an HF "
                      "model id or a local path")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="learner dtype")
    lora_r: int = Field(0, ge=0, description="LoRA rank through peft; 0 trains all weights")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is alpha / r times B A)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$",
                        description="learner and rollout device: auto (cuda:LOCAL_RANK if CUDA is available, else "
                                    "cpu), cpu, cuda, cuda:N or mps")


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
        "factors are averaged; unigrad.train.learning.weight_average)")


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
