"""Reference metrics: proof that a refactor changed no number a training run logs.

Six short reference runs on the embedded tiny model, each built from examples/default.yaml plus overrides, cover
the trainer's main routes: GRPO; HPT (the hybrid's SFT / RL switch); LUFFY (a demonstration in each group); SFT;
a two-epoch IcePop run with a bfloat16 rollout engine, a small KL term and PCGrad-combined task gradients; and
Dr. GRPO in micro-batches of 5 rows. Their metrics.jsonl, with the timing keys removed (wall times, throughputs:
the only numbers that differ between two runs of the same code), is the reference.

    python benchmarks/reference_metrics.py --save DIR      # run the six, write DIR/<name>/metrics.jsonl
    python benchmarks/reference_metrics.py --compare DIR   # run again; per run: identical, or the first
                                                           # differing key and step; exit 1 if any differ

To capture a baseline from an older commit, check it out elsewhere (git worktree add /tmp/base <commit>) and run
this script with PYTHONPATH=/tmp/base: the first line printed names the unigrad package actually imported.
Keys present on one side only are reported apart from changed values (new metrics are not a changed number);
they fail the comparison only with --strict-keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "default.yaml"

COMMON = ["max_steps=3", "prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=12",
          "tasks=[arithmetic,countdown]", "eval.before_after=false", "save_every=0", "tensorboard=false",
          "samples_per_step=1", "threads=1", "train_pool_size=50"]

REFERENCE_RUNS: dict[str, list[str]] = {
    "grpo": ["objective=grpo"],
    "hpt": ["objective=hpt"],
    "luffy": ["objective=luffy"],
    "sft": ["objective=sft"],
    "icepop_bf16_kl_pcgrad": ["objective=grpo_icepop", "num_iterations=2", "rollout.dtype=bfloat16",
                              "objective_args.beta=0.01", "gradients.combine=pcgrad"],
    "dr_grpo_micro5": ["objective=dr_grpo", "micro_batch_size=5"],
}

TIMING_PREFIXES = ("time/",)
TIMING_WORDS = ("per_s", "per_sec", "throughput", "wall", "seconds", "elapsed")


def is_timing(key: str) -> bool:
    """Wall-clock measurements: they differ between two runs of identical code."""
    return key.startswith(TIMING_PREFIXES) or any(word in key for word in TIMING_WORDS)


def without_timings(line: dict) -> dict:
    return {k: v for k, v in line.items() if not is_timing(k)}


def run_reference(name: str, out_dir: Path) -> list[dict]:
    """Train reference run `name` into a fresh directory; its metrics lines without timing keys."""
    from unigrad.config import load_config
    from unigrad.train.lifecycle.run import train

    cfg = load_config(EXAMPLE, [*COMMON, *REFERENCE_RUNS[name]])
    run_dir = out_dir / name
    train(cfg, run_dir, console=False)
    return [without_timings(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def first_difference(old: list[dict], new: list[dict]) -> tuple[str | None, list[str], list[str]]:
    """(the first changed value as 'step S key K: old -> new' or None, keys only in old, keys only in new)."""
    removed, added, changed = set(), set(), None
    if len(old) != len(new):
        changed = f"{len(old)} logged steps before, {len(new)} now"
    for a, b in zip(old, new, strict=False):
        removed |= set(a) - set(b)
        added |= set(b) - set(a)
        for key in a.keys() & b.keys():
            if a[key] != b[key] and changed is None:
                changed = f"step {a.get('step')} key {key}: {a[key]!r} -> {b[key]!r}"
    return changed, sorted(removed), sorted(added)


def _runs(names: list[str]):
    with tempfile.TemporaryDirectory(prefix="unigrad-reference-") as tmp:
        for name in names:
            started = time.perf_counter()
            lines = run_reference(name, Path(tmp))
            yield name, lines, time.perf_counter() - started


def save(target: Path, names: list[str]) -> int:
    for name, lines, seconds in _runs(names):
        (target / name).mkdir(parents=True, exist_ok=True)
        (target / name / "metrics.jsonl").write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
        print(f"{name}: {len(lines)} steps saved ({seconds:.1f} s)", flush=True)
    return 0


def compare(reference: Path, names: list[str], strict_keys: bool) -> int:
    failed = []
    for name, lines, seconds in _runs(names):
        path = reference / name / "metrics.jsonl"
        if not path.is_file():
            print(f"{name}: no reference at {path}")
            failed.append(name)
            continue
        old = [json.loads(x) for x in path.read_text().splitlines()]
        changed, removed, added = first_difference(old, lines)
        notes = (f"; keys only in the reference: {removed}" if removed else "") + \
                (f"; new keys: {added}" if added else "")
        if changed is None:
            print(f"{name}: identical values ({seconds:.1f} s){notes}", flush=True)
        else:
            print(f"{name}: DIFFERENT, first at {changed}{notes}", flush=True)
        if changed is not None or (strict_keys and (removed or added)):
            failed.append(name)
    print("reference metrics identical" if not failed else f"differing: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, metavar="DIR", help="run the references and write them to DIR")
    mode.add_argument("--compare", type=Path, metavar="DIR", help="run them again and compare with DIR")
    parser.add_argument("--only", nargs="+", choices=list(REFERENCE_RUNS), help="a subset of the runs")
    parser.add_argument("--strict-keys", action="store_true", help="added or removed keys also fail --compare")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import unigrad

    print(f"unigrad imported from {Path(unigrad.__file__).resolve().parent}", flush=True)
    names = args.only or list(REFERENCE_RUNS)
    if args.save is not None:
        return save(args.save, names)
    return compare(args.compare, names, args.strict_keys)


if __name__ == "__main__":
    sys.exit(main())
