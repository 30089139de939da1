"""Whether a configuration can run here: every refusal that needs more than the config's own keys, in one place.

Two homes for refusals, and only two:

- `unigrad.config`: what no run could do, whatever the machine: a key out of range, settings that contradict
  each other or that no run supports yet (the config's validators; they only refuse).
- this module: what cannot run *here*: with this many processes, with these tasks and their data, with what is
  installed, on this model path.

`unigrad train` calls `check_processes` before it starts any process; `unigrad.train.lifecycle.run.train` calls
`check_before_model_load` (which includes it) before the model loads and before anything is written. Every refusal
is a `ConfigError` that names the keys and the fix.
"""

from __future__ import annotations

from unigrad.agents.program import is_agent_task
from unigrad.config import ConfigError, TrainConfig, single_process_refusal
from unigrad.data.samplers import task_weight_list
from unigrad.environments.base import is_multi_turn
from unigrad.tasks.base import Task
from unigrad.train.lifecycle.distributed import check_prompts_split
from unigrad.train.producing.demonstrations import check_training_demonstrations
from unigrad.train.producing.routing import TrainingMode


def check_processes(cfg: TrainConfig, processes: int) -> None:
    """Refuse what does not run over `processes` data-parallel processes."""
    check_prompts_split(cfg.prompts_per_step, processes)
    if processes > 1 and (reason := single_process_refusal(cfg)) is not None:
        raise ConfigError(reason)


def check_installed(cfg: TrainConfig) -> None:
    """Refuse an engine that is not installed here, or a local model directory without a model in it."""
    if cfg.rollout.engine == "vllm":
        from unigrad.rollout.vllm_engine import vllm_unavailable_reason

        if (reason := vllm_unavailable_reason()) is not None:
            raise ConfigError(f"rollout.engine=vllm: {reason}")
    from unigrad.models.loading import ModelNotFoundError, local_model_dir

    try:  # a local directory without a model (an unfinished run's): refused before the run directory is made
        local_model_dir(cfg.model.name)
    except ModelNotFoundError as err:
        raise ConfigError(f"model.name: {err}") from None


def load_tasks_checked(cfg: TrainConfig) -> list[Task]:
    """The run's tasks, loaded (a file may hold several), then checked against the config (`check_tasks`)."""
    from unigrad.tasks import load_tasks

    try:  # an unknown task, a missing file or reward function stops the run here
        tasks = load_tasks(cfg.tasks, cfg.reward, cfg.tools)
    except (ValueError, OSError, ImportError, AttributeError) as err:
        raise ConfigError(f"tasks / reward: {err}") from err
    check_tasks(cfg, tasks)
    return tasks


def check_tasks(cfg: TrainConfig, tasks: list[Task]) -> None:
    """Refuse tasks the run cannot train: two of one name, multi-turn tasks with what episodes do not run with,
    data without the demonstrations or the split the run needs, task_weights naming no task."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be distinct, got {names}")
    check_episodes(cfg, tasks)
    check_task_data(cfg, tasks)
    task_weights(tasks, cfg.task_weights, cfg.sampler.name)


def check_episodes(cfg: TrainConfig, tasks: list[Task]) -> None:
    """Refuse what multi-turn episodes do not run with yet."""
    episodic = [t.name for t in tasks if is_multi_turn(t)]
    if not episodic:
        return
    named = ", ".join(episodic)
    if cfg.rollout.routing_replay:
        raise ConfigError(f"multi-turn tasks ({named}) carry no routing record across turns yet: set "
                          "rollout.routing_replay=false")
    if cfg.rollout.dynamic_sampling:
        raise ConfigError(f"multi-turn tasks ({named}) do not run with rollout.dynamic_sampling yet: set it to false")
    if TrainingMode.from_config(cfg).demonstrations != "none":
        raise ConfigError(f"multi-turn tasks ({named}) have no demonstrations: SFT, HPT and LUFFY-style guidance "
                          "need them; train them with an RL objective")


def check_task_data(cfg: TrainConfig, tasks: list[Task]) -> None:
    """Refuse, before the model loads, data a run would fail on later: training rows without the demonstration
    the objective needs, a task without the split the held-out evaluation draws from."""
    mode = TrainingMode.from_config(cfg).demonstrations
    why = {"all": "objective=sft", "failed": "HPT", "in_group": "LUFFY-style guidance"}.get(mode)
    try:
        if why is not None:
            check_training_demonstrations(tasks, why, cfg.train_pool_size, cfg.seed)
        if cfg.eval.before_after or cfg.eval.every:
            for task in tasks:
                task.examples(cfg.eval.split, 1, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def task_weights(tasks: list[Task], weights: dict[str, float], sampler: str = "uniform") -> list[float] | None:
    """Sampling weight per loaded task from the config's {name: weight} (default 1.0); ConfigError for a name
    that is no task of the run."""
    try:
        return task_weight_list(weights, [t.name for t in tasks], sampler)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_before_model_load(cfg: TrainConfig, processes: int) -> list[Task]:
    """Every check of this module, in the order a user meets them; returns the loaded tasks."""
    check_processes(cfg, processes)
    check_installed(cfg)
    tasks = load_tasks_checked(cfg)
    check_agents(cfg, tasks, processes)
    return tasks


def check_agents(cfg: TrainConfig, tasks: list[Task], processes: int = 1) -> None:
    """Refuse what agent tasks (agent:...) do not run with yet: other tasks beside them, several processes,
    asynchronous rollouts."""
    agents = [t.name for t in tasks if is_agent_task(t)]
    if not agents:
        return
    named = ", ".join(agents)
    others = [t.name for t in tasks if not is_agent_task(t)]
    if others:
        raise ConfigError(f"agent tasks ({named}) run only beside other agent tasks for now; train "
                          f"{', '.join(others)} in another run, or play them with an agent")
    if processes > 1:
        raise ConfigError(f"agent tasks ({named}) run in one process for now (the endpoint serves one engine): drop "
                          "--nproc")
    if cfg.rollout.max_staleness:
        raise ConfigError(f"agent tasks ({named}) do not run with asynchronous rollouts yet: set "
                          "rollout.max_staleness=0")
