"""The trainer. Its modules, in the room (subpackage) of the run they belong to (read step.py first: one step, top to
bottom; then the room of the half you need):

    the step       step.py            one training step as named phases: produce, learn, sync, report
                   batch.py           the typed hand-off between the two halves (a Batch of loss components)

    producing/     produce.py         prompts -> rollouts -> rewards -> advantages -> routing -> Batch
                   drawn.py           what one draw makes (prompts, rows, rewards)
                   dynamic_sampling.py  DAPO's dynamic sampling: draw again until groups carry a contrast
                   routing.py         the training mode (SFT, HPT, LUFFY) as data: rows in, loss components out
                   demonstrations.py  demonstration rows: SFT batches, LUFFY's guidance rows
                   pipeline.py        asynchronous rollouts with bounded staleness

    learning/      learn.py           a Batch in, num_iterations x mini_batches optimizer steps out
                   learner.py         the trained model, its optimizer, the frozen reference, log-prob passes
                   plan.py            micro-batch plans (per task, per mini-batch, aligned over processes)
                   batching.py        token batches and padding
                   metrics.py         per-micro-batch loss metrics merged into one value per step
                   sharding.py        sharding=fsdp (torch FSDP2)
                   weight_average.py  the weights' moving average (optim.weight_ema_decay)
                   schedule.py        the learning-rate schedule (its home: unigrad.models.lr_schedule)

    lifecycle/     run.py             train(): prepare, loop over steps, evaluate, save final/
                   build.py           what a run is made of: pools, engine, gradient accounting, StepContext
                   interrupts.py      stopping early: RunStopped, RunInterrupted, SIGINT / SIGTERM
                   feasibility.py     whether a configuration can run here (processes, tasks, engines, model path)
                   distributed.py     data-parallel processes (torch.distributed)
                   device.py          model.device resolved to a torch device
                   checkpoint.py      atomic checkpoints, resume
                   logger.py          metrics.jsonl, samples.jsonl, TensorBoard
                   trackers.py        W&B, MLflow, trackio
                   run_lock.py        one run at a time per run directory
                   engine_selection.py  rollout.engine=auto applied to the run
"""
