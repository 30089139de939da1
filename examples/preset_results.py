"""Train the default tiny model with several presets under the same time budget; write docs/results.md.

    python examples/preset_results.py --minutes 10            # grpo dr_grpo dapo gspo sapo hpt
    python examples/preset_results.py --presets grpo --minutes 2 --doc /tmp/r.md
    python examples/preset_results.py --presets grpo gspo --seeds 0 1 2   # the spread of one run, per preset

Each preset runs alone (sequentially: the machine has 2 cores) through the real CLI with
examples/default.yaml, `max_minutes` as the training budget, and greedy held-out evaluation on
`eval.prompts_per_task` prompts per task before and after.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from unigrad.eval import paired_gain
from unigrad.report.study import write_page

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["grpo", "dr_grpo", "dapo", "gspo", "sapo", "hpt"]


def run_name(preset: str, seed: int | None) -> str:
    return preset if seed is None else f"{preset}-seed{seed}"


def start(preset: str, seed: int | None, minutes: float, out: Path, extra: list[str]) -> subprocess.Popen | None:
    """Launch one preset's run (None if it already finished). `seed` None: the config's seed."""
    name = run_name(preset, seed)
    run_dir = out / name
    if (run_dir / "eval_after.json").is_file():
        return None
    cmd = [sys.executable, "-m", "unigrad.cli", "train", str(ROOT / "examples" / "default.yaml"), f"objective={preset}",
           f"max_minutes={minutes}", *extra, *([f"seed={seed}"] if seed is not None else []),
           "--output-dir", str(run_dir)]
    if (run_dir / "metrics.jsonl").exists():
        cmd.append("--resume")
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def collect(preset: str, seed: int | None, out: Path) -> dict:
    run_dir = out / run_name(preset, seed)
    t0 = run_dir.stat().st_mtime
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    batches = sum(1 for _ in (run_dir / "metrics.jsonl").open())  # one line per generated batch
    iterations = yaml.safe_load((run_dir / "config.yaml").read_text()).get("num_iterations", 1)
    train_s = sum(json.loads(line)["time/step"] for line in (run_dir / "metrics.jsonl").open())
    return {"preset": preset, "seed": seed, "before": before,
            "after": after, "batches": batches, "steps": batches * iterations, "train_seconds": train_s,
            "finished": time.strftime("%H:%M:%S", time.localtime(t0))}


def mean_gain(r: dict) -> float:
    return 100 * (r["after"]["mean"]["pass@1"] - r["before"]["mean"]["pass@1"])


def seed_summary(results: list[dict]) -> str:
    """Per preset over its seeds: each seed's mean gain, their average and standard deviation, rows meeting the bar."""
    lines = ["| preset | seeds | mean gain per seed | average | sd | runs meeting the bar |", "|" + " --- |" * 6]
    for preset in dict.fromkeys(r["preset"] for r in results):
        rows = [r for r in results if r["preset"] == preset]
        gains = [mean_gain(r) for r in rows]
        avg = sum(gains) / len(gains)
        sd = (sum((g - avg) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5 if len(gains) > 1 else float("nan")
        met = sum(bar_met(r) for r in rows)
        lines.append(f"| `{preset}` | {', '.join(str(r['seed']) for r in rows)} | "
                     f"{', '.join(f'{g:+.1f}' for g in gains)} | {avg:+.1f} | {sd:.1f} | {met} of {len(rows)} |")
    return "\n".join(lines)


def worst_task_change(r: dict) -> float:
    # Rounded: pass@1 is a count over the prompts stored as float32, so a fall of exactly 2 points can come
    # out as -2.0000001 and would fail "no task below -2" by float noise alone.
    tasks = [t for t in r["before"] if t != "mean"]
    return round(min(100 * (r["after"][t]["pass@1"] - r["before"][t]["pass@1"]) for t in tasks), 4)


def bar_met(r: dict) -> bool:
    return round(mean_gain(r), 4) >= 10 and worst_task_change(r) >= -2


def table(results: list[dict]) -> str:
    tasks = [t for t in results[0]["before"] if t != "mean"]
    head = ("| preset | batches | optimizer steps | train min | " + " | ".join(tasks)
            + " | mean | min task change | bar met |")
    lines = [head, "|" + " --- |" * (len(tasks) + 7)]
    for r in results:
        cells = []
        for t in [*tasks, "mean"]:
            b, a = 100 * r["before"][t]["pass@1"], 100 * r["after"][t]["pass@1"]
            cells.append(f"{b:.1f} → {a:.1f} ({a - b:+.1f})")
        # Runs from before 2026-11-27 saved no per-prompt results, so no standard error for them.
        if all("correct" in r[side][t] for side in ("before", "after") for t in tasks):
            _, se = paired_gain(r["before"], r["after"])
            cells[-1] = cells[-1][:-1] + f" ± {100 * se:.1f})"
        batches = r.get("batches", r["steps"])
        label = r["preset"] + (f"` seed {r['seed']}" if r.get("seed") is not None else "`")
        lines.append(f"| `{label} | {batches} | {r['steps']} | {r['train_seconds'] / 60:.1f} | "
                     + " | ".join(cells) + f" | {worst_task_change(r):+.1f} | {'yes' if bar_met(r) else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--minutes", type=float, default=10.0, help="training-time budget per preset")
    ap.add_argument("--out", default="runs/preset_results")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--parallel", type=int, default=1,
                    help="presets trained at once, one torch thread each (the tiny model gains little from a "
                         "second thread, so 2 runs at a time each get about the steps of a run alone)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run each preset once per seed (runs named <preset>-seed<N>) and add a per-preset summary; "
                         "default: one run per preset at the config's seed")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    extra = [*args.overrides, *(["threads=1"] if args.parallel > 1 else [])]
    runs = [(p, s) for p in args.presets for s in (args.seeds or [None])]
    results = []
    for i in range(0, len(runs), args.parallel):
        batch = runs[i:i + args.parallel]
        procs = {(p, s): start(p, s, args.minutes, out, extra) for p, s in batch}
        for (preset, seed), proc in procs.items():
            if proc is not None and proc.wait() != 0:
                raise SystemExit(f"{run_name(preset, seed)} failed; see {out / (run_name(preset, seed) + '.log')}")
        for preset, seed in batch:  # the page is rewritten after every batch, so a cut-off study keeps what it has
            results.append(collect(preset, seed, out))
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_doc(args, results)
    print(table(results))
    if args.seeds:
        print(seed_summary(results))


def write_doc(args, results: list[dict]) -> None:
    cfg = (ROOT / "examples" / "default.yaml").read_text()
    tasks = [t for t in results[0]["before"] if t != "mean"]
    doc = [
        "# Results: presets on the default tiny model",
        "",
        f"Measured with `python examples/preset_results.py --minutes {args.minutes:g} --parallel {args.parallel}"
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
        + (" " + " ".join(args.overrides) if args.overrides else "") + "` on "
        f"{platform.machine()} / {platform.system()}, Python {platform.python_version()}, 2 CPU cores; "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Held-out greedy pass@1 (%) per task on {int(results[0]['before'][tasks[0]]['n'])} prompts, before → after "
        "(change; for the mean, ± its standard error over the draw of held-out prompts, `unigrad.eval.paired_gain`). "
        "`batches` = generated "
        "batches and `optimizer steps` = batches x `num_iterations`, done within the training budget; the budget "
        "excludes model loading and the two evaluations. `bar met`: the issue's acceptance bar, mean +10 points and "
        "no task below -2.",
        "",
        table(results),
        "",
        *([seed_summary(results), ""] if args.seeds else []),
        "Config (`examples/default.yaml`):",
        "",
        "```yaml",
        cfg.rstrip(),
        "```",
        "",
    ]
    write_page(Path(args.doc), "\n".join(doc))  # hand-written notes below the marker are kept


if __name__ == "__main__":
    main()
