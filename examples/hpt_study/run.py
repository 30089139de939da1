"""HPT against SFT, GRPO, Dr. GRPO, SFT→GRPO and LUFFY at an equal budget, over several seeds; writes docs/hpt.md.

    python examples/hpt_study/run.py                          # 300 steps x 16 prompts, seeds 0 1 2, 2 at a time
    python examples/hpt_study/run.py --steps 20 --seeds 0 --out /tmp/hpt --doc /tmp/hpt.md   # a smoke run
    python examples/hpt_study/run.py model.name=/path/to/hf_model   # any model: overrides go to every run

Every method starts from the same checkpoint (`model.name`, the tiny default unless overridden) and gets the
same budget: `--steps` optimizer steps of `prompts_per_step` training prompts each, drawn by the same seeded
sampler. SFT→GRPO spends half the steps on each. The study runs the real CLI (`unigrad train`, `unigrad eval`),
resumes what a cut-off study left behind and skips what is done. Held-out evaluation: greedy pass@1 every
`--steps / --points` steps on the training families, and at the end pass@1 and pass@8 on those and on the
out-of-distribution family (`--ood`), which no method trains on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from unigrad.report.run_report import read_metrics
from unigrad.report.study import run_training, write_page

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = HERE / "study.yaml"

# method -> stages of (objective, overrides, share of the budget)
METHODS: dict[str, list[tuple[str, list[str], float]]] = {
    "sft": [("sft", [], 1.0)],
    "grpo": [("grpo", [], 1.0)],
    "dr_grpo": [("dr_grpo", [], 1.0)],
    "sft_then_grpo": [("sft", [], 0.5), ("grpo", [], 0.5)],
    "luffy": [("luffy", [], 1.0)],
    "hpt_gamma_0": [("hpt", ["hybrid.gamma=0"], 1.0)],
    "hpt_gamma_1/8": [("hpt", ["hybrid.gamma=0.125"], 1.0)],
    "hpt_gamma_2/8": [("hpt", ["hybrid.gamma=0.25"], 1.0)],
}


def slug(method: str) -> str:
    return method.replace("/", "_")


def evaluate(model: Path | str, tasks: list[str], out: Path, args, k: int = 0) -> dict:
    """`unigrad eval --json` on `tasks`, cached in `out`."""
    if not out.is_file():
        cmd = [sys.executable, "-m", "unigrad.cli", "eval", str(model), "--tasks", *tasks, "--prompts",
               str(args.prompts), "--max-new-tokens", str(args.max_new_tokens), "--json"]
        if k:
            cmd += ["--k", str(k)]
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.parallel > 1 else {})}  # one thread per run
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(res.stdout.strip().splitlines()[-1])
    return json.loads(out.read_text())


def run_unit(method: str, seed: int, args, extra: list[str]) -> dict:
    """One method with one seed: its stages in order, then the final evaluation. Returns its record."""
    base = Path(args.out) / slug(method) / f"seed{seed}"
    model = args.model
    stages = []
    done_steps = 0
    every = max(1, args.steps // args.points)
    for i, (objective, overrides, share) in enumerate(METHODS[method]):
        steps = round(args.steps * share)
        run_dir = base / f"stage{i}"
        ovr = [f"model.name={model}", f"objective={objective}", f"seed={seed}", f"max_steps={steps}",
               f"eval.every={every}", f"eval.prompts_per_task={args.prompts}", *overrides, *extra,
               *(["threads=1"] if args.parallel > 1 else [])]
        run_training(run_dir, CONFIG, ovr, report=False, log=base / f"stage{i}.log")
        stages.append({"dir": str(run_dir), "objective": objective, "first_step": done_steps, "steps": steps})
        if i + 1 < len(METHODS[method]):  # the hand-over point is a point of the curve
            evaluate(run_dir / "final", args.train_tasks, base / f"stage{i}_end_eval.json", args)
        done_steps += steps
        model = str(run_dir / "final")
    final = evaluate(Path(model), [*args.train_tasks, *args.ood], base / "final_eval.json", args, k=args.k)
    return {"method": method, "seed": seed, "stages": stages, "final": final,
            "curve": curve(base, stages, args), "train_seconds": train_seconds(stages),
            "sft_fraction": sft_fraction(stages, args)}


def id_mean(res: dict, tasks: list[str], key: str = "pass@1") -> float:
    return statistics.fmean(res[t][key] for t in tasks)


def curve(base: Path, stages: list[dict], args) -> list[tuple[int, float]]:
    """(step, mean greedy pass@1 over the training families) at each evaluation, the start included."""
    points = [(0, id_mean(json.loads((Path(args.out) / "base_eval.json").read_text()), args.train_tasks))]
    for i, st in enumerate(stages):
        for path in sorted(Path(st["dir"]).glob("eval_step_*.json")):
            step = int(path.stem.rsplit("_", 1)[1])
            points.append((st["first_step"] + step, id_mean(json.loads(path.read_text()), args.train_tasks)))
        end = base / f"stage{i}_end_eval.json"
        if end.is_file():
            points.append((st["first_step"] + st["steps"], id_mean(json.loads(end.read_text()), args.train_tasks)))
    final = json.loads((base / "final_eval.json").read_text())
    points.append((sum(st["steps"] for st in stages), id_mean(final, args.train_tasks)))
    return points


def train_seconds(stages: list[dict]) -> float:
    return sum(r.get("time/step", 0.0) for st in stages for r in read_metrics(Path(st["dir"])))


def sft_fraction(stages: list[dict], args) -> dict[str, list[float]]:
    """Fraction of prompts trained by SFT per task, averaged over each fifth of the run (HPT only)."""
    rows = [r for st in stages if st["objective"] == "hpt" for r in read_metrics(Path(st["dir"]))]
    out = {}
    for task in ["all", *args.train_tasks]:
        key = "hpt/sft_fraction" if task == "all" else f"hpt/sft_fraction/{task}"
        values = []
        for p in range(5):
            part = [r[key] for r in rows[p * len(rows) // 5:(p + 1) * len(rows) // 5] if isinstance(r.get(key), float)]
            values.append(statistics.fmean(part) if part else math.nan)
        out[task] = values
    return out


def mean_spread(values: list[float]) -> str:
    """mean ± sample standard deviation over seeds, in points (%)."""
    m = 100 * statistics.fmean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def table(records: list[dict], base: dict, args) -> str:
    cols = [(t, "pass@1") for t in args.train_tasks] + [("id", "pass@1"), ("id", f"pass@{args.k}")]
    cols += [(t, key) for t in args.ood for key in ("pass@1", f"pass@{args.k}")]
    names = [f"{t} {key}" if t != "id" else f"in-dist. mean {key}" for t, key in cols]
    lines = ["| method | seeds | " + " | ".join(names) + " | train min |", "|" + " --- |" * (len(cols) + 3)]

    def value(res: dict, t: str, key: str) -> float:
        return id_mean(res, args.train_tasks, key) if t == "id" else res[t][key]

    lines.append("| start checkpoint | – | " + " | ".join(f"{100 * value(base, t, key):.1f}" for t, key in cols)
                 + " | – |")
    for method in METHODS:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        cells = [mean_spread([value(r["final"], t, key) for r in rs]) for t, key in cols]
        minutes = statistics.fmean(r["train_seconds"] for r in rs) / 60
        lines.append(f"| `{method}` | {len(rs)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines)


def curve_table(records: list[dict], args) -> str:
    steps = sorted({s for r in records for s, _ in r["curve"]})
    lines = ["| method | " + " | ".join(f"{s * args.prompts_per_step}" for s in steps) + " |",
             "|" + " --- |" * (len(steps) + 1)]
    for method in METHODS:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        cells = []
        for s in steps:
            vals = [v for r in rs for st, v in r["curve"] if st == s]
            cells.append(f"{100 * statistics.fmean(vals):.1f}" if len(vals) == len(rs) else "")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fraction_table(records: list[dict], args) -> str:
    lines = ["| method | task | " + " | ".join(f"fifth {p + 1}" for p in range(5)) + " |", "|" + " --- |" * 7]
    for method in METHODS:
        rs = [r for r in records if r["method"] == method and METHODS[method][0][0] == "hpt"]
        for task in ["all", *args.train_tasks] if rs else []:
            cells = [f"{statistics.fmean(r['sft_fraction'][task][p] for r in rs):.2f}" for p in range(5)]
            lines.append(f"| `{method}` | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(records: list[dict], args, doc: Path) -> list[str]:
    """Accuracy-vs-budget and HPT's SFT fraction as PNGs next to the doc; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in METHODS:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        steps = sorted({s for r in rs for s, _ in r["curve"]})
        ys = [statistics.fmean(v for r in rs for st, v in r["curve"] if st == s) for s in steps]
        ax.plot([s * args.prompts_per_step for s in steps], [100 * y for y in ys], marker="o", ms=3, label=method)
    ax.set_xlabel("training prompts seen")
    ax.set_ylabel("held-out greedy pass@1, in-distribution mean (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    names = ["hpt_accuracy_vs_budget.png"]
    fig.savefig(doc.parent / names[0], dpi=110)
    plt.close(fig)

    hpt = [m for m in METHODS if METHODS[m][0][0] == "hpt" and any(r["method"] == m for r in records)]
    if hpt:
        fig, axes = plt.subplots(1, len(hpt), figsize=(4 * len(hpt), 3.4), sharey=True, squeeze=False)
        for ax, method in zip(axes[0], hpt, strict=True):
            rs = [r for r in records if r["method"] == method]
            for task in args.train_tasks:
                ys = [statistics.fmean(r["sft_fraction"][task][p] for r in rs) for p in range(5)]
                ax.plot(range(1, 6), ys, marker="o", ms=3, label=task)
            ax.set_title(method, fontsize=9)
            ax.set_xlabel("fifth of the run")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("fraction of prompts on SFT")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        names.append("hpt_sft_fraction.png")
        fig.savefig(doc.parent / names[1], dpi=110)
        plt.close(fig)
    return names


def write_doc(records: list[dict], base: dict, args) -> None:
    doc = Path(args.doc)
    images = plots(records, args, doc)
    cmd = " ".join(["python examples/hpt_study/run.py", f"--steps {args.steps}", "--seeds",
                    *map(str, args.seeds), f"--parallel {args.parallel}", *args.overrides])
    text = [
        "# HPT against SFT, GRPO, SFT→GRPO and LUFFY at an equal budget",
        "",
        f"Measured with `{cmd}` on {platform.machine()} / {platform.system()}, Python "
        f"{platform.python_version()}, 2 CPU cores; {time.strftime('%Y-%m-%d')}.",
        "",
        f"Every method starts from `{args.model}` and gets {args.steps} optimizer steps of "
        f"{args.prompts_per_step} training prompts ({args.steps * args.prompts_per_step} prompts) drawn by the same "
        f"seeded uniform sampler from {', '.join(args.train_tasks)}; SFT→GRPO spends half on each. "
        f"Out of distribution: {', '.join(args.ood)} (never trained on). Held-out pass@1 is greedy, "
        f"pass@{args.k} samples {args.k} completions at temperature 1; {args.prompts} prompts per task; in %, "
        f"mean ± standard deviation over {len(args.seeds)} seeds. `train min` is the mean training time of a run "
        f"({args.parallel} runs at a time, one thread each).",
        "",
        table(records, base, args),
        "",
        "Accuracy against budget (in-distribution mean greedy pass@1, %, mean over seeds; columns are training "
        "prompts seen):",
        "",
        curve_table(records, args),
        "",
        f"![accuracy vs budget]({images[0]})",
        "",
        "Fraction of prompts HPT sent to SFT, per task, averaged over each fifth of the run and over seeds:",
        "",
        fraction_table(records, args),
        "",
        *([f"![HPT SFT fraction]({images[1]})", ""] if len(images) > 1 else []),
        "Config (`examples/hpt_study/study.yaml`):",
        "",
        "```yaml",
        CONFIG.read_text().rstrip(),
        "```",
        "",
    ]
    write_page(doc, "\n".join(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per method (the budget)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--points", type=int, default=6, help="evaluations along each run, for the curves")
    ap.add_argument("--ood", nargs="+", default=["table_qa"], help="held-out task families (not trained on)")
    ap.add_argument("--prompts", type=int, default=100, help="held-out prompts per task")
    ap.add_argument("--k", type=int, default=8, help="pass@k of the final evaluation")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once, one torch thread each")
    ap.add_argument("--out", default="runs/hpt_study")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "hpt.md"))
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run (e.g. model.name=PATH)")
    args = ap.parse_args()
    cfg = yaml.safe_load(CONFIG.read_text())
    given = dict(o.split("=", 1) for o in args.overrides)
    args.model = given.pop("model.name", cfg["model"]["name"])
    args.overrides = [f"{k}={v}" for k, v in given.items()]
    args.train_tasks = cfg["tasks"]
    args.prompts_per_step = int(given.get("prompts_per_step", cfg["prompts_per_step"]))
    args.max_new_tokens = int(given.get("rollout.max_new_tokens", cfg["rollout"]["max_new_tokens"]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = evaluate(args.model, [*args.train_tasks, *args.ood], Path(args.out) / "base_eval.json", args, k=args.k)

    units = [(m, s) for s in args.seeds for m in args.methods]  # seed-major: a cut-off study has whole seeds
    records: list[dict] = []
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = [pool.submit(run_unit, m, s, args, args.overrides) for m, s in units]
        for (method, seed), future in zip(units, futures, strict=True):
            try:
                records.append(future.result())
            except subprocess.CalledProcessError as err:
                raise SystemExit(f"{method} seed {seed} failed ({err}); see its stage*.log under "
                                 f"{Path(args.out) / slug(method)}") from None
            print(f"{method} seed {seed}: in-dist. pass@1 {100 * id_mean(records[-1]['final'], args.train_tasks):.1f}",
                  flush=True)
            (Path(args.out) / "records.json").write_text(json.dumps(records, indent=1))
            write_doc(records, base, args)  # rewritten as results arrive: a cut-off study keeps what it has


if __name__ == "__main__":
    main()
