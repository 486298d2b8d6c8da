"""Stopping a trial's fine-tuning early, from the validation accuracy after each epoch.

- Single objective: an Optuna pruner (``search.pruner``: ``median`` or ``hyperband``) gets
  every epoch's validation score through ``trial.report`` and decides (in the study's
  direction: a lower-is-better score is minimized).
- Any number of objectives (Optuna has no pruning for several): a trial's size, compression
  ratio and FLOPs are known before fine-tuning (fine-tuning keeps masks, grids and shapes; the
  size is measured again from the weights fine-tuning moves, `Stopper`), so
  when its validation score after ``min_epochs`` epochs, improved by ``margin``, would still be
  dominated by the current Pareto front, it can no longer reach the front and is pruned. The
  margin is in the score's units when it is better higher (0.02: 2 points of accuracy), a
  fraction of the score when it is better lower (0.02: an MSE 2% lower), as `Score.hope` says.
  A trial whose size already breaks a constraint is pruned before fine-tuning (or after the
  epoch whose re-estimated size breaks it).

Either raises `optuna.TrialPruned`; the trial ends PRUNED.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from search._errors import ConfigError
from search.config.constraints import constraint_values
from search.config.fidelity import front_trials
from search.config.score import Score, dominates  # noqa: F401 - (dominates re-exported)

if TYPE_CHECKING:  # (torch is imported when a trial runs, not when a config is checked)
    from torch import nn

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
#: Objectives known before fine-tuning, besides validation accuracy.
STRUCTURAL = ("size_bytes", "compression_ratio", "flops")

EpochHook = Callable[[Any], None]


def make_pruner(name: str, options: Mapping[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """The Optuna pruner named in ``search.pruner``."""
    if name not in PRUNERS:
        raise ConfigError(
            f"Unknown pruner {name!r} in search.pruner. Available: {', '.join(PRUNERS)}."
        )
    try:
        return PRUNERS[name](**dict(options or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid search.pruner_options for pruner {name!r}: {err}") from None


def check_early_stop(*, pruner: str, enabled: bool, objectives: Sequence[str]) -> None:
    """Raise `ConfigError` if the objectives do not allow the chosen early stop (``val_acc``'s
    direction is checked against the task's by `search.config.plan.SweepPlan.for_task`)."""
    if pruner != "none" and list(objectives) != ["val_acc"]:
        raise ConfigError(
            f"search.pruner={pruner!r} prunes on the validation score and needs the single "
            f"objective val_acc; got search.objectives={list(objectives)}. For "
            "several objectives use search.early_stop.enabled=true."
        )
    if enabled:
        if pruner != "none":
            raise ConfigError(
                "Use either search.pruner or search.early_stop.enabled=true, not both."
            )
        others = [o for o in objectives if o != "val_acc"]
        if "val_acc" not in objectives or any(o not in STRUCTURAL for o in others):
            raise ConfigError(
                "search.early_stop needs val_acc among search.objectives and the others among "
                f"{', '.join(STRUCTURAL)} (known before fine-tuning); got {list(objectives)}."
            )


@dataclass(frozen=True)
class EarlyStop:
    """How the trials of a sweep stop early.

    Attributes:
        pruner: Report each epoch to the study's Optuna pruner (single objective).
        dominance: Stop a trial the current front dominates (any number of objectives).
        margin: What a dominated trial's score may still gain before the comparison
            (`Score.hope`: in its units, or a fraction of it for a lower-is-better score).
        min_epochs: Epochs a trial always trains before it may be stopped.
        objectives: The study's objectives, in order.
        directions: ``maximize`` / ``minimize`` for each objective.
        constraints: Bounds of ``search.constraints`` (a trial breaking one on its size is
            pruned before fine-tuning).
        baseline_size: Bytes of the baseline's packed file (for ``compression_ratio``).
        example_inputs: Inputs of one forward pass (for ``flops``), holding
            ``example_samples`` samples.
    """

    pruner: bool = False
    dominance: bool = False
    margin: float = 0.02
    min_epochs: int = 2
    objectives: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()
    constraints: Mapping[str, float] = field(default_factory=dict)
    baseline_size: int = 0
    example_inputs: Any = None
    example_samples: int = 1

    def start(
        self, trial: optuna.Trial, model: nn.Module, *, like: nn.Module | None = None
    ) -> EpochHook | None:
        """The hook to call after each fine-tuning epoch of ``trial`` (None: nothing to check).

        ``model`` is the compressed model before fine-tuning; its size is the packed file's
        (`compressors.packing.packed_size`, nothing written), with the layer attributes that
        compression changed recorded against ``like`` (the uncompressed model) as the shipped
        file records them. Fine-tuning then moves the weights, and with them the file's
        entropy-coded bytes (the shipped file differed from this estimate by up to 0.9% after
        3 epochs, 2.1% after 10 and 4.3% after 30 on digits and mnist1d: quant 4/8 bits,
        prune+quant, cluster, lowrank; ``bench/size_estimate.py``): `Stopper` measures it
        again before later decisions (`_DominanceStop.resize`).

        Raises:
            optuna.TrialPruned: If the compressed model already breaks a size constraint.
        """
        if self.pruner:
            return partial_report(trial, self.min_epochs)
        if not self.dominance:
            return None
        known = self._structure(model, like)
        broken = {k: v for k, v in constraint_values(known, self.constraints).items() if v > 0}
        if broken:
            raise optuna.TrialPruned(f"infeasible before fine-tuning: {sorted(broken)}")
        front = [t.values for t in front_trials(trial.study)]  # full-fidelity points only
        if not front:
            return None
        return _DominanceStop(self, known, front)

    def sized(self, model: nn.Module, like: nn.Module | None = None) -> dict[str, float]:
        """``size_bytes`` and ``compression_ratio`` of the file ``model`` would ship as
        (`compressors.packing.packed_size`: exact, nothing written)."""
        from compressors.packing import packed_size

        size = float(packed_size(model, like=like))
        return {"size_bytes": size, "compression_ratio": self.baseline_size / size}

    def _structure(self, model: nn.Module, like: nn.Module | None = None) -> dict[str, float]:
        from experiments.metrics import flops_per_sample

        known = self.sized(model, like)  # the file's size, without writing it
        if "flops" in self.objectives or "flops" in self.constraints:
            known["flops"] = float(
                flops_per_sample(model, self.example_inputs, self.example_samples)
            )
        return known


def partial_report(trial: optuna.Trial, min_epochs: int) -> EpochHook:
    """Report each epoch's validation accuracy; raise `optuna.TrialPruned` when Optuna says so."""

    def hook(stats) -> None:
        trial.report(stats.val_acc, stats.epoch)
        if stats.epoch + 1 >= min_epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned by the study's pruner after epoch {stats.epoch}")

    return hook


def reestimated(epoch: int, min_epochs: int) -> bool:
    """Whether `Stopper` measures the size again after ``epoch`` (0-based): the decision that
    follows is the 1st, 2nd, 4th, 8th, ... of a rule deciding from ``min_epochs`` epochs on."""
    decision = epoch + 2 - min_epochs  # (1 for the first)
    return decision >= 1 and decision & (decision - 1) == 0


class Stopper:
    """Early stopping of one trial: started on the compressed model, called after each epoch.

    The Pareto-dominance rule decides on the size of the file the trial would ship with the
    weights it has when it decides: `start` measures it before fine-tuning and again (the same
    call) after the epochs `reestimate` picks, since fine-tuning moves the weights and with them
    the entropy-coded bytes (by up to 4% over 30 epochs). Re-estimates come before the 1st,
    2nd, 4th, 8th, ... decision (``min_epochs`` epochs in, then every epoch): the drift is
    largest early, a fine-tune of E epochs pays for about log2(E) packings of the model (one
    costs 0.15-0.3 of a digits epoch, 0.01-0.1 of a mnist1d one, about half a training step at
    110 M parameters), and which epochs are measured never depends on timing, so neither do
    the trials it prunes.
    """

    def __init__(
        self, early_stop: EarlyStop, trial: optuna.Trial, *, like: nn.Module | None = None
    ) -> None:
        self.early_stop, self.trial, self.hook = early_stop, trial, None
        self.like = like  # (the baseline: the estimate records changed layers as the file does)
        # The study's pruner needs only each epoch's score; the Pareto-dominance rule needs the
        # compressed model's size (and FLOPs) first (`compress_recipe`'s ``on_compressed``).
        self.needs_model = early_stop.dominance and not early_stop.pruner
        if early_stop.pruner:
            self.hook = partial_report(trial, early_stop.min_epochs)
        self.estimates: list[float] = []  # the sizes measured, in order (the last one decides)

    def start(self, model: nn.Module) -> None:
        """Measure ``model``, as it would ship now: before fine-tuning, start the rule (a size
        breaking a constraint prunes the trial); after an epoch, update the size it decides on
        (and prune the trial if that size now breaks a constraint)."""
        if not isinstance(self.hook, _DominanceStop):
            self.hook = self.early_stop.start(self.trial, model, like=self.like)
            if isinstance(self.hook, _DominanceStop):
                self.estimates.append(self.hook.known["size_bytes"])
        else:
            self.hook.resize(self.early_stop.sized(model, like=self.like))
            self.estimates.append(self.hook.known["size_bytes"])

    def reestimate(self, epoch: int) -> bool:
        """Whether to measure the model again after ``epoch`` (0-based): the decision that
        follows is the 1st, 2nd, 4th, 8th, ... of the rule."""
        return isinstance(self.hook, _DominanceStop) and reestimated(
            epoch, self.early_stop.min_epochs
        )

    def __call__(self, stats) -> None:
        if self.hook is not None:
            self.hook(stats)


class _DominanceStop:
    def __init__(
        self, rule: EarlyStop, known: Mapping[str, float], front: list[Sequence[float]]
    ) -> None:
        self._rule, self.known, self._front = rule, dict(known), front

    def resize(self, sized: Mapping[str, float]) -> None:
        """Decide on these sizes from now on (fine-tuning moved the weights); raise
        `optuna.TrialPruned` if they break a constraint."""
        self.known.update(sized)
        broken = {
            k: v for k, v in constraint_values(self.known, self._rule.constraints).items() if v > 0
        }
        if broken:
            raise optuna.TrialPruned(f"infeasible during fine-tuning: {sorted(broken)}")

    def __call__(self, stats) -> None:
        if stats.epoch + 1 < self._rule.min_epochs:
            return
        rule = self._rule
        score = Score.of_direction(rule.directions[rule.objectives.index("val_acc")])
        hope = {**self.known, "val_acc": score.hope(stats.val_acc, rule.margin)}
        point = [hope[name] for name in rule.objectives]
        for values in self._front:
            if dominates(values, point, rule.directions):
                raise optuna.TrialPruned(
                    f"dominated by the front after epoch {stats.epoch}: val_acc "
                    f"{stats.val_acc:.4f} ({score.better}) with margin {rule.margin} cannot "
                    "reach it"
                )
