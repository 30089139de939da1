"""Agent programs as tasks (`agent:PATH.py:FUNCTION@TASK`): a user's `openai` client code plays the episodes through
the trainer's own endpoint, and the learner trains on exactly what it sampled (docs/agents.md).

program.py: the spec, the agent function, `AgentTask`; trajectory.py: calls to rows, token in, token out;
recorder.py: the endpoint's hook that records each episode's calls; training_service.py: the endpoint during a
rollout; runner.py: many agents at once, rows and rewards. Importing this package registers the "agent:" form into
the task catalogue (it imports neither the server nor `openai`; runner.py does, when episodes are played).
"""

from unigrad.agents.program import AGENT_PREFIX, AgentTask, is_agent_task, make_agent_task
from unigrad.tasks.registry import get_task, register_spec_kind


def _agent_task(spec: str, max_calls: int | None = None) -> AgentTask:
    return make_agent_task(spec, get_task, **({} if max_calls is None else {"max_calls": max_calls}))


register_spec_kind(AGENT_PREFIX.rstrip(":"), _agent_task)

__all__ = ["AgentTask", "is_agent_task", "make_agent_task"]
