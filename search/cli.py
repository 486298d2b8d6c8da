"""The ``squeeze`` command line (thin: parse arguments, compose the config, call the driver)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

import optuna
from rich.console import Console

from search._errors import ConfigError
from search.config import compose_config
from search.storage import mask_url

_EPILOG = """examples:
  squeeze sweep task=digits_mlp search.n_trials=30
  squeeze sweep task=mnist1d_cnn space.prune.amount='interval(0.5, 0.98)' search.sampler=nsga2
  squeeze sweep search.n_jobs=2 search.storage=postgresql+psycopg2://user@host/db
  squeeze worker search.storage=postgresql+psycopg2://user@host/db   # on another machine
  mlflow ui --backend-store-uri sqlite:///mlflow.db
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``squeeze`` console script; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="squeeze",
        description="Search for the best compressed version of a neural network.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser(
        "sweep",
        help="run (or continue) a multi-objective compression search",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker = commands.add_parser(
        "worker",
        help="join a running study (same overrides as its sweep) and run trials of its budget",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for command in (sweep, worker):
        command.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=mnist1d_cnn")
        command.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]  # overrides may come after --quiet
    console = Console(stderr=False)
    _setup_logging(args.quiet)
    try:
        if args.command == "sweep":
            return _sweep(args, console)
        if args.command == "worker":
            return _worker(args, console)
    except ConfigError as err:
        Console(stderr=True).print(
            f"[bold red]squeeze: error:[/] {mask_url(err)}", highlight=False, markup=True
        )
        return 2
    return 1


def _sweep(args: argparse.Namespace, console: Console) -> int:
    from search.progress import SweepProgress, front_table
    from search.study import plan_sweep, run_sweep

    cfg = compose_config(args.overrides)
    plan_sweep(cfg)  # fail on bad input before anything is created
    if args.quiet:
        result = run_sweep(cfg)
    else:
        with SweepProgress(cfg.search.n_trials, console=console) as progress:
            result = run_sweep(cfg, callbacks=[progress])
    console.print(
        front_table(result.front, result.baseline, title=f"Pareto front of {result.study_name}")
    )
    counts = result.trials.state.value_counts().to_dict() if not result.trials.empty else {}
    console.print(
        f"{len(result.trials)} trials ({counts.get('COMPLETE', 0)} complete, "
        f"{counts.get('FAIL', 0)} failed, {counts.get('PRUNED', 0)} pruned); "
        f"MLflow parent run {result.parent_run_id}; files in {result.artifacts[0].parent}",
        highlight=False,
    )
    return 0


def _worker(args: argparse.Namespace, console: Console) -> int:
    from search.study import plan_sweep, run_worker

    cfg = compose_config(args.overrides)
    plan_sweep(cfg)
    count = run_worker(cfg)
    console.print(
        f"worker ran {count} trial(s) of study {cfg.search.study_name}; the budget of "
        f"{cfg.search.n_trials} is spent",
        highlight=False,
    )
    return 0


class _MaskPasswords(logging.Filter):
    """Masks the password of any URL in a log line (third-party libraries log URLs too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_url(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def _setup_logging(quiet: bool) -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_MaskPasswords())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
