"""The docs page of a seeded study (`unigrad study`): tables of held-out accuracy and run statistics with their
intervals over seeds, plots of the curves, the pinned config, and the hand-written notes kept below the marker."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import yaml

from unigrad.report.boundary import boundary_section
from unigrad.report.preregistration import preregistration_line
from unigrad.report.seeded_study import Study
from unigrad.report.seeds import mean_ci, moving_average, paired_difference, series
from unigrad.report.study import write_page
from unigrad.report.study_verdicts import holm_section
from unigrad.report.tuning_record import provenance


def pm(mean: float, half: float, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """"42.0 ± 3.1" (or "+4.2 ± 3.1"); a single value without ±; "–" when nothing was measured."""
    if not math.isfinite(mean):
        return "–"
    sign = "+" if signed else ""
    text = f"{scale * mean:{sign}.{digits}f}"
    return text if not math.isfinite(half) else f"{text} ± {scale * half:.{digits}f}"


def num(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1e6:  # FLOPs and the like
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def arm_summary(study: Study, arm: str, split: str = "test") -> dict[str, Any]:
    """Everything the page says about one arm on one split."""
    spec = study.spec
    seeds = range(spec.seeds)
    evals = {s: study.evaluation(arm, s, split) for s in seeds}
    done = [s for s in seeds if evals[s] is not None]
    scores = [evals[s]["mean"]["pass@1"] for s in done]
    start = study.start_evaluation(arm, split)
    out: dict[str, Any] = {
        "arm": arm, "seeds_done": done, "scores": scores, "pass1": mean_ci(scores),
        "start": start["mean"]["pass@1"],
        "change": mean_ci([x - start["mean"]["pass@1"] for x in scores]),
        "change_prompt_se": paired_difference([evals[s] for s in done], [start])[1] if done else float("nan"),
        "tasks": {t: mean_ci([evals[s][t]["pass@1"] for s in done]) for t in start if t != "mean"},
        "collapses": _collapse_count([study.is_collapsed(arm, s) for s in seeds
                                      if (study.run_dir(arm, s) / "metrics.jsonl").is_file()]),
        "stopped": sum(bool(study.status(arm, s).get("stopped")) for s in seeds),
        "minutes": [study.train_minutes(arm, s) for s in seeds if (study.run_dir(arm, s) / "metrics.jsonl").is_file()],
        "columns": {label: mean_ci([study.column(arm, s, text) for s in seeds
                                    if (study.run_dir(arm, s) / "metrics.jsonl").is_file()])
                    for label, text in spec.columns.items()},
    }
    base = study.baseline_of(arm)
    if base is not None and base != arm:
        out["vs_baseline"], out["vs_baseline_prompt_se"] = seed_paired(study, arm, base, split)
    return out


def _collapse_count(verdicts: list[bool | None]) -> int | None:
    """How many runs collapsed; None when no run has a verdict (no control declared, or the control arm itself)."""
    judged = [v for v in verdicts if v is not None]
    return sum(judged) if judged else None


def seed_paired(study: Study, arm: str, other: str, split: str = "test") -> tuple[tuple[float, float], float]:
    """`arm` minus `other` in mean pass@1 on `split`, over the seeds both have: (mean, 95% CI half-width) of the
    per-seed differences, and the paired per-prompt standard error of the difference."""
    pairs = [(study.evaluation(arm, s, split), study.evaluation(other, s, split)) for s in range(study.spec.seeds)]
    both = [(x, y) for x, y in pairs if x is not None and y is not None]
    a, b = [x for x, _ in both], [y for _, y in both]
    diff = mean_ci([x["mean"]["pass@1"] - y["mean"]["pass@1"] for x, y in zip(a, b, strict=True)])
    return diff, (paired_difference(a, b)[1] if both else float("nan"))


def curve_points(runs: list[list[float]], window: int = 10) -> tuple[list[int], list[float], list[float], list[float],
                                                                       bool]:
    """One arm's curve from its seeds' per-step values (NaN where a step did not log the metric): (steps, mean over
    seeds, lowest seed, highest seed, sparse). A metric logged on most steps is smoothed (trailing mean over `window`
    steps); a sparse one (logged on fewer than half the steps, as periodic evaluations are) is shown at the steps
    that logged it, unsmoothed: a trailing mean over its last `window` values would average far-apart points."""
    sparse = sum(math.isfinite(x) for r in runs for x in r) < sum(len(r) for r in runs) / 2
    if not sparse:
        runs = [moving_average(r, window) for r in runs]
    n = min(len(r) for r in runs)
    cols = [[r[i] for r in runs if math.isfinite(r[i])] for i in range(n)]
    kept = [(i + 1, c) for i, c in enumerate(cols) if c]
    return ([i for i, _ in kept], [statistics.fmean(c) for _, c in kept], [min(c) for _, c in kept],
            [max(c) for _, c in kept], sparse)


def plot_curves(study: Study, path: Path, window: int = 10) -> list[Path]:
    """One PNG per curve metric: per arm the mean over seeds (smoothed unless sparse, see `curve_points`), with the
    lowest and highest seed shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key in study.spec.curves:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        any_sparse = False
        for arm in study.spec.arms:
            runs = [series(study.metrics(arm, s), key) for s in range(study.spec.seeds)
                    if (study.run_dir(arm, s) / "metrics.jsonl").is_file()]
            if not runs:
                continue
            steps, mean, low, high, sparse = curve_points(runs, window)
            if not steps:
                continue
            any_sparse |= sparse
            ax.plot(steps, mean, label=arm, linewidth=1.2, marker="o" if sparse else None, markersize=3)
            ax.fill_between(steps, low, high, alpha=0.15)
        ax.set_xlabel("rollout step")
        ax.set_ylabel(key)
        how = "the steps that logged it" if any_sparse else f"trailing mean over {window} steps"
        ax.set_title(f"{key} ({how}; band: lowest to highest seed)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        out = path.with_name(f"{path.stem}_{key.replace('/', '_')}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def render(study: Study, command: str, doc: Path, wall_minutes: float | None = None) -> str:
    """The page's generated part; plots are written next to `doc`."""
    summaries = {arm: arm_summary(study, arm) for arm in study.spec.arms}
    models = {arm: study.model_of(arm) for arm in study.spec.arms}
    lines = _intro(study, command, wall_minutes)
    lines += _arm_table(study, summaries, models)
    lines += _per_task_table(study, summaries, models)
    lines += _comparisons_table(study)
    lines += holm_section(study)
    lines += boundary_section(study, doc)
    lines += _closing(study, doc)
    return "\n".join(lines)


def _intro(study: Study, command: str, wall_minutes: float | None) -> list[str]:
    """Title, question, how the page was made (machine, commit, runs, time) and how to read its tables."""
    spec = study.spec
    lines = [f"# {spec.title}", ""]
    lines += [f"**Retired**, not to be run or tuned again: {spec.retired.strip()}", ""] if spec.retired else []
    lines += [spec.question.strip(), ""] if spec.question else []
    total = sum(study.train_minutes(arm, seed, chain=False) for arm in spec.arms for seed in range(spec.seeds)
                if (study.run_dir(arm, seed) / "metrics.jsonl").is_file())
    own_steps = {arm: o["steps"] for arm, o in spec.arms.items() if "steps" in o}
    chained = {arm: o["from"] for arm, o in spec.arms.items() if "from" in o}
    lines += [
        f"Generated by `{command}` (the whole study: config pinned in that file, printed at the end of this page) "
        f"on {platform.machine()} / {platform.system()}, Python {platform.python_version()}, {os.cpu_count()} "
        f"CPU cores, at commit {_commit()}, {datetime.date.today().isoformat()}. "
        f"{spec.seeds} seeds × {len(spec.arms)} arms × {spec.steps} rollout steps"
        + (" (" + ", ".join(f"{a}: {n}" for a, n in own_steps.items()) + ")" if own_steps else "")
        + (", staged: " + ", ".join(f"{a} starts from {p}'s final weights" for a, p in chained.items())
           if chained else "") + f", {spec.parallel} run(s) at once"
        + (" (one torch thread each)" if spec.parallel > 1 else "") + ". "
        f"Training time summed over runs: {total:.0f} min (steps only, no loading or evaluation)"
        + (f"; the study took {wall_minutes:.0f} min of wall time" if wall_minutes else "") + ".",
        "",
        provenance(spec, spec._tuned),
        "",
        f"Held-out **test** greedy pass@1 (%) on {spec.eval.prompts} prompts per task (the same prompts for every "
        "run), mean over seeds ± the half-width of its 95% t interval; *prompt SE*: the paired per-prompt "
        "standard error of the same difference (each prompt's correctness averaged over seeds), the uncertainty "
        "from which prompts were drawn. " + _collapse_rule(spec),
        "",
    ]
    return lines


def _collapse_rule(spec) -> str:
    """The page's sentence on what a collapse is, for the study's collapse_metric."""
    from unigrad.report.seeded_study import HELD_OUT

    if spec.collapse_metric == HELD_OUT:
        rule = ("its test pass@1 ended below half of the control arm's mean over seeds, or it stopped itself (held-out "
                "accuracy, not training reward: this study's arms change the sampler, so their reward is low from "
                "step 1)")
    else:
        metric = "training reward" if spec.collapse_metric == "reward/mean" else f"`{spec.collapse_metric}`"
        rule = (f"its {metric} (10-step trailing mean, from step 1) ended below half of the control arm's at the same "
                "step (mean over the control's seeds), or it stopped itself")
    return f"A run *collapsed* when {rule}; without a declared control there is no collapse verdict (–)."


def _arm_table(study: Study, summaries: dict[str, dict], models: dict[str, str]) -> list[str]:
    """One row per arm: test pass@1, its change and differences with their standard errors, collapses, the
    study's columns, training minutes; then the start checkpoints' scores and each seed's."""
    spec = study.spec
    chained = {arm: o["from"] for arm, o in spec.arms.items() if "from" in o}
    lines: list[str] = []
    base = spec.baseline
    head = ["arm", "model", "test pass@1", "change vs start", "prompt SE"]
    if base:
        head += [f"vs {base} (seed-paired)" if isinstance(base, str) else "vs its model's baseline (seed-paired)",
                 "prompt SE"]
    head += ["collapsed", *spec.columns, "train min / run" + (" (with the arms it starts from)" if chained else "")]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for arm, s in summaries.items():
        row = [f"`{arm}`", models[arm], pm(*s["pass1"]), pm(*s["change"], signed=True),
               f"{100 * s['change_prompt_se']:.1f}"]
        if base:
            row += ([pm(*s["vs_baseline"], signed=True), f"{100 * s['vs_baseline_prompt_se']:.1f}"]
                    if "vs_baseline" in s else ["(baseline)" if study.baseline_of(arm) == arm else "–", ""])
        row += [(f"{s['collapses']} of {len(s['minutes'])}" if s["collapses"] is not None
                 else "(control)" if study.control_of(arm) == arm else "–")
                + (f" ({s['stopped']} stopped)" if s["stopped"] else "")]
        row += [f"{num(m)} ± {num(h)}" if math.isfinite(h) else num(m) for m, h in s["columns"].values()]
        row += [f"{statistics.fmean(s['minutes']):.1f}" if s["minutes"] else "–"]
        lines.append("| " + " | ".join(row) + " |")
    starts = {models[a]: summaries[a]["start"] for a in spec.arms}
    lines += ["", "Start checkpoint(s), test pass@1: "
              + ", ".join(f"{m} {100 * v:.1f}" for m, v in starts.items()) + ". "
              + "Per seed (test pass@1): "
              + "; ".join(f"{a} " + ", ".join(f"{100 * x:.1f}" for x in s["scores"]) for a, s in summaries.items())
              + "."]
    return lines


def _per_task_table(study: Study, summaries: dict[str, dict], models: dict[str, str]) -> list[str]:
    """Test pass@1 per task of each arm, and of each start model."""
    spec = study.spec
    lines: list[str] = []
    tasks = list(next(iter(summaries.values()))["tasks"])
    lines += ["", "Per task (test pass@1, mean ± 95% CI over seeds):", "",
              "| arm | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for arm, s in summaries.items():
        lines.append(f"| `{arm}` | " + " | ".join(pm(*s["tasks"][t]) for t in tasks) + " |")
    first_arm = {models[a]: a for a in reversed(list(spec.arms))}  # each start model, by the first arm on it
    for model, arm in first_arm.items():
        start = study.start_evaluation(arm, "test")
        lines.append(f"| start: {model} | " + " | ".join(f"{100 * start[t]['pass@1']:.1f}" for t in tasks) + " |")
    return lines


def _comparisons_table(study: Study) -> list[str]:
    """The study's further seed-paired comparisons, on each evaluated split."""
    spec = study.spec
    lines: list[str] = []
    if spec.comparisons:
        splits = [sp for sp in ("test", "validation") if sp in spec.eval.splits]
        lines += ["", "Further comparisons (pass@1 of the first arm minus the second, seed-paired: mean ± 95% CI over "
                  "seeds; prompt SE as above):", "",
                  "| arms | " + " | ".join(f"{sp} difference | prompt SE" for sp in splits) + " |",
                  "| --- |" + " --- | --- |" * len(splits)]
        for arm, other in spec.comparisons:
            cells = []
            for sp in splits:
                diff, se = seed_paired(study, arm, other, sp)
                cells += [pm(*diff, signed=True), f"{100 * se:.1f}"]
            lines.append(f"| `{arm}` − `{other}` | " + " | ".join(cells) + " |")
    return lines


def _closing(study: Study, doc: Path) -> list[str]:
    """Validation pass@1, the curves (written next to `doc`), the study file's record and text, the columns'
    meaning."""
    spec = study.spec
    lines: list[str] = []
    if "validation" in spec.eval.splits:
        lines += ["", "Validation pass@1 (what choices are made on; mean ± 95% CI over seeds): "
                  + "; ".join(f"`{a}` {pm(*arm_summary(study, a, 'validation')['pass1'])}" for a in spec.arms) + "."]
    if spec.curves:
        lines += [""]
        for png in plot_curves(study, doc):
            lines += [f"![{png.stem}]({png.name})", ""]
    lines += ["", preregistration_line(study.source)] if study.source is not None else []
    unset = {"question"} | ({"tuning"} if spec.tuning is None else set()) | (set() if spec.retired else {"retired"})
    lines += ["", "Study file (the training config each arm starts from, then each arm's overrides):", "",
              "```yaml", yaml.safe_dump(spec.model_dump(exclude=unset), sort_keys=False).rstrip(), "```"]
    lines += ["", "Columns: " + "; ".join(f"*{k}* = {v}" for k, v in spec.columns.items()) +
              " (per run: mean/max/min over its steps, last = mean of its last tenth, growth = mean of its last "
              "third / mean of its first third, alarms = steps on which the alarm fired; then mean ± 95% CI over "
              "seeds)." if spec.columns else ""]
    return lines


def write_study_page(study: Study, command: str, root: Path, wall_minutes: float | None = None) -> Path:
    """Write the page (and its plots) at `root`/`spec.doc`, keeping the notes below the marker of the old page."""
    path = Path(root) / study.spec.doc
    path.parent.mkdir(parents=True, exist_ok=True)
    write_page(path, render(study, command, path, wall_minutes))
    return path
