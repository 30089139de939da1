"""The producing half of a step: prompts, rollouts, rewards, advantages and routing, ending in a Batch
(unigrad/train/__init__.py lists its modules)."""
