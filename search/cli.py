"""The ``squeeze`` command line (thin: parse arguments, compose the config, call the driver)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from search._errors import ConfigError, SweepStopped
from search.cli_args import build_parser

if TYPE_CHECKING:  # imported where a command needs them: `squeeze --help` imports none of them
    import optuna
    from omegaconf import DictConfig
    from rich.console import Console


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``squeeze`` console script; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]  # overrides may come after --quiet
    from rich.console import Console

    console = Console(stderr=False)
    if not console.is_terminal:  # a file or a pipe: no line is folded (every recipe stays whole)
        console.width = _UNFOLDED
    _setup_logging(getattr(args, "quiet", False), verbose=args.verbose)
    restore = _catch_interrupts()
    try:
        if args.command == "sweep":
            return _sweep(args, console)
        if args.command == "export":
            return _export(args, console)
        if args.command == "run":
            return _run(args, console)
        if args.command == "report":
            return _report(args, console)
        if args.command == "explain":
            return _explain(args, console)
        if args.command == "inspect":
            return _inspect(args, console)
        if args.command == "sensitivity":
            return _sensitivity(args, console)
        if args.command == "worker":
            return _worker(args, console)
        if args.command == "ui":
            return _ui(args, console)
    except ConfigError as err:
        from rich.markup import escape

        from search.config.storage import mask_url

        Console(stderr=True).print(  # soft_wrap: paths and keys are never broken by newlines
            f"[bold red]squeeze: error:[/] {escape(mask_url(err))}",
            highlight=False,
            markup=True,
            soft_wrap=True,
        )
        return 2
    except SweepStopped as err:
        from search.config.storage import mask_url

        Console(stderr=True).print(
            f"squeeze: stopped: {mask_url(err)}", highlight=False, markup=False, soft_wrap=True
        )
        return 1
    except KeyboardInterrupt:
        again = " (rerun the same command to continue)" if args.command in _RESUMABLE else ""
        Console(stderr=True).print(f"squeeze: interrupted{again}", highlight=False)
        return 130
    except _baseline_cache_error() as err:  # (evaluated only when an error gets here)
        Console(stderr=True).print(f"squeeze: error: {err}", highlight=False, soft_wrap=True)
        return 1
    finally:
        restore()
    return 1


#: Console width when stdout is not a terminal: lines as long as they need.
_UNFOLDED = 100_000
#: Commands whose interrupted work a rerun continues.
_RESUMABLE = ("sweep", "worker")


def _catch_interrupts():
    """`search.run.interrupts.catch_interrupts` (Ctrl-C recorded, then raised; twice: exit)."""
    from search.run.interrupts import catch_interrupts

    return catch_interrupts()


def _compose(args: argparse.Namespace) -> DictConfig:
    from search.config.compose import compose_config

    return compose_config(args.overrides, config_dirs=args.config_dir)


def _load_study(plan) -> optuna.Study:
    import optuna

    from search.config.storage import open_storage

    return optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage))


def _sweep(args: argparse.Namespace, console: Console) -> int:
    """Run the sweep; exit code 1 (with the reason on stderr) if the study has no COMPLETE
    trial when it ends, else 0."""
    from search.config.plan import plan_sweep

    cfg = _compose(args)
    plan = plan_sweep(cfg)  # fail on bad input before anything is created (or torch imported)
    from rich.console import Console

    from search.results.reuse import recommend
    from search.run.budget import superseded
    from search.run.progress import SweepProgress, fidelity_summary, front_table, trial_recipes
    from search.run.recommend import baseline_note
    from search.run.study import run_sweep

    done, total = _finished_trials(plan), cfg.search.n_trials
    if done >= total:
        console.print(
            f"study {plan.study_name} already has {done}/{total} finished trials; nothing to run "
            "— raise search.n_trials to continue",
            highlight=False,
        )
    if args.quiet or done >= total:
        result = run_sweep(cfg)
    else:  # the bar and the log lines on stderr; the results on stdout
        epochs = plan.fidelity and plan.fidelity.n_epochs  # the bar counts them
        with SweepProgress(
            epochs or total,
            console=Console(stderr=True),
            done=_finished_trials(plan, epochs=True) if epochs else done,
            fidelity=plan.fidelity,
        ) as progress:
            result = run_sweep(cfg, callbacks=[progress], progress=progress.stage)
    pick = (
        None
        if result.front.empty
        else recommend(result.front, score=result.score, objectives=result.objectives)
    )
    study = _load_study(plan)
    console.print(
        front_table(
            result.front,
            result.baseline,
            title=f"Pareto front of {result.study_name}",
            recommended=None if pick is None else pick.trial,
            score=result.score,
            recipes=trial_recipes(study, plan.space),
        )
    )
    trials = study.get_trials(deepcopy=False)
    counts = result.trials.state.value_counts().to_dict() if not result.trials.empty else {}
    replaced = superseded(trials)
    rerun = len(replaced)
    console.print(
        f"{len(result.trials)} trials ({counts.get('COMPLETE', 0)} complete, "
        f"{counts.get('FAIL', 0) - rerun} failed, {counts.get('PRUNED', 0)} pruned"
        + (f", {rerun} interrupted or lost and run again" if rerun else "")
        + fidelity_summary(result.trials[~result.trials.trial.isin(replaced)], cfg.search)
        + f"); MLflow parent run {result.parent_run_id}; files in {result.artifacts[0].parent}",
        highlight=False,
    )
    if pick is not None and pick.note:
        console.print(f"recommended point (*): {pick.note}", highlight=False, markup=False)
    undertrained = baseline_note(result.trials, result.baseline, result.score)
    if undertrained:
        console.print(f"note: {undertrained}", highlight=False, markup=False)
    if pick is not None:
        _next_steps(console, result.study_name, pick, args)
    if counts.get("COMPLETE", 0):
        return 0
    return _no_trial_completed([t for t in trials if t.number not in replaced])


def _finished_trials(plan, *, epochs: bool = False) -> int:
    """Finished trials of the budget the study holds already (``epochs``: the fine-tuning
    epochs charged to them; 0 if there is no study yet; a journal file is not created by
    looking)."""
    from search.config.storage import is_url
    from search.run.budget import finished_in_budget, superseded

    if not is_url(plan.storage) and not Path(plan.storage).exists():
        return 0
    try:
        study = _load_study(plan)
    except KeyError:
        return 0
    trials = study.get_trials(deepcopy=False)
    if epochs:
        return plan.fidelity.epochs_finished(trials, superseded(trials))
    return finished_in_budget(trials)


def _next_steps(console: Console, study_name: str, pick, args: argparse.Namespace) -> None:
    """The recommended point of the front and the commands that export it and rerun it."""
    from search.results.reuse import next_commands

    budget = pick.score.within(pick.max_drop)
    best = "most accurate" if pick.score.higher_is_better else "best-scoring (lowest)"
    why = (
        f"the knee of the front {budget}"
        if pick.within_budget
        else f"no point is {budget}; this is the {best}"
    )
    console.print(
        f"* recommended: trial {pick.trial} ({why}). Export it, then rerun it, log it and "
        "register the model:",
        highlight=False,
    )
    lines = next_commands(
        study_name, pick.trial, config_dirs=args.config_dir, overrides=args.overrides
    )
    _password_note(console, args.overrides)
    for line in lines:
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


def _password_note(console: Console, overrides: Sequence[str]) -> None:
    """Which environment variables the printed commands read passwords from (they hold none)."""
    from search.results.reuse import password_variables

    variables = password_variables(overrides)
    if variables:
        console.print(
            f"  (they read passwords from the environment: set {', '.join(variables)} first, "
            f"e.g. export {variables[0]}=...)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _export(args: argparse.Namespace, console: Console) -> int:
    if args.format == "onnx":
        return _export_onnx(args, console)
    conf_dir = _writable_config_dir(args.config_dir)
    cfg = _compose(args)  # (a mistyped key is reported before torch is imported)
    from search.results.reuse import export_trial, run_command

    path = export_trial(
        cfg,
        args.study,
        pick=args.pick,
        max_drop=args.max_drop,
        name=args.name,
        conf_dir=conf_dir,
        force=args.force,
        config_dirs=args.config_dir,
        overrides=args.overrides,
    )
    run = run_command(path.stem, config_dirs=args.config_dir, overrides=args.overrides)
    console.print(f"wrote {path}; rerun it with: {run}", highlight=False, markup=False)
    _password_note(console, args.overrides)
    return 0


def _export_onnx(args: argparse.Namespace, console: Console) -> int:
    cfg = _compose(args)
    from compressors.onnx_export import OnnxExportError
    from search.results.reuse import export_onnx_trial
    from search.run.deploy import OnnxMismatchError

    try:
        result = export_onnx_trial(
            cfg,
            args.study,
            pick=args.pick,
            max_drop=args.max_drop,
            out=args.output and Path(args.output),
            force=args.force,
        )
    except (OnnxExportError, OnnxMismatchError) as err:
        Console(stderr=True).print(f"squeeze: error: {err}", highlight=False, markup=False)
        return 1
    deployed = result.deployed
    ops = ", ".join(f"{op} {n}" for op, n in sorted(deployed.export.ops.items()))
    console.print(
        f"wrote {deployed.path} (trial {result.trial}): {deployed.export.size_bytes:,} bytes; "
        f"its packed .sqz file: {result.packed_bytes:,} bytes\n"
        f"ONNX Runtime agrees with the torch model: {deployed.check.message}; validation score "
        f"{deployed.metrics['val_acc_onnx']:.4f}\nops: {ops}\nONNX Runtime session (as a "
        f"sweep times it): {_settings(deployed.threads)}",
        highlight=False,
        markup=False,
    )
    for note in deployed.export.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    return 0


def _settings(threads: dict) -> str:
    """An ONNX Runtime session's settings on one line."""
    return ", ".join(f"{key.removeprefix('ort.')} {value}" for key, value in threads.items())


def _run(args: argparse.Namespace, console: Console) -> int:
    cfg = _compose(args)
    from search.results.reuse import run_experiment

    result = run_experiment(cfg, alias=args.alias, config_dirs=args.config_dir)
    for key, value in result.metrics.items():
        expected = result.expected.get(key)
        same = (
            ""
            if expected is None
            else ("  (= the trial's)" if expected == value else f"  (trial: {expected:g})")
        )
        console.print(f"{key:18s} {value:g}{same}", highlight=False)
    console.print(
        f"MLflow run {result.run_id}; registered model '{result.model_name}' version "
        f"{result.version} as @{args.alias}; file {result.path}",
        highlight=False,
    )
    return 0


def _worker(args: argparse.Namespace, console: Console) -> int:
    from search.config.plan import plan_sweep

    cfg = _compose(args)
    plan_sweep(cfg)
    from search.run.study import run_worker

    finished: list[optuna.trial.FrozenTrial] = []
    count = run_worker(cfg, callbacks=[lambda _study, trial: finished.append(trial)])
    console.print(
        f"worker ran {count} trial(s) of study {cfg.search.study_name}; the budget of "
        f"{cfg.search.n_trials} is spent",
        highlight=False,
    )
    return _no_trial_completed(finished)


def _no_trial_completed(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """1, with the reason on stderr, if there are trials and none completed; else 0."""
    from rich.console import Console
    from rich.markup import escape

    from search.failures import no_trial_completed

    line = no_trial_completed(trials)
    if line is None:
        return 0
    Console(stderr=True).print(
        f"[bold red]squeeze:[/] {escape(line)}. See fail_reason and fail_traceback of the "
        "trials in Optuna, or traceback.txt of their MLflow runs.",
        highlight=False,
        soft_wrap=True,
    )
    return 1


def _report(args: argparse.Namespace, console: Console) -> int:
    cfg = _compose(args)
    from search.results.report import build_report

    report = build_report(cfg, args.study)
    console.print(
        f"wrote {len(report.files)} files to {report.folder} (open report.html)"
        + (f"; logged to MLflow run {report.parent_run_id}" if report.parent_run_id else ""),
        highlight=False,
    )
    return 0


def _explain(args: argparse.Namespace, console: Console) -> int:
    """``squeeze explain``: print the trial's explanation; its files are written
    under ``<output_dir>/<study>/explain/`` and logged to the trial's MLflow run."""
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be a positive int. Got {args.samples} instead.")
    if args.trial is not None and args.pick is not None:
        raise ConfigError(
            f"--trial {args.trial} and --pick {args.pick}: give one of them (a trial's number, "
            "or a front point chosen as export chooses it)"
        )
    cfg = _compose(args)
    from search.results.explain import console_tables, explain_trial

    trial = args.trial
    if trial is None:  # a front point, as `squeeze export --pick` chooses it
        from search.results._study import load_study
        from search.results.reuse import pick_trial

        trial = pick_trial(load_study(cfg, args.study), args.pick or "recommended").number
    explanation = explain_trial(
        cfg,
        args.study,
        trial,
        attributions=not args.no_attributions,
        samples=args.samples,
    )
    for renderable in console_tables(explanation):
        console.print(renderable, highlight=False)
    folder = explanation.files[0].parent if explanation.files else None
    console.print(
        f"wrote {len(explanation.files)} files to {folder}"
        + (f"; logged to MLflow run {explanation.run_id}" if explanation.run_id else ""),
        highlight=False,
    )
    return 0


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from search.config.plan import plan_sweep

    plan = plan_sweep(_compose(args))
    import pandas as pd

    from experiments.analysis import class_balance, dataset_summary, model_summary
    from search.config.score import Score
    from search.config.space import claims_table
    from search.run.workload import build_task

    task = build_task(plan)
    with _wide():
        n = task.num_classes
        what = {  # (a regression's num_classes is its output's width, not classes)
            "logits": f"{n} classes",
            "multilabel": f"{n} labels",
            "embeddings": f"embeddings (num_classes={n}: their width)",
            "values": f"a regression (outputs='values', num_classes={n}: the output's width)",
        }[task.outputs]
        console.print(
            f"task {task.name}: {what}; {Score.of_task(task).describe()}", highlight=False
        )
        console.print(dataset_summary(task).to_string(float_format="%.4f"), highlight=False)
        if task.outputs == "multilabel":
            console.print("\nsamples with each label:", highlight=False)
            console.print(class_balance(task).to_string(float_format="%g"), highlight=False)
        if task.outputs == "logits":
            labels = "\nlabels per class (one per sample, or per labelled position):"
            console.print(labels, highlight=False)
            console.print(class_balance(task).to_string(float_format="%g"), highlight=False)
        console.print("\nmodel:", highlight=False)
        model = task.build_model()
        summary = model_summary(model, *task.example_batch(1))
        console.print(summary.to_string(index=False), highlight=False)
        console.print(
            "\nparameter tensors and the compressors that act on them "
            f"(pipelines of space '{plan.space.name}' last):",
            highlight=False,
        )
        table = pd.DataFrame(claims_table(model, task.example_inputs(), plan.space)).fillna("")
        console.print(table.to_string(index=False), highlight=False, soft_wrap=True)
    return 0


def _sensitivity(args: argparse.Namespace, console: Console) -> int:
    conf_dir = _writable_config_dir(args.config_dir)
    cfg = _compose(args)
    from search.results.sensitivity import run_sensitivity

    result = run_sensitivity(
        cfg, tolerance=args.tolerance, conf_dir=conf_dir, config_dirs=args.config_dir
    )
    table = result.table.pivot_table(
        index=["method", "setting"], columns="layer", values="val_drop", sort=False
    )
    lost = (
        "validation points lost"
        if result.score.higher_is_better
        else "validation score worse by, in % of the baseline's"
    )
    with _wide():
        console.print(f"{lost}, each layer alone:", highlight=False)
        console.print(table.to_string(float_format="%.1f"), highlight=False)
    console.print(f"plot {result.plot}; suggested space {result.space}", highlight=False)
    return 0


def _ui(args: argparse.Namespace, console: Console) -> int:
    """``squeeze ui``: MLflow's UI on the study's runs (`search.results.ui`)."""
    cfg = _compose(args)
    from search.results.ui import find_study, free_port, serve, server_base

    runs = find_study(cfg, args.study)

    def show(base: str) -> None:
        console.print(
            f"study {runs.study}: its trials (the Views menu has its Pareto front)\n"
            f"  {runs.url(base)}\nits Pareto front\n  {runs.url(base, front=True)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        console.file.flush()
        if args.open:
            import webbrowser

            webbrowser.open(runs.url(base))

    uri = str(cfg.tracking.uri)
    if (base := server_base(uri)) is not None:  # a tracking server: it serves the UI itself
        show(base)
        return 0
    port = args.port or free_port(args.host)
    return serve(uri, host=args.host, port=port, ready=show)


def _writable_config_dir(config_dirs: list[str]) -> Path:
    """Where a command that writes configs writes (`search.config.compose.writable_config_dir`); a
    ``--config-dir`` given is created if missing, so that it can be searched."""
    from search.config.compose import writable_config_dir

    folder = writable_config_dir(config_dirs)
    if config_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wide():
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 50)


class _MaskPasswords(logging.Filter):
    """Masks the password of any URL in a log line (third-party libraries log URLs too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from search.config.storage import mask_url

        message = record.getMessage()
        masked = mask_url(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def _setup_logging(quiet: bool, *, verbose: bool = False) -> None:
    from search.run.logs import OncePerRun, quiet_third_party

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, (_MaskPasswords, OncePerRun))]:
            handler.removeFilter(old)  # (an earlier command in this process)
        handler.addFilter(_MaskPasswords())
        if not verbose:  # a fact repeated by every trial is printed once
            handler.addFilter(OncePerRun())
    quiet_third_party(verbose=verbose)
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())


def _baseline_cache_error() -> type[Exception]:
    """`experiments.BaselineCacheError`, imported when an error needs it (not for ``--help``)."""
    from experiments import BaselineCacheError

    return BaselineCacheError
