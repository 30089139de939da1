"""Agent programs as tasks (`agent:PATH.py:FUNCTION@TASK`): a user's `openai` client code plays the episodes through
the trainer's own endpoint, and the learner trains on exactly what it sampled (docs/agents.md).

program.py: the spec, the agent function, `AgentTask`; trajectory.py: calls to rows, token in, token out;
recorder.py: the endpoint's hook that records each episode's calls; training_service.py: the endpoint during a
rollout; runner.py: many agents at once, rows and rewards; verifiers_env.py: environments written for the
`verifiers` library as agent tasks ("verifiers:PATH.py:FUNCTION"). Importing this package registers the "agent:" and
"verifiers:" forms into the task catalogue (it imports neither the server, `openai` nor `verifiers`; runner.py
does, when episodes are played, and verifiers_env.py when a verifiers task is made).
"""

from unigrad.agents.program import AGENT_PREFIX, AgentTask, is_agent_task, make_agent_task
from unigrad.tasks.registry import get_task, register_spec_kind


def _agent_task(spec: str, max_calls: int | None = None) -> AgentTask:
    return make_agent_task(spec, get_task, **({} if max_calls is None else {"max_calls": max_calls}))


def _verifiers_task(spec: str, max_calls: int | None = None) -> AgentTask:
    from unigrad.agents.verifiers_env import make_verifiers_task  # imports `verifiers` only when one is made

    return make_verifiers_task(spec, **({} if max_calls is None else {"max_calls": max_calls}))


register_spec_kind(AGENT_PREFIX.rstrip(":"), _agent_task)
register_spec_kind("verifiers", _verifiers_task)

__all__ = ["AgentTask", "is_agent_task", "make_agent_task"]
