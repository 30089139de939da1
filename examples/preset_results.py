"""Train the default tiny model with several presets under the same time budget; write docs/results.md.

    python examples/preset_results.py --minutes 10            # grpo dr_grpo dapo gspo sapo hpt
    python examples/preset_results.py --presets grpo --minutes 2 --doc /tmp/r.md

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


def start(preset: str, minutes: float, out: Path, extra: list[str]) -> subprocess.Popen | None:
    """Launch one preset's run (None if it already finished)."""
    run_dir = out / preset
    if (run_dir / "eval_after.json").is_file():
        return None
    cmd = [sys.executable, "-m", "unigrad.cli", "train", str(ROOT / "examples" / "default.yaml"), f"objective={preset}",
           f"max_minutes={minutes}", *extra, "--output-dir", str(run_dir)]
    if (run_dir / "metrics.jsonl").exists():
        cmd.append("--resume")
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(out / f"{preset}.log", "w"), stderr=subprocess.STDOUT)


def collect(preset: str, out: Path) -> dict:
    run_dir = out / preset
    t0 = run_dir.stat().st_mtime
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    batches = sum(1 for _ in (run_dir / "metrics.jsonl").open())  # one line per generated batch
    iterations = yaml.safe_load((run_dir / "config.yaml").read_text()).get("num_iterations", 1)
    train_s = sum(json.loads(line)["time/step"] for line in (run_dir / "metrics.jsonl").open())
    return {"preset": preset, "before": before, "after": after, "batches": batches, "steps": batches * iterations,
            "train_seconds": train_s,
            "finished": time.strftime("%H:%M:%S", time.localtime(t0))}


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
        if all("correct" in r[side][t] for side in ("before", "after") for t in tasks):  # runs from before 2026-11-27
            _, se = paired_gain(r["before"], r["after"])                                # saved no per-prompt results
            cells[-1] = cells[-1][:-1] + f" ± {100 * se:.1f})"
        # Rounded: pass@1 is a count over the prompts stored as float32, so a fall of exactly 2 points can come
        # out as -2.0000001 and would fail "no task below -2" by float noise alone.
        worst = round(min(100 * (r["after"][t]["pass@1"] - r["before"][t]["pass@1"]) for t in tasks), 4)
        mean_gain = round(100 * (r["after"]["mean"]["pass@1"] - r["before"]["mean"]["pass@1"]), 4)
        met = "yes" if mean_gain >= 10 and worst >= -2 else "no"
        batches = r.get("batches", r["steps"])
        lines.append(f"| `{r['preset']}` | {batches} | {r['steps']} | {r['train_seconds'] / 60:.1f} | "
                     + " | ".join(cells) + f" | {worst:+.1f} | {met} |")
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
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    extra = [*args.overrides, *(["threads=1"] if args.parallel > 1 else [])]
    results = []
    for i in range(0, len(args.presets), args.parallel):
        batch = args.presets[i:i + args.parallel]
        procs = {p: start(p, args.minutes, out, extra) for p in batch}
        for preset, proc in procs.items():
            if proc is not None and proc.wait() != 0:
                raise SystemExit(f"{preset} failed; see {out / (preset + '.log')}")
        for preset in batch:  # the page is rewritten after every batch, so a cut-off study keeps what it has
            results.append(collect(preset, out))
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_doc(args, results)
    print(table(results))


def write_doc(args, results: list[dict]) -> None:
    cfg = (ROOT / "examples" / "default.yaml").read_text()
    tasks = [t for t in results[0]["before"] if t != "mean"]
    doc = [
        "# Results: presets on the default tiny model",
        "",
        f"Measured with `python examples/preset_results.py --minutes {args.minutes:g} --parallel {args.parallel}"
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
