"""The ``squeeze`` command's arguments: one parser, a sub-parser per command (no command runs
here; `search.cli` parses with it and calls the driver)."""

from __future__ import annotations

import argparse

_EPILOG = """examples:
  squeeze sweep task=digits_mlp search.n_trials=30
  squeeze sweep task=mnist1d_cnn space.prune.amount='interval(0.5, 0.98)' search.sampler=nsga2
  squeeze export --study digits_mlp --pick knee --max-drop 1.0
  squeeze run experiment=digits_mlp-t7
  squeeze explain --study digits_mlp               # the recommended point: bytes, flips
  squeeze sweep search.n_jobs=2 search.storage=postgresql+psycopg2://user@host/db
  squeeze worker search.storage=postgresql+psycopg2://user@host/db   # on another machine
  squeeze ui                                        # MLflow's UI on the study's runs
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``squeeze``: its commands, their options and their examples (``--help``)."""
    parser = argparse.ArgumentParser(
        prog="squeeze",
        description="Search for the best compressed version of a neural network.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = _command(commands, "sweep", "run (or continue) a multi-objective compression search")
    sweep.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=mnist1d_cnn")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    export = _command(
        commands,
        "export",
        "write a study's chosen trial as <config dir>/experiment/<name>.yaml (the last "
        "--config-dir, else ./conf of the current directory)",
    )
    export.add_argument("--study", required=True, help="study name (search.study_name)")
    export.add_argument(
        "--pick",
        default="recommended",
        help="recommended | knee | max-acc | min-size | trial=N (default: recommended, the "
        "point the sweep marked *: the knee within 1 validation point of the baseline)",
    )
    export.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="how much worse than the baseline on validation a point may be: points of a "
        "higher-is-better score, %% of the baseline's value for a lower-is-better one (MSE)",
    )
    export.add_argument("--name", default=None, help="experiment name (default: <study>-t<N>)")
    export.add_argument(
        "--format",
        choices=("config", "onnx"),
        default="config",
        help="config: the recipe as a Hydra experiment (default); onnx: the trial's model as an "
        "ONNX graph checked in ONNX Runtime",
    )
    export.add_argument(
        "--output", default=None, help="--format onnx: the .onnx path (default: <study>-t<N>.onnx)"
    )
    export.add_argument("--force", action="store_true", help="overwrite an existing file")
    export.add_argument("overrides", nargs="*", help="overrides naming storage and tracking")
    run = _command(
        commands, "run", "rerun an exported experiment, log it to MLflow and register the model"
    )
    run.add_argument("overrides", nargs="*", help="experiment=<name> and other overrides")
    run.add_argument("--alias", default="champion", help="model registry alias (champion)")
    report = _command(
        commands, "report", "trials table, plots, per-class metrics and an HTML page for a study"
    )
    report.add_argument("--study", required=True, help="study name (search.study_name)")
    report.add_argument("overrides", nargs="*", help="overrides naming storage and tracking")
    # squeeze explain: what compression changed in one trial
    explain = _command(
        commands,
        "explain",
        "what compression changed in a trial: bytes per layer, flipped predictions, "
        "attribution fidelity",
    )
    explain.add_argument("--study", required=True, help="study name (search.study_name)")
    explain.add_argument("--trial", default=None, help="a complete trial's number, or baseline")
    explain.add_argument(
        "--pick",
        default=None,
        help="or a front point, as export chooses it: recommended | knee | max-acc | min-size | "
        "trial=N (default, without --trial: recommended, the point the sweep marked *)",
    )
    explain.add_argument(
        "--samples", type=int, default=None, help="validation samples attributed (64; tokens 16)"
    )
    explain.add_argument(
        "--no-attributions", action="store_true", help="bytes and agreement only (fast)"
    )
    explain.add_argument("overrides", nargs="*", help="overrides naming storage and tracking")
    inspect = _command(commands, "inspect", "dataset analysis and model summary of a task")
    inspect.add_argument("overrides", nargs="*", help="e.g. task=mnist1d_cnn")
    sensitivity = _command(
        commands,
        "sensitivity",
        "prune / quantize each layer alone; plot it; write a per-layer space",
    )
    sensitivity.add_argument("overrides", nargs="*", help="e.g. task=mnist1d_cnn")
    sensitivity.add_argument(
        "--tolerance",
        type=float,
        default=1.0,
        help="how much worse on validation a layer may make the model: points, or %% of the "
        "baseline's value for a lower-is-better score (1.0)",
    )
    worker = _command(
        commands,
        "worker",
        "join a running study (same overrides as its sweep) and run trials of its budget",
    )
    worker.add_argument("overrides", nargs="*", help="the same overrides as its sweep")
    worker.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    ui = _command(commands, "ui", "start MLflow's UI and print the link to a study's runs table")
    ui.add_argument("--study", default=None, help="study name (default: the latest)")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (5000; 0: any free one)")
    ui.add_argument("--open", action="store_true", help="open the link in a web browser")
    ui.add_argument("overrides", nargs="*", help="overrides naming tracking (tracking.uri=...)")
    for command in (sweep, worker, export, run, report, explain, inspect, sensitivity, ui):
        command.add_argument(
            "--config-dir",
            action="append",
            default=[],
            help="another folder of config groups (task/, experiment/, ...) besides conf/",
        )
        command.add_argument(
            "--verbose", action="store_true", help="also the INFO lines of other libraries"
        )
    return parser


def _command(commands, name: str, help: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
