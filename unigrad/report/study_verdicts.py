"""The comparisons a study makes, tested together: each arm against its baseline and each further comparison of
the study file, seed-paired, with Holm's adjustment over all of them (`multiplicity.holm`). A verdict that an arm
differs from another needs its Holm-adjusted interval to exclude zero.

Run as `python -m unigrad.report.study_verdicts examples/studies/NAME.yaml` it recomputes the table from the
per-seed test accuracies printed on the study's committed page (its "Per seed (test pass@1)" line), without the
runs: how the verdicts of studies run before this table existed were rechecked."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from unigrad.report.multiplicity import Adjusted, holm

PER_SEED = re.compile(r"Per seed \(test pass@1\): (.+?)\.\s*$", re.MULTILINE)


def comparison_pairs(study) -> list[tuple[str, str]]:
    """(arm, other) for every arm with a baseline other than itself, then the file's further comparisons; a pair
    given twice is counted once."""
    pairs = [(arm, study.baseline_of(arm)) for arm in study.spec.arms
             if study.baseline_of(arm) not in (None, arm)]
    pairs += [(a, b) for a, b in study.spec.comparisons]
    return list(dict.fromkeys(pairs))


def paired_differences(scores: dict[str, list[float]], arm: str, other: str) -> list[float]:
    """Per-seed `arm` minus `other` over the seeds both have (NaN marks a seed without a result)."""
    for name in (arm, other):
        if name not in scores:
            raise ValueError(f"no per-seed results for arm {name!r}; arms with results: {', '.join(scores)}")
    return [x - y for x, y in zip(scores[arm], scores[other], strict=False) if math.isfinite(x) and math.isfinite(y)]


def adjusted_comparisons(pairs: list[tuple[str, str]], scores: dict[str, list[float]],
                         alpha: float = 0.05) -> list[Adjusted]:
    """Holm over the pairs, named "`arm` − `other`"."""
    return holm({f"`{a}` − `{b}`": paired_differences(scores, a, b) for a, b in pairs}, alpha)


def _interval(mean: float, half: float) -> str:
    return f"{mean:+.1f}" + (f" ± {half:.1f}" if math.isfinite(half) else "")


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def verdict_table(results: list[Adjusted]) -> list[str]:
    """Markdown lines: each comparison unadjusted (95%) and Holm-adjusted (at its level), with its verdict."""
    lines = ["| comparison | seeds | difference, 95% CI | p | Holm level | Holm-adjusted interval | adjusted p | "
             "after Holm |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        t = r.test
        verdict = ("excludes 0" if r.rejected else "includes 0") if t.n >= 2 else "one seed: not tested"
        lines.append(f"| {r.name} | {t.n} | {_interval(t.mean, r.half_width(False))} | {_p(t.p)} | "
                     f"{100 * r.level:.2f}% | {_interval(t.mean, r.half_width())} | {_p(r.p_adjusted)} | {verdict} |")
    return lines


def study_scores(study, split: str = "test") -> dict[str, list[float]]:
    """Per arm, test pass@1 (%) of seeds 0 .. seeds-1 (NaN where a seed has no evaluation)."""
    out = {}
    for arm in study.spec.arms:
        evals = [study.evaluation(arm, s, split) for s in range(study.spec.seeds)]
        out[arm] = [100 * e["mean"]["pass@1"] if e is not None else float("nan") for e in evals]
    return out


def holm_section(study, split: str = "test") -> list[str]:
    """The page's section: the study's comparisons on `split`, Holm-adjusted over all of them."""
    pairs = comparison_pairs(study)
    if not pairs:
        return []
    results = adjusted_comparisons(pairs, study_scores(study, split))
    return ["", f"The {len(pairs)} comparisons this study makes ({split} pass@1, percentage points, arm minus other, "
            "paired by seed), tested together with Holm's step-down adjustment: a difference is a finding only if "
            "its Holm-adjusted interval excludes zero.", "", *verdict_table(results)]


def scores_from_page(text: str) -> dict[str, list[float]]:
    """{arm: per-seed test pass@1 (%)} from a study page's "Per seed (test pass@1): a 1.0, 2.0; b 3.0, 4.0." line."""
    m = PER_SEED.search(text)
    if m is None:
        raise ValueError("the page has no 'Per seed (test pass@1): ...' line to read the seeds from")
    out = {}
    for part in m.group(1).split(";"):
        name, _, values = part.strip().partition(" ")
        out[name] = [float(v) for v in values.split(",")]
    return out


def main(argv: list[str]) -> int:
    from unigrad.report.seeded_study import Study, load_study

    if len(argv) != 1:
        print("usage: python -m unigrad.report.study_verdicts STUDY.yaml", file=sys.stderr)
        return 2
    spec = load_study(argv[0])
    page = Path(spec.doc)
    if not page.is_file():
        print(f"study_verdicts: {page} not found (run from the repository root)", file=sys.stderr)
        return 2
    study = Study(spec, Path("/nonexistent"))
    results = adjusted_comparisons(comparison_pairs(study), scores_from_page(page.read_text()))
    print("\n".join(verdict_table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
