"""A run's life around its steps: build from the config, check it can run here, processes, checkpoints, logs, the run
lock (unigrad/train/__init__.py lists its modules)."""
