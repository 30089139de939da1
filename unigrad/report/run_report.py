"""`unigrad report RUN_DIR`: PNG plots and one self-contained HTML page from metrics.jsonl.

Reads whatever the run has written so far (a run still going is fine: an unfinished last line is
ignored). Sections: per-task squared gradient norm ||g_k||^2 over steps (log scale, as in arXiv 2510.19178's
figure), the max/min ratio of ||g_k||^2, learning gain (post hoc, window s from the run's config),
reward per task, and Spearman correlations of ||g_k||^2 with learning gain, |advantage|, reward,
prompt length and response length: pooled over all (task, step) points, across the tasks' run
means, and within each task over steps.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unigrad.diagnostics.correlation import spearman
from unigrad.diagnostics.learning_gain import learning_gain_series

CORRELATES = {  # label -> metric prefix (per task: prefix/<task>)
    "learning gain": "gain_posthoc",
    "|advantage|": "advantage_abs",
    "reward": "reward",
    "prompt length": "prompt_length",
    "response length": "response_length",
}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; give the --output-dir of a unigrad train "
                                "run (a directory holding metrics.jsonl)")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a unigrad run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return rows


def _gain_window(run_dir: Path) -> int:
    import yaml

    cfg_path = Path(run_dir) / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        return int((cfg.get("diagnostics") or {}).get("gain_window", 10))
    return 10


def _value(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")


def task_names(rows: list[dict[str, Any]]) -> list[str]:
    """Task names of a run: from the per-task reward, or (objective=sft samples nothing) the per-task gradient
    and SFT-fraction metrics."""
    names = {k.split("/")[1] for r in rows for k in r
             if (k.startswith("reward/") and k.count("/") == 1) or (k.startswith("grad/") and k.endswith("/sq_norm"))}
    names |= {k.split("/")[2] for r in rows for k in r if k.startswith("hpt/sft_fraction/") and k.count("/") == 2}
    return sorted(names - {"mean"})


def series(rows: list[dict[str, Any]], window: int) -> dict[str, dict[str, list[float]]]:
    """{task: {metric: values over steps}} with the post-hoc learning gain added."""
    out: dict[str, dict[str, list[float]]] = {}
    for task in task_names(rows):
        s = {"sq_norm": [_value(r, f"grad/{task}/sq_norm") for r in rows],
             "cross_sq_norm": [_value(r, f"grad/{task}/cross_sq_norm") for r in rows],
             "share": [_value(r, f"grad/{task}/share") for r in rows]}
        for prefix in ("reward", "advantage_abs", "prompt_length", "response_length"):
            s[prefix] = [_value(r, f"{prefix}/{task}") for r in rows]
        s["gain_posthoc"] = learning_gain_series(s["reward"], window)
        out[task] = s
    return out


def correlations(data: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Rows {scope, variable, rho, n}: ||g_k||^2 against each correlate."""
    table = []
    for label, key in CORRELATES.items():
        xs = [v for t in data for v in data[t]["sq_norm"]]
        ys = [v for t in data for v in data[t][key]]
        table.append({"scope": "all (task, step) points", "variable": label, **_rho(xs, ys)})
        means_x = [_mean(data[t]["sq_norm"]) for t in data]
        means_y = [_mean(data[t][key]) for t in data]
        table.append({"scope": "across tasks (run means)", "variable": label, **_rho(means_x, means_y)})
        for t in data:
            table.append({"scope": f"within {t}", "variable": label, **_rho(data[t]["sq_norm"], data[t][key])})
    return table


def _rho(x, y) -> dict[str, Any]:
    rho, n = spearman(x, y)
    return {"rho": rho, "n": n}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _smooth(values: list[float], span: int) -> list[float]:
    """Trailing mean over the last `span` finite values (NaN until one exists)."""
    out, window = [], []
    for v in values:
        if math.isfinite(v):
            window = (window + [v])[-span:]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


@dataclass(frozen=True)
class Axes:
    """How a figure's curves are labelled and scaled."""

    title: str
    ylabel: str
    log: bool = False  # a logarithmic y axis


@dataclass(frozen=True)
class ReportContents:
    """Everything index.html shows, gathered by `build_report`."""

    run_dir: Path
    n_steps: int
    window: int  # the learning-gain window s
    summary: dict[str, dict[str, float]]  # per task: its summary numbers
    figures: list[tuple[str, str]]  # (PNG name in out_dir, title): the per-task figures
    table: list[dict[str, Any]]  # the correlations of ||g_k||^2
    out_dir: Path
    stability: list[tuple[str, str]]  # (PNG name, title): the mismatch and stability figures
    alarms: list[dict[str, Any]]


def _plot(path: Path, steps, curves: dict[str, list[float]], axes: Axes,
          raw: dict[str, list[float]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for i, (name, ys) in enumerate(curves.items()):
        color = f"C{i}"
        if raw is not None:
            ax.plot(steps, raw[name], color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, ys, color=color, label=name, linewidth=1.6)
    if axes.log:
        ax.set_yscale("log")
    ax.set_title(axes.title)
    ax.set_xlabel("step")
    ax.set_ylabel(axes.ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write the PNGs and index.html into out_dir (default RUN_DIR/report); returns the HTML path."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    rows = read_metrics(run_dir)  # a missing run is refused before anything is written
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no complete step yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    window = _gain_window(run_dir)
    data = series(rows, window)
    steps = [r.get("step", i + 1) for i, r in enumerate(rows)]
    span = max(1, min(window, len(rows) // 10 or 1))

    def positive(v):
        return [x if x > 0 else float("nan") for x in v]

    has_grad = any(math.isfinite(v) for t in data for v in data[t]["sq_norm"])
    figures = []
    if has_grad:
        raw = {t: positive(data[t]["sq_norm"]) for t in data}
        _plot(out_dir / "grad_sq_norm.png", steps, {t: _smooth(raw[t], span) for t in data},
              Axes(f"per-task squared gradient norm ||g_k||^2 (trailing mean over {span} steps)", "||g_k||^2",
                   log=True), raw=raw)
        figures.append(("grad_sq_norm.png", "Per-task squared gradient norm"))
        ratio = [_value(r, "grad/sq_norm_ratio") for r in rows]
        _plot(out_dir / "sq_norm_ratio.png", steps, {"max/min": _smooth(ratio, span)},
              Axes("max_k / min_k of ||g_k||^2", "ratio", log=True), raw={"max/min": ratio})
        figures.append(("sq_norm_ratio.png", "Gradient imbalance ratio"))
    _plot(out_dir / "learning_gain.png", steps, {t: data[t]["gain_posthoc"] for t in data},
          Axes(f"learning gain Gain_k(t), s = {window} (post hoc)", "gain"))
    figures.append(("learning_gain.png", "Learning gain"))
    _plot(out_dir / "reward.png", steps, {t: _smooth(data[t]["reward"], span) for t in data},
          Axes(f"training reward per task (trailing mean over {span} steps)", "reward"),
          raw={t: data[t]["reward"] for t in data})
    figures.append(("reward.png", "Reward per task"))

    stability = _stability_figures(out_dir, rows, steps, span)
    summary = _summary(rows, data, has_grad)
    table = correlations(data) if has_grad else []
    alarms = _alarms(run_dir)
    page = _html(ReportContents(run_dir, len(rows), window, summary, figures, table, out_dir, stability, alarms))
    path = out_dir / "index.html"
    path.write_text(page)
    doc = {"steps": len(rows), "tasks": summary, "correlations": table}
    (out_dir / "summary.json").write_text(json.dumps(_finite_or_null(doc), indent=2))
    return path


def _stability_figures(out_dir: Path, rows, steps, span) -> list[tuple[str, str]]:
    """Mismatch and stability plots (whatever of them the run logged)."""
    figures = []

    def col(key):
        return [_value(r, key) for r in rows]

    groups = [
        ("mismatch.png", "Train-inference mismatch", "mismatch KL(pi_infer || pi_train) and |log-prob gap|",
         ["mismatch/kl_k3", "mismatch/kl_k1", "mismatch/abs_logp_diff_mean"], True),
        ("mismatch_masked.png", "Out-of-band tokens and their entropy", "fraction outside [alpha, beta]; entropy",
         ["mismatch/masked_fraction", "mismatch/entropy_masked", "mismatch/entropy_all"], False),
        ("sft_loss.png", "Supervised (SFT) loss", "loss per token", ["sft/loss"], False),
        ("grad_norm.png", "Pre-clip gradient norm", "grad_norm", ["grad_norm"], True),
        ("clip.png", "Clip fractions", "fraction of tokens", ["rl/clip/low_fraction", "rl/clip/high_fraction",
                                                              "rl/clip/region_fraction"], False),
        ("entropy_kl.png", "Entropy and KL to the reference", "nats", ["rl/entropy", "rl/kl"], False),
    ]
    for name, title, ylabel, keys, log in groups:
        curves = {k: col(k) for k in keys if any(math.isfinite(v) for v in col(k))}
        if not curves:
            continue
        if log:
            curves = {k: [v if v > 0 else float("nan") for v in c] for k, c in curves.items()}
        _plot(out_dir / name, steps, {k: _smooth(c, span) for k, c in curves.items()}, Axes(title, ylabel, log),
              raw=curves)
        figures.append((name, title))
    positions = sorted({k for r in rows for k in r if k.startswith("mismatch/abs_logp_diff/pos_")},
                       key=lambda k: int(k.rsplit("_", 2)[-2]))
    if positions:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
        third = max(1, len(rows) // 3)
        for label, part in (("first third", rows[:third]), ("last third", rows[-third:])):
            ax.plot([k.rsplit("pos_", 1)[1].replace("_", "-") for k in positions],
                    [_mean([_value(r, k) for r in part]) for k in positions], marker="o", label=label)
        ax.set_title("mean |log p_infer - log p_train| by completion position")
        ax.set_xlabel("token positions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "mismatch_by_position.png")
        plt.close(fig)
        figures.append(("mismatch_by_position.png", "Mismatch by token position"))
    return figures


def _alarms(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "alarms.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _finite_or_null(obj):
    """Strict JSON: NaN and infinities become null."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_null(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _summary(rows, data, has_grad) -> dict[str, dict[str, float]]:
    out = {}
    for t, s in data.items():
        out[t] = {"mean sq_norm": _mean(s["sq_norm"]) if has_grad else float("nan"),
                  "mean cross_sq_norm": _mean(s["cross_sq_norm"]) if has_grad else float("nan"),
                  "mean share": _mean(s["share"]) if has_grad else float("nan"),
                  "first-10% reward": _mean(s["reward"][: max(1, len(rows) // 10)]),
                  "last-10% reward": _mean(s["reward"][-max(1, len(rows) // 10):])}
    return out


def _fmt(v: float, digits: int = 3) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.{digits}f}"


def _html(contents: ReportContents) -> str:
    c, e = contents, html.escape
    run_dir, n_steps, window, summary, table, out_dir = c.run_dir, c.n_steps, c.window, c.summary, c.table, c.out_dir
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>unigrad report: {e(str(run_dir))}</title>",
             "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>unigrad run report</h1><p>{e(str(run_dir))}: {n_steps} steps logged; learning-gain window "
             f"s = {window}.</p>"]
    means = [v["mean sq_norm"] for v in summary.values() if math.isfinite(v["mean sq_norm"]) and v["mean sq_norm"] > 0]
    if len(means) >= 2:
        parts.append(f"<p>Imbalance: the largest task's mean ||g_k||^2 is <b>{max(means) / min(means):.1f}x</b> "
                     "the smallest's.</p>")
    if summary:
        parts.append("<h2>Per task</h2><table><tr><th>task</th>"
                     + "".join(f"<th>{e(k)}</th>" for k in next(iter(summary.values()))) + "</tr>")
        for t, v in summary.items():
            parts.append(f"<tr><td>{e(t)}</td>" + "".join(f"<td>{_fmt(x)}</td>" for x in v.values()) + "</tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No per-task metrics in this run.</p>")
    for name, title in c.figures:
        data = base64.b64encode((out_dir / name).read_bytes()).decode()
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    if table:
        parts.append("<h2>Spearman correlation of ||g_k||^2 with ...</h2><table><tr><th>scope</th>"
                     + "".join(f"<th>{e(v)} (rho, n)</th>" for v in CORRELATES) + "</tr>")
        for scope in dict.fromkeys(r["scope"] for r in table):
            cells = [r for r in table if r["scope"] == scope]
            parts.append(f"<tr><td>{e(scope)}</td>"
                         + "".join(f"<td>{_fmt(r['rho'], 2)} ({r['n']})</td>" for r in cells) + "</tr>")
        parts.append("</table><p>Learning gain here is the post-hoc Gain_k(t); steps where a task was not "
                     "sampled have no value and are left out.</p>")
    else:
        parts.append("<p>No per-task gradient metrics in this run (single task, or "
                     "diagnostics.task_gradients=false).</p>")
    parts.append("<h1>Mismatch and stability</h1>")
    if alarms := c.alarms:
        parts.append(f"<p>{len(alarms)} alarm(s):</p><table><tr><th>step</th><th>alarm</th><th>message</th></tr>")
        for a in alarms[:200]:
            parts.append(f"<tr><td>{a.get('step')}</td><td>{e(str(a.get('alarm')))}</td>"
                         f"<td style='text-align:left'>{e(str(a.get('message')))}</td></tr>")
        parts.append("</table>" + (f"<p>({len(alarms) - 200} more in alarms.jsonl)</p>" if len(alarms) > 200 else ""))
    else:
        parts.append("<p>No alarms.</p>")
    for name, title in c.stability:
        data = base64.b64encode((out_dir / name).read_bytes()).decode()
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
