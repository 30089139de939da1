"""unigrad: reinforcement-learning post-training of language models on verifiable rewards.

The package's layers, lowest first; a module imports only from its own layer or lower ones (inside functions too;
tests/test_import_layers.py checks it):

    objective, user_code, sandbox   the estimator's maths; loading a user's code; the code jail
    tools, data                     tool calls; the task samplers
    tasks                           single-turn tasks and their verifiers; the task catalogue (get_task)
    environments                    multi-turn tasks, built on tasks and tools; they register themselves into
                                    the task catalogue (environments/builtin.py), which cannot import them
    models                          model loading, the embedded tiny model, the learning-rate schedule
    rollout                         engines that sample, episodes, prompt encoding
    serve                           the OpenAI-compatible HTTP server over the rollout engines
    agents                          agent programs as tasks: their episodes through the server
    diagnostics                     measurements of a step (per-task gradients, mismatch, monitors)
    config                          the run configuration and the refusals that need no machine
    eval                            held-out evaluation of a model
    train, integrations             the trainer (train/feasibility.py: what cannot run here); adapters
    report, preset_table            pages and tables about runs and presets
    cli                             the command line

This package imports unigrad.environments, so that the built-in multi-turn tasks are in the task catalogue
whatever part of unigrad is imported first (the root is in no layer: it may import anything). For the same reason
it registers the held-out evaluations that end the embedded models' builds (unigrad.eval's, which the models
layer cannot import) into unigrad.models.build_evaluations; each imports unigrad.eval only when a build calls it,
so `import unigrad` stays fast.
"""

import unigrad.agents  # noqa: F401  (registers the "agent:" task spec into unigrad.tasks)
import unigrad.environments  # noqa: F401  (registers the built-in multi-turn tasks into unigrad.tasks)
from unigrad.models.build_evaluations import register_build_evaluation

__version__ = "0.1.0"


def _held_out(name: str):
    """unigrad.eval's build evaluation `name`, imported when a build calls it (importing unigrad.eval takes
    seconds: torch, transformers, the rollout engines)."""

    def evaluation(model, tokenizer, recipe):
        import unigrad.eval

        return getattr(unigrad.eval, name)(model, tokenizer, recipe)

    evaluation.__qualname__ = evaluation.__name__ = name
    return evaluation


# unigrad-tiny-moe is built from a TinyRecipe with experts, as unigrad-tiny (its report is unigrad-tiny's kind).
register_build_evaluation("unigrad-tiny", _held_out("tiny_heldout_accuracy"))
register_build_evaluation("unigrad-chat", _held_out("chat_heldout_report"))
