"""TrainConfig: the whole run configuration, its sections and the checks that span them; and the defaults that
depend on other keys (`set_dependent_defaults`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from unigrad.config.base import _Section
from unigrad.config.refusals import asynchronous_rollouts_refusal
from unigrad.config.rollout import RolloutSection, dapo_defaults
from unigrad.config.sections import (
    DEFAULT_MODEL,
    DEFAULT_TOOL_MODEL,
    DiagnosticsSection,
    EvalSection,
    GradientsSection,
    HybridSection,
    ModelSection,
    MonitorSection,
    OptimSection,
    SamplerSection,
    SandboxSection,
    check_trackers_installed,
)
from unigrad.objective.presets import OBJECTIVE_FIELDS, PRESETS, ObjectiveError, resolve_objective

HYBRID_OBJECTIVES = ("hpt",)


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
    def _hybrid_keys_act(self) -> TrainConfig:
        """hybrid.* acts with objective=hpt (all four keys) and objective=sft (sft_coef, its only loss's weight); a key
        set to another value than its default for another objective would be ignored without a word, so it is refused
        (a saved config, which writes every key at its value, still loads)."""
        acting = set(HybridSection.model_fields) if self.is_hybrid else {"sft_coef"} if self.objective == "sft" \
            else set()
        fields = HybridSection.model_fields
        ignored = sorted(k for k in self.hybrid.model_fields_set - acting
                         if getattr(self.hybrid, k) != fields[k].get_default(call_default_factory=True))
        if ignored:
            keys = ", ".join(f"hybrid.{k}" for k in ignored)
            raise ValueError(f"{keys}: objective={self.objective!r} ignores {'it' if len(ignored) == 1 else 'them'} "
                             "(hybrid.gamma, rl_objective and rl_coef act with objective=hpt only, hybrid.sft_coef "
                             "with hpt and sft); drop the key or set objective=hpt")
        return self

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
    - rollout.overlong_buffer: a fifth of rollout.max_new_tokens (at least 1) with objective=dapo, else 0;
    - model.name: unigrad-chat when the episodes offer tools (a built-in tool task such as countdown_calc, or
      `tools=`), else unigrad-tiny: the tiny model never saw a tool call and never makes one.
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
        data["rollout"] = dapo_defaults(rollout, data.get("objective", "grpo") == "dapo")
    return _default_model(data, tasks)


def _default_model(data: dict[str, Any], tasks: Any) -> dict[str, Any]:
    """model.name, when not given: the tool-calling chat model for runs whose episodes offer tools."""
    from unigrad.tasks.registry import builtin_task_calls_tools

    model = data.get("model", {})
    if isinstance(model, ModelSection):
        model = model.model_dump(exclude_unset=True)
    if not isinstance(model, dict) or "name" in model:
        return data
    offers_tools = bool(data.get("tools")) or isinstance(tasks, list) and any(
        isinstance(spec, str) and builtin_task_calls_tools(spec) for spec in tasks)
    return {**data, "model": {**model, "name": DEFAULT_TOOL_MODEL if offers_tools else DEFAULT_MODEL}}
