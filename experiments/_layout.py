"""Where a classifier's class axis is: squeeze reads logits class-last, yours keep your layout.

Hugging Face's token classifiers and language models return ``(batch, tokens, classes)``: the
class axis last, as squeeze's losses, scores, agreement, distillation and analyses read them.
torch's dense classifiers (segmentation: ``(batch, classes, height, width)``, as
``nn.CrossEntropyLoss`` and torchmetrics take them) put it at axis 1. A `Task` says which with
``class_axis``: `Data.forward` then gives squeeze the scored output class-last, and the task's
own loss, metric and extra scores are wrapped here so that they still receive the output (and
the teacher's) as the model returns it. The shipped ONNX graph keeps the model's layout too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: squeeze's own layout: the class axis last.
CLASS_LAST = -1


def class_last(outputs: Any, axis: int) -> Any:
    """``outputs`` with its class ``axis`` moved last (as it is for `CLASS_LAST`, a tensor of
    too few dimensions, or something not a tensor)."""
    if axis == CLASS_LAST or not isinstance(outputs, torch.Tensor) or outputs.dim() <= axis:
        return outputs
    return outputs.movedim(axis, -1)


def model_layout(outputs: Any, axis: int) -> Any:
    """``outputs`` (class-last) back in the model's layout, the class axis at ``axis``."""
    if axis == CLASS_LAST or not isinstance(outputs, torch.Tensor) or outputs.dim() <= axis:
        return outputs
    return outputs.movedim(-1, axis)


class _InModelLayout:
    """Base of the wrappers: the wrapped function or metric and the model's class axis."""

    def __init__(self, wrapped: Any, axis: int) -> None:
        self.wrapped = wrapped
        self.axis = axis
        self.__name__ = getattr(wrapped, "__name__", type(wrapped).__name__)

    def __repr__(self) -> str:
        return f"{self.__name__} (outputs with the class axis at {self.axis})"


class LossInModelLayout(_InModelLayout):
    """``loss(outputs, targets, teacher)`` given the outputs and the teacher's in the model's
    layout."""

    def __call__(self, outputs: Any, targets: Any, teacher: Any) -> Any:
        axis = self.axis
        return self.wrapped(model_layout(outputs, axis), targets, model_layout(teacher, axis))


class ScoreInModelLayout(_InModelLayout):
    """``score(outputs, targets)`` given the outputs in the model's layout."""

    def __call__(self, outputs: Any, targets: Any) -> Any:
        return self.wrapped(model_layout(outputs, self.axis), targets)


class MetricInModelLayout(_InModelLayout):
    """A streaming metric (``update`` / ``compute`` / ``reset`` / ``clone``, as a
    ``torchmetrics.Metric``) updated with the outputs in the model's layout."""

    @property
    def higher_is_better(self) -> Any:
        return getattr(self.wrapped, "higher_is_better", None)

    def update(self, outputs: Any, targets: Any) -> None:
        self.wrapped.update(model_layout(outputs, self.axis), targets)

    def compute(self) -> Any:
        return self.wrapped.compute()

    def reset(self) -> None:
        self.wrapped.reset()

    def clone(self) -> MetricInModelLayout:
        return MetricInModelLayout(self.wrapped.clone(), self.axis)


def in_model_layout(fn: Any, axis: int, *, kind: str) -> Any:
    """``fn`` (a ``loss``, a ``score`` function or a streaming ``metric``, by ``kind``) taking
    the outputs in the model's layout where squeeze hands them class-last; ``fn`` itself for
    `CLASS_LAST`, None, or one already wrapped."""
    if fn is None or axis == CLASS_LAST or isinstance(fn, _InModelLayout):
        return fn
    if kind == "loss":
        return LossInModelLayout(fn, axis)
    if all(callable(getattr(fn, name, None)) for name in ("update", "compute", "reset")):
        return MetricInModelLayout(fn, axis)
    return ScoreInModelLayout(fn, axis)


def unwrapped(fn: Callable[..., Any] | Any) -> Any:
    """The user's own function or metric behind a wrapper (``fn`` itself if not wrapped)."""
    return fn.wrapped if isinstance(fn, _InModelLayout) else fn
