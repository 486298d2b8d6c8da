"""Parameter constraints declared next to each compressor, checked before any work starts.

Messages follow one template, naming where the parameter lives, what is allowed and what was given:
``The 'prune.amount' parameter of space 'default' must be a float in [0.0, 1.0). Got 1.5 instead.``
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class InvalidParameterError(ValueError):
    """A parameter value violates its declared constraint."""


@dataclass(frozen=True)
class Real:
    """A real number in an interval; ``closed`` says which ends belong to it.

    Attributes:
        per_layer: Also accept a mapping ``{layer name: value}``, each value checked alike.
    """

    low: float = -math.inf
    high: float = math.inf
    closed: str = "both"  # both | left | right | neither
    default: float | None = None
    per_layer: bool = False

    def accepts(self, value: Any) -> bool:
        if self.per_layer and isinstance(value, Mapping):
            return bool(value) and all(self.accepts(v) for v in value.values())
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        left = value >= self.low if self.closed in ("both", "left") else value > self.low
        right = value <= self.high if self.closed in ("both", "right") else value < self.high
        return left and right and math.isfinite(value)

    def describe(self) -> str:
        lo = "[" if self.closed in ("both", "left") else "("
        hi = "]" if self.closed in ("both", "right") else ")"
        text = f"a float in {lo}{float(self.low)}, {float(self.high)}{hi}"
        return text + (" (or a mapping of layer names to such floats)" if self.per_layer else "")


@dataclass(frozen=True)
class Integer:
    """An integer in ``[low, high]``."""

    low: int
    high: int
    default: int | None = None

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
        )

    def describe(self) -> str:
        return f"an int in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple[Any, ...]
    default: Any = None

    def accepts(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> str:
        if len(self.values) == 1:
            return repr(self.values[0])
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class AnyOf:
    """A value that one of several constraints accepts, e.g. an int in [1, 8] or ``'ternary'``."""

    constraints: tuple[Real | Integer | Options, ...]
    default: Any = None

    def accepts(self, value: Any) -> bool:
        return any(c.accepts(value) for c in self.constraints)

    def describe(self) -> str:
        return " or ".join(c.describe() for c in self.constraints)


Constraint = Real | Integer | Options | AnyOf


def check_param(where: str, name: str, constraint: Constraint, value: Any) -> None:
    """Raise `InvalidParameterError` unless ``constraint`` accepts ``value``.

    Args:
        where: Where the parameter lives, e.g. ``"space 'default'"``.
        name: Qualified parameter name, e.g. ``"prune.amount"``.
        constraint: The declared constraint.
        value: The value to check.
    """
    if not constraint.accepts(value):
        raise InvalidParameterError(
            f"The '{name}' parameter of {where} must be {constraint.describe()}. "
            f"Got {value!r} instead."
        )


def check_known(where: str, prefix: str, allowed: Mapping[str, Any], given: Mapping[str, Any]):
    """Raise `InvalidParameterError` for any key of ``given`` not declared in ``allowed``."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        names = ", ".join(f"'{prefix}.{k}'" for k in unknown)
        raise InvalidParameterError(
            f"Unknown parameter {names} in {where}. "
            f"Allowed: {', '.join(sorted(allowed)) or 'none'}."
        )
