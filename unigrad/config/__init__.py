"""The run configuration: one typed, validated object, from YAML plus dotted overrides.

    unigrad train examples/default.yaml objective=dapo rollout.temperature=0.8 max_steps=50

Unknown keys and out-of-range values are errors that name the key. The resolved config is
printed at the start of a run and saved as `config.yaml` in the run directory.

One module per concern (every name is importable from `unigrad.config`):

    base.py          ConfigError; what every section shares (unknown keys refused, no boolean for a number)
    rollout.py       RolloutSection: the rollout.* keys (engine, sampling, asynchronous rollouts, DAPO's options)
    sections.py      the other sections: model, optim, hybrid, eval, sampler, gradients, diagnostics, monitors,
                     sandbox; the trackers report_to may name
    train_config.py  TrainConfig (the whole configuration and its cross-section checks), set_dependent_defaults
    refusals.py      settings that cannot run together, decided once (also asked by unigrad.train.lifecycle.feasibility)
    yaml_io.py       load_config / load_run_config / validate_config / config_to_yaml / config_help
    resume.py        resume_config and the keys a resumed run may change
"""

from unigrad.config.base import ConfigError, _Section
from unigrad.config.refusals import asynchronous_rollouts_refusal, single_process_refusal
from unigrad.config.resume import RESUMABLE_KEYS, _flat, resume_config
from unigrad.config.rollout import RolloutSection
from unigrad.config.sections import (
    ALARMS,
    GRADIENT_COMBINATIONS,
    TRACKERS,
    DiagnosticsSection,
    EvalSection,
    GradientsSection,
    HybridSection,
    ModelSection,
    MonitorSection,
    OptimSection,
    SamplerSection,
    SandboxSection,
    check_trackers_installed,
)
from unigrad.config.train_config import HYBRID_OBJECTIVES, TrainConfig, set_dependent_defaults
from unigrad.config.yaml_io import (
    _set_dotted,
    _UniqueKeyLoader,
    config_help,
    config_to_yaml,
    load_config,
    load_run_config,
    migrate_saved_config,
    parse_override,
    validate_config,
)

__all__ = [
    "ALARMS", "GRADIENT_COMBINATIONS", "HYBRID_OBJECTIVES", "RESUMABLE_KEYS", "TRACKERS", "ConfigError",
    "DiagnosticsSection", "EvalSection", "GradientsSection", "HybridSection", "ModelSection", "MonitorSection",
    "OptimSection", "RolloutSection", "SamplerSection", "SandboxSection", "TrainConfig", "_Section", "_UniqueKeyLoader",
    "_flat", "_set_dotted", "asynchronous_rollouts_refusal", "check_trackers_installed", "config_help",
    "config_to_yaml", "load_config", "load_run_config", "migrate_saved_config", "parse_override", "resume_config",
    "set_dependent_defaults", "single_process_refusal", "validate_config",
]
