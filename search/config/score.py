"""Which way the task's score goes, and how a change of it against the baseline is told.

A trial's score ``val_acc`` (``test_acc`` on test) is the task's metric (`experiments.Task`'s
``metric``), whatever it measures; the names stay for compatibility. Its direction is the task's
``higher_is_better``: accuracy, R² or a cosine are better higher, an error (MSE, MAE,
perplexity) lower. Everything that compares scores reads it from a `Score`: the study's
direction for ``val_acc``, the front's "change" columns, the ``--max-drop`` budget and the
recommended point, early stopping, a constraint on ``val_acc``.

A change is signed so that negative is always worse than the baseline, in one of two units:

- **points** (``pt``) for a higher-is-better score: 100 × the difference (scores of this kind
  are fractions: accuracy, R², cosine), ``−1.4 pt`` is 1.4 points below the baseline;
- **percent of the baseline's value** (``%``) for a lower-is-better score: an error has the
  data's units and no natural scale, so a change is relative, ``−5.0 %`` is an MSE 5% above the
  baseline's.

Nothing here imports torch or the task: a sweep records the direction in its study
(`DIRECTION_ATTR`), where ``report`` and ``export`` read it back (`Score.of_study`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: The study's user attribute holding ``val_acc``'s direction: ``maximize`` or ``minimize``.
DIRECTION_ATTR = "val_acc_direction"
#: The study's user attribute holding the name of the task's metric (`Score.name`).
METRIC_ATTR = "val_acc_metric"
#: The names of squeeze's default scores of classifiers (top-1 accuracy, a multi-label one's share
#: of labels decided right): the only ones headed "acc" in tables.
ACCURACIES = ("accuracy", "label_accuracy")


@dataclass(frozen=True)
class Score:
    """The direction of the task's score (``val_acc`` / ``test_acc``) and its changes' unit.

    Attributes:
        higher_is_better: Whether a higher score is better (the task's ``higher_is_better``).
        name: What the score is: the task's metric's function or class name (``accuracy``,
            ``r2_score``, ``R2Score``, ``MulticlassF1Score``); "" where not known (a study made
            before it was recorded). Not compared: two scores going the same way are equal.
    """

    higher_is_better: bool = True
    name: str = field(default="", compare=False)

    @classmethod
    def of_task(cls, task: Any) -> Score:
        """The score of a built `experiments.Task`: its ``higher_is_better`` and the name of its
        ``metric``."""
        return cls(higher_is_better=bool(task.higher_is_better), name=metric_name(task.metric))

    @classmethod
    def of_direction(cls, direction: str) -> Score:
        """The score an Optuna direction (``maximize`` / ``minimize``) optimises."""
        return cls(higher_is_better=direction.lower() == "maximize")

    @classmethod
    def of_study(cls, study: Any) -> Score:
        """The score of a squeeze study: its recorded direction (`DIRECTION_ATTR`), else that of
        its objective ``val_acc``, else higher-is-better (studies made before directions
        followed the task)."""
        recorded = study.user_attrs.get(DIRECTION_ATTR)
        if recorded is not None:
            name = str(study.user_attrs.get(METRIC_ATTR, ""))
            return cls(higher_is_better=str(recorded).lower() == "maximize", name=name)
        names = study.metric_names or []
        if "val_acc" in names:
            return cls.of_direction(study.directions[names.index("val_acc")].name)
        return cls()

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize``: the study's direction for ``val_acc``."""
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def better(self) -> str:
        """``higher is better`` or ``lower is better``."""
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def is_accuracy(self) -> bool:
        """Whether the score is one of squeeze's accuracies (or not known to be anything else, as
        in a study made before the metric's name was recorded, and higher is better)."""
        return self.higher_is_better and self.name in ("", *ACCURACIES)

    @property
    def columns(self) -> tuple[str, str]:
        """The heads of a table's validation and test score columns: ``val acc`` / ``test
        acc`` for an accuracy, else ``val score`` / ``test score`` (an R² is no accuracy)."""
        return ("val acc", "test acc") if self.is_accuracy else ("val score", "test score")

    @property
    def title(self) -> str:
        """What the score is, in a heading: ``accuracy`` for an accuracy, else its name
        (``R2Score``, ``r2_score``), else ``score`` (a lambda's, or not known)."""
        if self.is_accuracy:
            return "accuracy"
        return self.name if self.name and not self.name.startswith("<") else "score"

    @property
    def head(self) -> str:
        """A table column holding the score: ``acc`` for an accuracy, else `title`."""
        return "acc" if self.is_accuracy else self.title

    def describe(self) -> str:
        """``score: R2Score, higher is better``, for captions (the name where known)."""
        return f"score: {self.name or 'val_acc'}, {self.better}"

    @property
    def unit(self) -> str:
        """The unit of a change: ``pt`` (points) or ``%`` (of the baseline's value)."""
        return "pt" if self.higher_is_better else "%"

    def within(self, amount: float) -> str:
        """A budget of ``amount`` in words: ``within 1 validation point of the baseline``,
        ``within 2.5% of the baseline's validation score``."""
        if self.higher_is_better:
            return f"within {amount:g} validation point{'' if amount == 1 else 's'} of the baseline"
        return f"within {amount:g}% of the baseline's validation score"

    def goodness(self, value: float) -> float:
        """``value`` oriented so that larger is better (for sorting and the knee)."""
        return float(value) if self.higher_is_better else -float(value)

    def change(self, value: float, baseline: float) -> float:
        """How much better ``value`` is than ``baseline``, in `unit` (negative: worse)."""
        value, baseline = float(value), float(baseline)
        if self.higher_is_better:
            return 100.0 * (value - baseline)
        if value == baseline:
            return 0.0
        if baseline == 0.0:  # a perfect baseline: any error is infinitely worse, relatively
            return -math.inf if value > 0 else math.inf
        return 100.0 * (baseline - value) / abs(baseline)

    def drop(self, value: float, baseline: float) -> float:
        """How much worse ``value`` is than ``baseline``, in `unit` (``-change``)."""
        return -self.change(value, baseline)

    def hope(self, value: float, margin: float) -> float:
        """``value`` improved by ``margin``: ``+ margin`` for a higher-is-better score (in its
        own units), ``margin`` as a fraction of ``|value|`` for a lower-is-better one."""
        if self.higher_is_better:
            return value + margin
        return value - margin * abs(value)

    def best_index(self, values: Sequence[float]) -> int:
        """The position of the best of ``values``."""
        return max(range(len(values)), key=lambda i: self.goodness(values[i]))

    def format_change(self, change: float, *, minus: str = "-") -> str:
        """``-23.1 pt`` / ``+0.4 pt`` / ``0.0 pt`` (or ``%``); ``minus`` replaces ``-``."""
        if math.isinf(change):
            text = f"{'+' if change > 0 else '-'}inf"
        else:
            text = f"{change:+.1f}"
            if float(text) == 0:
                text = "0.0"
        return f"{text} {self.unit}".replace("-", minus)

    def describe_change(self) -> str:
        """What a change column means, for captions."""
        if self.higher_is_better:
            return "the score minus the baseline's, in points (negative: a loss)"
        return (
            "how much lower the score is than the baseline's, in % of the baseline's "
            "(lower is better; negative: a loss)"
        )


#: A higher-is-better score (squeeze's own: accuracy, cosine, R²), the default where none is known.
DEFAULT_SCORE = Score()


def metric_name(metric: Any) -> str:
    """A metric's name as a user wrote it: a function's ``__name__`` (squeeze's ``accuracy``,
    ``r2_score``; ``<lambda>`` for a lambda), else its class's (torchmetrics' ``R2Score``),
    the function of a ``functools.partial``."""
    if isinstance(metric, functools.partial):
        metric = metric.func
    return str(getattr(metric, "__name__", None) or type(metric).__name__)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether point ``a`` is at least as good as ``b`` in every objective and better in one."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    at_least = all(s * x >= s * y for s, x, y in zip(signs, a, b, strict=True))
    return at_least and any(s * x > s * y for s, x, y in zip(signs, a, b, strict=True))
