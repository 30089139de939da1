"""Stability monitors and alarms (IcePop's train–inference mismatch, arXiv 2510.18855; community
reports of grad-norm growth in long TRL GRPO runs).

Each step's metrics go through `StabilityMonitor.check`, which returns the alarms that fire:

| alarm              | fires when                                                              | default  |
| ------------------ | ----------------------------------------------------------------------- | -------- |
| `mismatch_kl`      | `mismatch/kl_k3` > mismatch_kl_max (IcePop: runs collapse past ~0.05)   | 0.05     |
| `grad_spike`       | pre-clip `grad_norm` > grad_spike_factor x the median of the previous    | 5x, 50   |
|                    | grad_spike_window steps (after at least 10 steps)                       |          |
| `entropy_collapse` | `rl/entropy` < entropy_min_ratio x its mean over the first 10 steps     | 0.1      |
| `clip_fraction`    | `rl/clip/region_fraction` > clip_fraction_max                           | 0.2      |
| `nonfinite`        | the step was skipped for a non-finite loss or gradient                  | always   |
| `grad_cap`         | the step was skipped because its grad norm exceeded grad_norm_cap       | off      |
| `beta_zero`        | (once, at the start) beta = 0 on a run longer than beta_zero_steps;     | 1000     |
|                    | community reports: a small beta (0.001) tames grad-norm growth          |          |

An alarm is logged as `alarm/<name>` = 1 on its step, appended to `alarms.jsonl` with its message,
and shown in the progress bar. Alarms named in `stop_on` stop the run after a checkpoint; a run
also stops after max_nonfinite_steps skipped non-finite steps.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Alarm:
    name: str
    step: int
    message: str


class StabilityMonitor:
    def __init__(self, *, mismatch_kl_max: float = 0.05, grad_spike_factor: float = 5.0,
                 grad_spike_window: int = 50, entropy_min_ratio: float = 0.1, clip_fraction_max: float = 0.2,
                 warmup_steps: int = 10):
        self.mismatch_kl_max = mismatch_kl_max
        self.grad_spike_factor = grad_spike_factor
        self.entropy_min_ratio = entropy_min_ratio
        self.clip_fraction_max = clip_fraction_max
        self.warmup_steps = warmup_steps
        self._grad_norms: deque = deque(maxlen=grad_spike_window)
        self._entropy_start: list[float] = []
        self.nonfinite_steps = 0  # skipped for a non-finite loss or gradient, over the whole run

    @staticmethod
    def start_alarms(beta: float, max_steps: int, beta_zero_steps: int) -> list[Alarm]:
        """Alarms known before the first step."""
        if beta == 0 and beta_zero_steps and max_steps > beta_zero_steps:
            return [Alarm("beta_zero", 0, f"beta = 0 on a {max_steps}-step run: grad norms tend to grow in long "
                                          "runs without a KL term; consider objective_args.beta=0.001")]
        return []

    def check(self, step: int, m: dict[str, float]) -> list[Alarm]:
        alarms = []
        kl = m.get("mismatch/kl_k3")
        if _finite(kl) and kl > self.mismatch_kl_max:
            alarms.append(Alarm("mismatch_kl", step, f"train-inference mismatch KL (k3) {kl:.4f} > "
                                                     f"{self.mismatch_kl_max}"))
        if m.get("skipped/nonfinite"):
            self.nonfinite_steps += 1
            cause = "loss" if m.get("skipped/nonfinite_loss") else "gradient"
            alarms.append(Alarm("nonfinite", step, f"non-finite {cause}: the optimizer step was skipped"))
        if m.get("skipped/grad_cap"):
            alarms.append(Alarm("grad_cap", step, f"grad norm {m.get('grad_norm', float('nan')):.3g} above the cap: "
                                                  "the optimizer step was skipped"))
        norm = m.get("grad_norm")
        if _finite(norm):
            if len(self._grad_norms) >= self.warmup_steps:
                median = statistics.median(self._grad_norms)
                if median > 0 and norm > self.grad_spike_factor * median:
                    alarms.append(Alarm("grad_spike", step, f"grad norm {norm:.3g} > {self.grad_spike_factor:g}x "
                                                            f"its running median {median:.3g}"))
            self._grad_norms.append(norm)
        entropy = m.get("rl/entropy")
        if _finite(entropy):
            if len(self._entropy_start) < self.warmup_steps:
                self._entropy_start.append(entropy)
            else:
                start = sum(self._entropy_start) / len(self._entropy_start)
                if start > 0 and entropy < self.entropy_min_ratio * start:
                    alarms.append(Alarm("entropy_collapse", step, f"entropy {entropy:.4f} < "
                                                                  f"{self.entropy_min_ratio:g}x its start {start:.4f}"))
        clip = m.get("rl/clip/region_fraction")
        if _finite(clip) and clip > self.clip_fraction_max:
            alarms.append(Alarm("clip_fraction", step, f"clipped-token fraction {clip:.3f} > "
                                                       f"{self.clip_fraction_max}"))
        return alarms

    def state_dict(self) -> dict[str, Any]:
        return {"grad_norms": list(self._grad_norms), "entropy_start": list(self._entropy_start),
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grad_norms = deque(state["grad_norms"], maxlen=self._grad_norms.maxlen)
        self._entropy_start = list(state["entropy_start"])
        self.nonfinite_steps = int(state["nonfinite_steps"])


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
