"""The `boundary:` section of a study file: where along a mismatch dial (e.g. `rollout.router_noise`) a method fails,
against the measured mismatch KL, and whether a correction moves that point.

    boundary:
      dial: rollout.router_noise          # the config key that sets the mismatch
      kl: mismatch/kl_k3                  # a run's measured mismatch: the mean of this metric over its steps
      lines:                              # per method, its arms in increasing dial order (the control first)
        GRPO: [control, grpo_s0.3, grpo_s1]
        TIS: [control, tis_s0.3, tis_s1]

The first line is the reference (plain GRPO): the x of each dial value is the mismatch KL measured in the first
line's arm at that value (the other methods' engines run at the same dial; a replaying method removes the mismatch
its own metric sees, so its own KL would hide the dial). The study's `control` arm is the unperturbed run.

Why the collapse here is read on held-out accuracy, not on the training reward the study's own collapse rule reads:
the dial perturbs the engine that samples, so the training reward of a perturbed run measures the perturbed sampler
too (at a large dial it starts far below the control's at step 1, before any update). The held-out evaluation
samples greedily from the learner's own weights with a clean engine, so it measures only what training did.

Failure rule (one for every point): a run *collapsed* when its test pass@1 is below half of the control arm's (mean
over the control's seeds); a point *fails* when at least half of its runs collapsed or stopped, or when its test
pass@1 is below the control's by an interval that excludes zero after Holm's adjustment over every comparison the
study makes (`study_verdicts`). The reference line's *failure point* is its first failing dial value; the boundary
lies between the KL of the dial value before it (0 for the control) and the KL at it. A correction *moves the
boundary* when it does not fail at the reference's failure point; it *helps there* when its test pass@1 minus the
reference's at that point has a Holm-adjusted interval above zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from unigrad.report.multiplicity import Adjusted

Z975 = 1.959964


class BoundarySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dial: str = Field(description="the dotted config key whose value sets the mismatch (e.g. rollout.router_noise)")
    kl: str = Field("mismatch/kl_k3", description="the per-step mismatch metric; a run's KL is its mean over steps")
    lines: dict[str, list[str]] = Field(min_length=1, description="method label -> its arms in increasing dial "
                                        "order; the first line is the reference whose KL gives each point's x")

    @field_validator("lines")
    @classmethod
    def _lines(cls, lines: dict[str, list[str]]) -> dict[str, list[str]]:
        for label, arms in lines.items():
            if len(arms) < 2:
                raise ValueError(f"boundary line {label!r}: needs at least two arms (the control and a dial value)")
            if len(set(arms)) != len(arms):
                raise ValueError(f"boundary line {label!r}: an arm given twice")
        return lines


def dial_value(config: dict[str, Any], key: str) -> float:
    """The value of dotted `key` in a nested training config (0 where the config leaves it at its default)."""
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return 0.0 if node is None else float(node)


def check_boundary(spec, boundary: BoundarySpec) -> None:
    """ValueError when the section does not fit its study: an arm that is not the study's, no declared control, a
    line whose dial values do not increase, or two lines that disagree on their dial values (each point is read
    against the reference's KL at the same value)."""
    from unigrad.report.seeded_study import arm_config

    if spec.control is None or not isinstance(spec.control, str):
        raise ValueError("boundary: the study needs one declared `control` arm (the unperturbed run)")
    reference = None
    for label, arms in boundary.lines.items():
        missing = [a for a in arms if a not in spec.arms]
        if missing:
            raise ValueError(f"boundary line {label!r}: {', '.join(missing)} not an arm; arms: {', '.join(spec.arms)}")
        values = [dial_value(arm_config(spec, a), boundary.dial) for a in arms]
        if any(b <= a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"boundary line {label!r}: {boundary.dial} must increase along the line, got {values}")
        if reference is None:
            reference = values
        elif not set(values) <= set(reference):
            raise ValueError(f"boundary line {label!r}: dial values {values} not all on the first line's {reference}")


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate k / n (Wilson 1927), (low, high); (NaN, NaN) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    z2 = Z975 ** 2
    centre = (k + z2 / 2) / (n + z2)
    half = Z975 / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Point:
    """One arm on a boundary line."""
    line: str
    arm: str
    dial: float
    kl: tuple[float, float]  # this arm's own measured KL: mean over seeds, 95% CI half-width
    x: float  # the reference line's measured KL at this dial value (the plot's x)
    collapsed: int
    runs: int
    drop: tuple[float, float]  # control minus this arm, test pass@1 points, seed-paired: mean, 95% CI half-width
    vs_control: Adjusted | None  # this arm minus the control, Holm-adjusted (None: the control, or not compared)
    vs_reference: Adjusted | None  # this arm minus the reference line's arm at the same dial value

    @property
    def fails(self) -> bool:
        """The failure rule: at least half of the runs collapsed, or a Holm-significant fall below the control."""
        many = self.runs > 0 and 2 * self.collapsed >= self.runs
        worse = self.vs_control is not None and self.vs_control.rejected and self.vs_control.test.mean < 0
        return many or worse


def accuracy_collapses(scores: list[float], control: list[float], stopped: list[bool]) -> list[bool]:
    """Per run: collapsed when it stopped itself or its test pass@1 is below half of the control's mean (a run not
    evaluated, NaN, counts as collapsed only if it stopped)."""
    if not control:
        raise ValueError("accuracy_collapses: no control results")
    half = 0.5 * sum(control) / len(control)
    return [stop or (math.isfinite(x) and x < half) for x, stop in zip(scores, stopped, strict=True)]


def failure_point(points: list[Point]) -> Point | None:
    """The first failing point of a line (in dial order), or None when none fails."""
    return next((p for p in points if p.fails), None)


def kl_bracket(points: list[Point], failing: Point) -> tuple[float, float]:
    """(KL of the dial value before the failing one, KL at it) on the reference's scale: where the boundary lies."""
    before = [p for p in points if p.dial < failing.dial]
    return (before[-1].x if before else 0.0), failing.x


def boundary_points(study, results: dict[str, Adjusted], scores: dict[str, list[float]]) -> dict[str, list[Point]]:
    """Every line's points, from the study's runs, its per-seed test pass@1 (`study_verdicts.study_scores`) and its
    Holm-adjusted comparisons (named "`arm` − `other`")."""
    from unigrad.report.seeded_study import arm_config
    from unigrad.report.seeds import mean_ci
    spec, boundary = study.spec, study.spec.boundary
    control = spec.control
    seeds = list(range(spec.seeds))
    ran = {arm: [s for s in seeds if (study.run_dir(arm, s) / "metrics.jsonl").is_file()]
           for arms in boundary.lines.values() for arm in arms}
    kl = {arm: mean_ci([study.column(arm, s, f"mean({boundary.kl})") for s in seeds_run])
          for arm, seeds_run in ran.items()}  # each run's metrics read once
    reference_label, reference_arms = next(iter(boundary.lines.items()))
    by_dial = {dial_value(arm_config(spec, a), boundary.dial): a for a in reference_arms}
    x_of = {d: kl[a][0] for d, a in by_dial.items()}
    out: dict[str, list[Point]] = {}
    for label, arms in boundary.lines.items():
        points = []
        for arm in arms:
            dial = dial_value(arm_config(spec, arm), boundary.dial)
            judged = [] if arm == control else accuracy_collapses(
                [scores[arm][s] for s in ran[arm]], [x for x in scores[control] if math.isfinite(x)],
                [bool(study.status(arm, s).get("stopped")) for s in ran[arm]])
            drops = [c - a for c, a in zip(scores[control], scores[arm], strict=True)
                     if math.isfinite(c) and math.isfinite(a)] if arm != control else []
            same = by_dial.get(dial)
            points.append(Point(
                line=label, arm=arm, dial=dial, kl=kl[arm],
                x=x_of.get(dial, float("nan")), collapsed=sum(judged), runs=len(judged),
                drop=mean_ci(drops) if drops else (0.0, float("nan")),
                vs_control=results.get(f"`{arm}` − `{control}`"),
                vs_reference=(results.get(f"`{arm}` − `{same}`") if label != reference_label and same != arm
                              else None)))
        out[label] = points
    return out


def _pm(mean: float, half: float, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:+.{digits}f}" + (f" ± {half:.{digits}f}" if math.isfinite(half) else "")


def _kl(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.2g}"


def _holm(a: Adjusted | None) -> str:
    if a is None:
        return "–"
    return f"{a.test.mean:+.1f} ± {a.half_width():.1f} ({'excludes 0' if a.rejected else 'includes 0'})"


def boundary_lines(points: dict[str, list[Point]], dial: str, control: str) -> list[str]:
    """The page's boundary table and the verdicts the failure rule gives (markdown lines)."""
    lines = ["", "## Collapse boundary", "",
             f"Per method and `{dial}` value: the arm's own measured mismatch KL (mean over its steps, then over "
             "seeds, ± 95% CI), collapses (test pass@1 below half of the control's, or the run stopped) with a 95% "
             "Wilson interval on the rate, the accuracy "
             f"drop (test pass@1 of `{control}` minus the arm's, seed-paired, ± 95% CI), and the Holm-adjusted "
             "differences this study tests (arm minus control; a correction minus the reference line's arm at the "
             "same dial value). *Fails*: at least half of the runs collapsed, or a Holm-significant fall below the "
             "control.", "",
             f"| method | {dial} | KL (reference line) | own KL | collapsed (95% interval on the rate) | accuracy drop "
             "| vs control (Holm) | vs reference at same value (Holm) | fails |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, line in points.items():
        for p in line:
            low, high = wilson(p.collapsed, p.runs)
            rate = (f"{p.collapsed} of {p.runs} ({100 * low:.0f}–{100 * high:.0f}%)" if p.runs else "(control)")
            lines.append(f"| {label} | {p.dial:g} | {_kl(p.x)} | {_kl(p.kl[0])} ± {_kl(p.kl[1])} | {rate} | "
                         f"{_pm(*p.drop)} | {_holm(p.vs_control)} | {_holm(p.vs_reference)} | "
                         f"{'yes' if p.fails else 'no'} |")
    reference_label, reference = next(iter(points.items()))
    failing = failure_point(reference)
    lines.append("")
    if failing is None:
        lines.append(f"By the rule, {reference_label} does not fail at any tested value: the largest, `{dial}` = "
                     f"{reference[-1].dial:g}, measured KL {_kl(reference[-1].x)}; the boundary, if any, lies above "
                     "it.")
        return lines
    low, high = kl_bracket(reference, failing)
    lines.append(f"By the rule, {reference_label} first fails at `{dial}` = {failing.dial:g}: the boundary lies "
                 f"between a measured mismatch KL of {_kl(low)} and {_kl(high)} (± {_kl(failing.kl[1])} over seeds at "
                 "the failing point).")
    for label, line in list(points.items())[1:]:
        there = next((p for p in line if p.dial == failing.dial), None)
        if there is None:
            lines.append(f"- {label}: not run at `{dial}` = {failing.dial:g}.")
            continue
        own = failure_point(line)
        helps = there.vs_reference is not None and there.vs_reference.rejected and there.vs_reference.test.mean > 0
        lines.append(f"- {label}: {'fails there too' if there.fails else 'does not fail there (moves the boundary)'}"
                     + (f"; first fails at {own.dial:g}" if own is not None and own.dial != failing.dial else "")
                     + f"; minus {reference_label} there: {_holm(there.vs_reference)}"
                     + (" — helps" if helps else "") + ".")
    return lines


def plot_boundary(points: dict[str, list[Point]], path: Path, dial: str) -> Path:
    """Two panels against the reference line's measured KL (symmetric-log x, 0 for the control): the collapse rate
    with its Wilson interval, and the accuracy drop against the control with its 95% CI over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for k, (label, line) in enumerate(points.items()):
        shift = 1 + 0.04 * (k - (len(points) - 1) / 2)  # a small horizontal offset so the error bars stay apart
        xs = [p.x * shift for p in line]
        rates = [p.collapsed / p.runs if p.runs else 0.0 for p in line]
        bounds = [wilson(p.collapsed, p.runs) if p.runs else (0.0, 0.0) for p in line]
        left.errorbar(xs, rates, yerr=[[r - lo for r, (lo, _) in zip(rates, bounds, strict=True)],
                                       [hi - r for r, (_, hi) in zip(rates, bounds, strict=True)]],
                      marker="o", capsize=3, label=label)
        drops = [p.drop[0] for p in line]
        halves = [p.drop[1] if math.isfinite(p.drop[1]) else 0.0 for p in line]
        right.errorbar(xs, drops, yerr=halves, marker="o", capsize=3, label=label)
    finite = [p.x for line in points.values() for p in line if p.dial > 0 and p.x > 0 and math.isfinite(p.x)]
    linthresh = 10.0 ** math.floor(math.log10(min(finite))) if finite else 1e-3  # the decade below the least KL
    decades = range(math.ceil(math.log10(linthresh)), math.floor(math.log10(max(finite, default=1.0))) + 1)
    ticks, labels = [0.0, *(10.0 ** k for k in decades)], ["0", *(f"$10^{{{k}}}$" for k in decades)]
    for ax, title in ((left, "collapse rate: test pass@1 < half the control's (95% Wilson)"),
                      (right, "accuracy drop vs control, test pass@1 points (95% CI)")):
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xticks(ticks, labels)  # 0 and the decades past the linear part (matplotlib's own put 10^-3 on 0)
        ax.set_xlabel(f"measured mismatch KL ({dial} dial, reference line)")
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    left.set_ylim(-0.05, 1.05)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def boundary_section(study, doc: Path) -> list[str]:
    """The page's boundary part: the table, the verdicts and the plot (written next to `doc`); [] without one."""
    from unigrad.report.study_verdicts import adjusted_comparisons, comparison_pairs, study_scores

    boundary = study.spec.boundary
    if boundary is None:
        return []
    scores = study_scores(study)
    results = {r.name: r for r in adjusted_comparisons(comparison_pairs(study), scores)}
    points = boundary_points(study, results, scores)
    png = plot_boundary(points, Path(doc).with_name(f"{Path(doc).stem}_boundary.png"), boundary.dial)
    return [*boundary_lines(points, boundary.dial, study.spec.control), "", f"![boundary]({png.name})"]

