"""Multi-turn tasks: environments that answer each assistant turn (base.py: the protocol), built on the single-turn
tasks and the tools. Importing this package registers the built-in ones into the task catalogue (builtin.py)."""

from unigrad.environments import builtin  # noqa: F401  (registers the built-in multi-turn tasks)
