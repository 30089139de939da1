"""`unigrad study` (a seeded study file: its runs and its page) and `unigrad tune` (its tuned values, chosen on the
validation split)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unigrad.cli.arguments import at_least


def add_study(sub) -> None:
    """The `unigrad study` command and its options."""
    st = sub.add_parser("study", help="run a study file (arms x seeds at fixed steps, held-out evaluation) and write "
                        "its docs page with intervals over seeds; resumes what a cut-off study left")
    st.add_argument("file", help="the study's YAML file (examples/studies/*.yaml)")
    st.add_argument("--seeds", type=at_least(1, "the number of seeds"), help="seeds 0..N-1 (default: the file's)")
    st.add_argument("--steps", type=at_least(1, "the rollout steps per run"),
                    help="rollout steps per run (default: the file's; a smaller number is a smoke test, not the study)")
    st.add_argument("--parallel", type=at_least(1, "the runs at once"),
                    help="runs at once, one torch thread each (default: the file's)")
    st.add_argument("--out", help="where the runs go (default: runs/studies/<file name>; with --steps N other than "
                    "the file's: runs/studies/<file name>-stepsN)")
    st.add_argument("--doc-root", help="the page is written at DOC_ROOT/<the file's doc> (default: the current "
                    "directory; OUT/page when --steps or --seeds differ from the file's)")
    st.add_argument("--page-only", action="store_true", help="write the page from the runs there, train nothing")
    st.set_defaults(func=_study)


def _study(args: argparse.Namespace) -> int:
    import time

    from pydantic import ValidationError

    from unigrad.report.seeded_study import Study
    from unigrad.report.study_checks import compact, refuse_other_settings, refuse_page_without_results
    from unigrad.report.study_page import write_study_page
    from unigrad.report.tuning_record import load_tuned_study, refuse_untuned

    try:
        spec, _ = load_tuned_study(args.file)  # with a tuning record: each arm at its value picked on validation
        other_steps = args.steps is not None and args.steps != spec.steps
        smoke = other_steps or (args.seeds is not None and args.seeds != spec.seeds)  # not the study the file pins
        if spec.retired and not args.page_only:
            why = spec.retired.strip().rstrip(".")
            raise ValueError(f"{args.file} is retired ({why}); it is not run again (--page-only rewrites its page "
                             "from the runs it left)")
        if not (smoke or args.page_only):
            refuse_untuned(spec, args.file)
        out = Path(args.out or Path("runs") / "studies" / (Path(args.file).stem
                                                           + (f"-steps{args.steps}" if other_steps else "")))
        study = Study(spec, out, seeds=args.seeds, steps=args.steps, parallel=args.parallel)
        refuse_other_settings(study)  # runs left there by a smoke run or an edited study file: never reused
        if args.page_only:
            refuse_page_without_results(study)
    except ValidationError as err:  # --seeds, --steps, --parallel out of the study file's bounds
        print(f"unigrad study: {compact(err, Path(args.file))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"unigrad study: {err}", file=sys.stderr)
        return 2
    started = time.time()
    if not args.page_only:
        try:
            study.run()
        except (RuntimeError, ValueError) as err:  # a run that failed, runs left with other settings
            print(f"unigrad study: {err}", file=sys.stderr)
            return 1
    command = " ".join(["unigrad study", args.file, *(f"--seeds {args.seeds}" for _ in [0] if args.seeds),
                        *(f"--steps {args.steps}" for _ in [0] if args.steps)])
    # a smoke-size run never writes the real docs page unless asked to (--doc-root)
    root = Path(args.doc_root) if args.doc_root is not None else out / "page" if smoke else Path(".")
    page = write_study_page(study, command, root, None if args.page_only else (time.time() - started) / 60)
    print(f"study: wrote {page}" + (" (--steps / --seeds differ from the study file's: a smoke run, so not the docs "
                                    "page; --doc-root . writes that)" if smoke and args.doc_root is None else ""))
    return 0


def add_tune(sub) -> None:
    """The `unigrad tune` command and its options."""
    tu = sub.add_parser("tune", help="choose a study's tuned value (its tuning: section, e.g. optim.lr) on the "
                        "validation split: runs the grid, writes its table and the record `unigrad study` reads")
    tu.add_argument("file", help="the study's YAML file, with a tuning: section")
    tu.add_argument("--out", help="where the tuning runs go (default: runs/studies/<file name>-tuning)")
    tu.add_argument("--doc-root", default=".", help="the table is written at DOC_ROOT/docs/studies/<name>_tuning.md "
                    "(default: the current directory)")
    tu.add_argument("--parallel", type=at_least(1, "the runs at once"),
                    help="runs at once, one torch thread each (default: the file's)")
    tu.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from unigrad.report.seeded_study import load_study
    from unigrad.report.study_checks import compact
    from unigrad.report.tuning import tune

    try:
        spec = load_study(args.file)
        if spec.retired:
            why = spec.retired.strip().rstrip(".")
            raise ValueError(f"{args.file} is retired ({why}); it is not tuned or run again")
        if args.parallel is not None:
            spec = type(spec).model_validate({**spec.model_dump(), "parallel": args.parallel})
            spec._source = Path(args.file)
        out = Path(args.out or Path("runs") / "studies" / f"{Path(args.file).stem}-tuning")
        table, record = tune(spec, Path(args.file), out, Path(args.doc_root))
    except ValidationError as err:
        print(f"unigrad tune: {compact(err, Path(args.file))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"unigrad tune: {err}", file=sys.stderr)
        return 2 if isinstance(err, (FileNotFoundError, ValueError)) else 1
    print(f"tune: wrote {table} and {record}; `unigrad study {args.file}` now trains with these values")
    return 0
