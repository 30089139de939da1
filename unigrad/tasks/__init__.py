"""Tasks: prompts with reference answers and demonstrations, and a verifier (see base.py).

`get_task("arithmetic")`, `get_task("math:gsm8k.jsonl")`, `get_tasks("mine.jsonl")`;
`DEFAULT_MIXTURE` lists the built-in synthetic tasks the embedded tiny model is trained on.
"""

from unigrad.tasks.base import Example, Task
from unigrad.tasks.registry import DEFAULT_MIXTURE, get_task, get_tasks, list_tasks, load_tasks, task_listing

__all__ = ["Example", "Task", "get_task", "get_tasks", "list_tasks", "load_tasks", "task_listing", "DEFAULT_MIXTURE"]
