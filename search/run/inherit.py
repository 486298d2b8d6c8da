"""Reuse between trials: a trial starts from a finished trial's fine-tuned weights.

With ``search.reuse=true`` (`search.config.fidelity`) each trial, once its leading stages (the
compressors that train the dense model or change layer shapes: `Compressor.stage` below 2, such
as structured pruning) are applied to its copy of the baseline, records the layer shapes they
left (`architecture`, user attribute ``squeeze.arch``). A finished trial of the same shapes (the
same structured amount, say, or another that rounds to the same channel counts) that fine-tuned
from the baseline may lend it its fine-tuned weights: of those whose weights are kept, the one
with the best validation score (`pick_source`). The trial then loads them (`load_plain`: the
latent float weights under any quantization grid or mask, which its own later stages replace),
applies its later stages (a quantizer, allocate, ...) to them and fine-tunes a schedule of
``search.reuse_epochs`` epochs instead of ``space.finetune.epochs``; user attribute
``squeeze.reuse_from`` names the source, and the epoch budget charges the epochs it runs.

A trial that fine-tuned from the baseline writes its weights before finalizing, as a screen does
(`search.run.screening.save_state`), to ``<output_dir>/<study>/tuned-NNNN.pt``, and keeps them
(user attribute ``squeeze.weights``, also logged to its MLflow run for workers on other machines)
only when its validation score is the best so far of its shapes: the only weights `pick_source`
can still pick. A reused trial writes none (sources are one step from the baseline), so with
one worker a shape's first trial is its only source, and the folder holds about one file per
shape the sweep met (each the model's state before finalizing: 25-400 KB for digits_mlp).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from compressors import Compressor
from search.config.fidelity import EPOCHS_ATTR, REUSE_FROM_ATTR, Fidelity
from search.run.screening import WHOLE, Stage, fetch_weights

logger = logging.getLogger(__name__)

#: User attribute: a hash of the layer shapes a trial's leading stages left (`architecture`).
ARCH_ATTR = "squeeze.arch"
#: User attribute: True on a trial whose fine-tuned weights are kept for others to start from.
WEIGHTS_ATTR = "squeeze.weights"
#: The first `Compressor.stage` that neither trains the dense model nor changes layer shapes.
_LATER_STAGE = 2
#: A parametrized tensor's key in a state dict: ``<module>.parametrizations.<name>.original``.
_PARAMETRIZED = ".parametrizations."


def leading(compressors: Sequence[Compressor]) -> int:
    """How many of ``compressors`` (in pipeline order) are leading stages: those before the
    first that constrains weights in place or only changes the fine-tuning."""
    for i, compressor in enumerate(compressors):
        if compressor.stage >= _LATER_STAGE:
            return i
    return len(compressors)


def architecture(model: torch.nn.Module) -> str:
    """A hash of the names, shapes and types of ``model``'s tensors (its parameters and buffers):
    equal for two models a finished trial's weights fit."""
    state = sorted(plain(model.state_dict()).items())
    parts = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in state]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each parametrized tensor under its own name (its latent value, the one
    fine-tuning trains) and without the parametrizations' own tensors (grids, masks)."""
    out = {}
    for key, value in state.items():
        if _PARAMETRIZED not in key:
            out[key] = value
            continue
        module, _, rest = key.partition(_PARAMETRIZED)
        name, _, tail = rest.partition(".")
        if tail == "original":
            out[f"{module}.{name}" if module else name] = value
        elif tail.removeprefix("original").isdigit():  # the model's own weight_norm: as it is
            out[key] = value
    return out


def load_plain(model: torch.nn.Module, path: Path) -> None:
    """Load the latent weights of the state dict at ``path`` (`plain`) into ``model`` (a model
    after its leading stages, of the same `architecture`); tensors of later stages that ``model``
    has not (activation observers) are left out.

    Raises:
        FileNotFoundError: If there is no such file.
        RuntimeError: If a tensor of ``model`` is missing from it, or does not fit.
    """
    state = plain(torch.load(path, map_location="cpu", weights_only=True))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise RuntimeError(f"{path} has no {', '.join(missing[:5])} for this model")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def weights_file(folder: Path, number: int) -> Path:
    """Where trial ``number`` keeps its fine-tuned weights, in the study's output ``folder``."""
    return folder / f"tuned-{number:04d}.pt"


def pick_source(
    trials: Sequence[FrozenTrial], arch: str, *, higher_is_better: bool
) -> FrozenTrial | None:
    """The finished trial a trial of shapes ``arch`` starts from: of the complete trials of the
    same shapes whose weights are kept, the one with the best validation score (the earliest of
    equals); None when there is none."""
    sources = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.user_attrs.get(ARCH_ATTR) == arch
        and t.user_attrs.get(WEIGHTS_ATTR)
    ]
    if not sources:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return max(sources, key=lambda t: (sign * _val(t), -t.number))


def _val(trial: FrozenTrial) -> float:
    return float(trial.user_attrs.get("metrics", {}).get("val_acc", float("nan")))


@dataclass
class Inheritance:
    """A trial's choice, once its leading stages are applied, between fine-tuning from the
    baseline and starting from a finished trial's weights (`compress_recipe`'s ``inherit``).

    Attributes:
        trial: The running trial (its attributes record the choice).
        fidelity: The study's `Fidelity` (``reuse_epochs``).
        folder: The study's output folder.
        client: The MLflow client that fetches a source's weights from another machine.
        higher_is_better: Whether the task's validation score is better higher.
    """

    trial: optuna.Trial
    fidelity: Fidelity
    folder: Path
    client: MlflowClient
    higher_is_better: bool = True
    #: The stage chosen (set by the call).
    stage: Stage = WHOLE

    def __call__(self, model: torch.nn.Module) -> Stage:
        """The stage of the trial, ``model`` its model after its leading stages: a reuse (the
        source's weights to load, a ``reuse_epochs`` schedule), or the whole fine-tune, whose
        weights it writes before finalizing."""
        arch = architecture(model)
        self.trial.set_user_attr(ARCH_ATTR, arch)
        study = self.trial.study
        source = pick_source(
            study.get_trials(deepcopy=False), arch, higher_is_better=self.higher_is_better
        )
        if source is not None:
            path = weights_file(self.folder, source.number)
            fetch_weights(path, source.number, study, self.client)
            if path.exists():
                logger.info(
                    "trial %d starts from trial %d's weights", self.trial.number, source.number
                )
                self.trial.set_user_attr(REUSE_FROM_ATTR, source.number)
                self.trial.set_user_attr(EPOCHS_ATTR, self.fidelity.reuse_epochs)
                self.stage = Stage(
                    load_from=path, reused_from=source.number, epochs=self.fidelity.reuse_epochs
                )
                return self.stage
            logger.warning(
                "trial %d's weights are gone: fine-tuning from the baseline", source.number
            )
        self.stage = Stage(save_to=weights_file(self.folder, self.trial.number))
        return self.stage

    def keep(self, val: float) -> Path | None:
        """After the trial is measured: keep its weights (returned, to log) when its validation
        score ``val`` is the best so far of its shapes, else remove them; None for a trial that
        wrote none (a reuse)."""
        stage = self.stage
        if stage.save_to is None or not stage.save_to.exists():
            return None
        arch = self.trial.user_attrs.get(ARCH_ATTR)
        trials = self.trial.study.get_trials(deepcopy=False)
        best = pick_source(trials, arch, higher_is_better=self.higher_is_better)
        sign = 1.0 if self.higher_is_better else -1.0
        if best is not None and not sign * val > sign * _val(best):
            stage.save_to.unlink()
            return None
        self.trial.set_user_attr(WEIGHTS_ATTR, True)
        return stage.save_to
