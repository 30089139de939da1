"""Optional experiment trackers, next to the run directory's own logs (which always hold everything).

`report_to: [wandb, mlflow, trackio]` in the config sends each step's metrics and the resolved config
to those tools. None of them is a dependency: asking for one that is not installed is a clear error
before training starts. Their own settings come from their usual environment variables
(`WANDB_PROJECT`, `WANDB_MODE=offline`, `MLFLOW_TRACKING_URI`, `TRACKIO_DIR`, ...); the project
defaults to "unigrad" and the run name to the run directory's name.

A resumed run logs again under the same name; W&B resumes its run by id (stored in the run
directory), MLflow and trackio start a new run of that name.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any

from unigrad.config import TRACKERS as SUPPORTED  # noqa: F401 - name -> module to import
from unigrad.config import check_trackers_installed as check_installed


def check_credentials(names: list[str]) -> None:
    """Raise ConfigError when W&B would ask for a login it cannot get (no key in the environment or in ~/.netrc,
    and not offline): before a run makes its directory, instead of a traceback from `wandb.init` after."""
    if "wandb" not in names or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or _netrc_has_wandb():
        return
    from unigrad.config import ConfigError

    raise ConfigError("report_to=[wandb]: no W&B credentials found (neither WANDB_API_KEY nor a `wandb login` in "
                      "~/.netrc); set WANDB_API_KEY, run `wandb login`, log offline with WANDB_MODE=offline, or "
                      "leave wandb out of report_to")


def _netrc_has_wandb() -> bool:
    """Whether the netrc file (NETRC, else ~/.netrc) has an entry for the W&B host (WANDB_BASE_URL's, or any
    W&B host when it is unset)."""
    import netrc
    from urllib.parse import urlparse

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = urlparse(os.environ.get("WANDB_BASE_URL", "")).hostname
    return any(host == base if base else "wandb" in host for host in hosts)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, name: str):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_finite(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, name: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", project))
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_params(_flat(config))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_finite(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, name: str):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", project), name=name, config=config,
                                resume="allow", embed=False, auto_log_cpu=False,
                                auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.trackio.log(_finite(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any], project: str = "unigrad") -> list:
    check_installed(names)
    return [_CLASSES[name](run_dir, config, project, run_dir.resolve().name) for name in names]
