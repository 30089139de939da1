"""The learning half of a step: a Batch in, optimizer steps out; the learner, its micro-batch plans and sharding
(unigrad/train/__init__.py lists its modules)."""
