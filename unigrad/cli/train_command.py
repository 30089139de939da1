"""`unigrad train`: a run from a config file and key=value settings, new or resumed, in one process or
several."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_train(sub) -> None:
    """The `unigrad train` command and its options."""
    from unigrad.config import config_help

    t = sub.add_parser("train", help="post-train a model (default: the embedded unigrad-tiny)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (set in the YAML file or as key=value; sections as section.key=value):\n"
                              + config_help())
    t.add_argument("items", nargs="*", metavar="[CONFIG] key=value",
                   help="an optional YAML config, then dotted overrides such as objective=dapo rollout.temperature=0.8")
    t.add_argument("--output-dir", help="run directory (default: runs/<objective>-seed<seed>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint, "
                   "with its own config (settings that differ from it are refused)")
    t.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="with --resume: change max_steps, max_minutes, logging, eval.* or monitors.* of the run")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (torchrun; or launch with torchrun / accelerate)")
    t.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from unigrad.config import ConfigError, load_config
    from unigrad.sandbox import JailUnavailable, SandboxError
    from unigrad.train.lifecycle.interrupts import RunInterrupted, RunStopped
    from unigrad.train.lifecycle.run import train

    try:
        config_path, overrides = _config_and_settings(args.items)
        cfg = load_config(config_path, overrides)
        output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / f"{cfg.objective}-seed{cfg.seed}"
        _check_config_file_kept(config_path, output_dir, args.resume)
        if args.override and not args.resume:
            raise ConfigError("--override is for --resume (a new run takes its settings as key=value)")
        if args.resume:
            cfg = _resumed_config(output_dir, cfg if config_path or overrides else None, args.override or [])
    except ConfigError as err:
        print(f"unigrad train: {err}", file=sys.stderr)
        return 2
    if args.nproc > 1:  # refused before any process starts (train() checks again under torchrun or accelerate)
        from unigrad.train.lifecycle.feasibility import check_processes

        try:
            check_processes(cfg, args.nproc)
        except ConfigError as err:
            print(f"unigrad train: {err}", file=sys.stderr)
            return 2
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # start N processes of this same command
        import subprocess

        argv = ["train", *args.items, "--output-dir", str(output_dir), *(["--resume"] if args.resume else []),
                *[f"--override={item}" for item in args.override or []]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "unigrad.cli", *argv]
        return subprocess.call(cmd)
    try:
        train(cfg, output_dir, resume=args.resume)
    except (FileExistsError, ConfigError, JailUnavailable, SandboxError) as err:
        print(f"unigrad train: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"unigrad train: {err}", file=sys.stderr)
        return 3
    except RunInterrupted as err:  # the conventional 128 + signal
        print(f"unigrad train: {err}", file=sys.stderr)
        return 128 + err.signal
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(f"unigrad train: interrupted; continue from the last checkpoint with: unigrad train --output-dir "
              f"{output_dir} --resume", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a directory without write permission: the path and what to do
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"unigrad train: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    print(f"run directory: {output_dir}  (trained model in {output_dir / 'final'})")
    return 0


def _config_and_settings(items: list[str]) -> tuple[str | None, list[str]]:
    """`unigrad train`'s words as (config file or None, key=value settings); ConfigError for `key = value` (spaces
    around '=') and for a config file given after the settings."""
    from unigrad.config import ConfigError

    for i, item in enumerate(items):
        spaced = None
        if item == "=" or item.startswith("="):  # `key = value` or `key =value`
            spaced = (items[i - 1] if i else "KEY") + "=" + (item[1:] or (items[i + 1] if i + 1 < len(items) else ""))
        elif item.endswith("=") and i + 1 < len(items) and "=" not in items[i + 1]:  # `key= value`
            spaced = item + items[i + 1]
        if spaced is not None:
            raise ConfigError(f"settings are written without spaces around '=': write {spaced}, not "
                              f"{spaced.replace('=', ' = ', 1)}")
    config_path = items[0] if items and "=" not in items[0] else None
    overrides = items[1:] if config_path is not None else list(items)
    for item in overrides:
        if "=" in item:
            continue
        if config_path is None and (Path(item).suffix in (".yaml", ".yml") or Path(item).is_file()):
            order = " ".join([item, *(o for o in overrides if o != item)])
            raise ConfigError(f"the config file {item} must come first, before the key=value settings: "
                              f"unigrad train {order}")
        raise ConfigError(f"{item!r} is not a key=value setting (one config file may be given, first"
                          + (f"; {config_path} is it)" if config_path else ")"))
    return config_path, overrides


def _check_config_file_kept(config_path: str | None, output_dir: Path, resume: bool) -> None:
    """A new run saves its resolved config as OUTPUT_DIR/config.yaml: refuse when that is the config file given
    (the user's file, comments and all, would be overwritten). A resumed run's config.yaml is its own."""
    from unigrad.config import ConfigError

    saved = output_dir / "config.yaml"
    if config_path is None or resume or not saved.is_file() or not saved.samefile(config_path):
        return
    raise ConfigError(f"the config file {config_path} is where the run would save its resolved config "
                      f"({saved}), overwriting it; choose another --output-dir (e.g. {output_dir / 'run'}), or "
                      "keep the config file outside the run directory")


def _resumed_config(output_dir: Path, given, overrides: list[str]):
    """The config to continue `output_dir` with (unigrad.config.resume_config); a directory without a run is an
    error, not a fresh start."""
    from unigrad.config import ConfigError, load_run_config, resume_config

    if not (output_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {output_dir} holds no run (no config.yaml there); check the path, or start "
                          "a new run without --resume")
    return resume_config(load_run_config(output_dir), given, overrides, output_dir)
