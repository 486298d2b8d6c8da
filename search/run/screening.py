"""Which part of its fine-tune a trial runs, and the screened weights a promotion continues.

With ``search.screen_epochs`` (`search.config.fidelity`) a sampled trial is a *screen*: it runs
the first epochs of its fine-tune and keeps its weights before finalizing in
``<output_dir>/<study>/screen-NNNN.pt`` (also logged to its MLflow run, for a worker on another
machine). A *promoted* trial compresses the same recipe with the same seed (the same layer shapes),
loads those weights and runs the rest of the fine-tune. The file holds tensors only (a state dict,
loaded with ``weights_only=True``: nothing in it is executed).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from search.config.fidelity import FIDELITY_ATTR, FULL, PROMOTE_FROM_ATTR, SCREEN, Fidelity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """The part of its fine-tune a trial runs.

    Attributes:
        fidelity: ``screen``, ``full`` (a promotion, or a warm start that is not screened:
            the whole of it), or None (no screening: the whole of it).
        start_epoch: The first epoch it runs (of the full schedule).
        stop_epoch: The epoch it stops before (None: the last).
        load_from: The screened weights it continues (a promotion).
        save_to: Where it keeps its screened weights (a screen).
        promoted_from: The number of the screened trial it continues.
        split_at: The rerun of a promoted trial (`squeeze run`): its fine-tune runs in two
            parts as its screen and its promotion ran, split at this epoch (a fresh optimizer,
            and the random state each started with), so the rerun ships the same model.
        epochs: The length of the fine-tune's schedule (None: the recipe's
            ``finetune.epochs``): a trial that reuses a finished trial's weights runs a
            schedule of ``search.reuse_epochs`` (`search.run.inherit`).
        reused_from: The number of the finished trial whose fine-tuned weights (``load_from``)
            it starts from, loaded after its leading shape-changing stages (`search.run.inherit`).
    """

    fidelity: str | None = None
    start_epoch: int = 0
    stop_epoch: int | None = None
    load_from: Path | None = None
    save_to: Path | None = None
    promoted_from: int | None = None
    split_at: int | None = None
    epochs: int | None = None
    reused_from: int | None = None

    def parts(self) -> list[tuple[int, int | None]]:
        """``(start_epoch, stop_epoch)`` of each part of the fine-tune it runs."""
        if self.split_at is not None:
            return [(0, self.split_at), (self.split_at, None)]
        return [(self.start_epoch, self.stop_epoch)]


#: The whole fine-tune (no screening).
WHOLE = Stage()


def trial_stage(trial: optuna.Trial, fidelity: Fidelity | None, folder: Path) -> Stage:
    """The stage of ``trial`` (recorded as its ``squeeze.fidelity`` attribute when screening):
    a screen, a promotion, or a warm start's whole fine-tune (``search.screen_warm_starts=
    false``); ``folder``: the study's output folder."""
    if fidelity is None or not fidelity.screening:
        return WHOLE
    source = trial.user_attrs.get(PROMOTE_FROM_ATTR)
    if source is None and not fidelity.screens(trial):  # a warm start, at full fidelity
        trial.set_user_attr(FIDELITY_ATTR, FULL)
        return replace(WHOLE, fidelity=FULL)
    if source is None:
        trial.set_user_attr(FIDELITY_ATTR, SCREEN)
        return Stage(
            fidelity=SCREEN,
            stop_epoch=fidelity.screen_epochs,
            save_to=screen_file(folder, trial.number),
        )
    trial.set_user_attr(FIDELITY_ATTR, FULL)
    return Stage(
        fidelity=FULL,
        start_epoch=fidelity.screen_epochs,
        load_from=screen_file(folder, int(source)),
        promoted_from=int(source),
    )


def screen_file(folder: Path, number: int) -> Path:
    """Where screened trial ``number`` keeps its weights, in the study's output ``folder``."""
    return folder / f"screen-{number:04d}.pt"


def save_state(model: torch.nn.Module, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` (whole or not at all: a killed worker leaves no
    half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_screen(
    stage: Stage, study: optuna.Study, client: MlflowClient, *, tries: int = 10, wait_s: float = 2.0
) -> None:
    """Bring a promotion's screened weights here from the screened trial's MLflow run when this
    machine lacks them (a worker on another machine ran the screen), trying ``tries`` times
    ``wait_s`` apart (that worker's writer logs the file in the background). Nothing when the
    file is here, or for a trial that is not a promotion."""
    if stage.load_from is None or stage.promoted_from is None:
        return
    fetch_weights(stage.load_from, stage.promoted_from, study, client, tries=tries, wait_s=wait_s)


def fetch_weights(
    path: Path,
    number: int,
    study: optuna.Study,
    client: MlflowClient,
    *,
    tries: int = 10,
    wait_s: float = 2.0,
) -> None:
    """Bring trial ``number``'s weights file ``path`` here from its MLflow run when this machine
    lacks it, trying ``tries`` times ``wait_s`` apart (the writer of the worker that ran it logs
    the file in the background). Nothing when the file is here."""
    if path.exists():
        return
    source = study.get_trials(deepcopy=False)[int(number)]
    run_id = source.user_attrs.get("mlflow_run_id")
    if run_id is None:
        return  # (loading then names the missing file)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(tries):
        try:
            client.download_artifacts(run_id, path.name, str(path.parent))
            return
        except (MlflowException, OSError) as err:
            logger.debug("weights of trial %d: %s", source.number, err)
            if attempt + 1 < tries:
                time.sleep(wait_s)


def load_state(model: torch.nn.Module, path: Path) -> None:
    """Load the screened weights at ``path`` into ``model`` (compressed like the screened trial:
    same recipe, same seed, so the same shapes), where it is.

    Raises:
        FileNotFoundError: If there is no such file.
        RuntimeError: If its tensors do not fit ``model``.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
