"""Warm starts: a few simple, strong recipes a space names under ``warm_start:``, which a study
runs first, once, so that every front holds them.

A recipe maps the space's parameter names to values, as the sampled trials name them::

    warm_start:
      - {pipeline: prune+quant, prune.amount: 0.8, quant.bits: 4}

``pipeline`` is the Optuna parameter of a space whose pipeline is a choice; a space with a fixed
pipeline has none, and a recipe may still name that pipeline. What a recipe leaves out is sampled
as usual (`optuna.Study.enqueue_trial` with some of the parameters).

`check_warm_start` checks every recipe before any work and returns what to enqueue. A recipe that
no space could run is a `ConfigError` naming it: an unknown parameter, a value its compressor
refuses, a pipeline of unknown compressors or in an impossible order, a parameter of a
compressor its pipeline does not use. A sound recipe that this space cannot produce (its
pipeline is not one of the space's, or a value lies outside the space's range or differs from a
value the space fixes, as after ``space.pipeline=[prune,quant]`` on the command line) is left
out, and the reason is returned for the sweep to log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from compressors._params import InvalidParameterError, check_param
from search._errors import ConfigError

if TYPE_CHECKING:
    from search.config.space import SearchSpace


@dataclass(frozen=True)
class WarmStart:
    """One recipe, checked against the space.

    Attributes:
        text: The recipe as written, for logs and messages.
        params: The Optuna parameters it fixes (values the space fixes are left out).
    """

    text: str
    params: dict[str, Any]


@dataclass(frozen=True)
class LeftOut:
    """A sound recipe that this space cannot produce, and why."""

    number: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"warm-start recipe {self.number} {self.text} is left out: {self.reason}"


@dataclass(frozen=True)
class WarmStarts:
    """The recipes to run first, in order, and those left out."""

    recipes: tuple[WarmStart, ...] = ()
    left_out: tuple[LeftOut, ...] = ()


class _Unfit(Exception):
    """A sound recipe that this space cannot produce."""


def check_warm_start(entries: Sequence[Any] | None, space: SearchSpace) -> WarmStarts:
    """Check the ``warm_start`` recipes of ``space``; return those it can produce, as Optuna
    parameters, and a reason for each it cannot.

    Raises:
        ConfigError: For a recipe no space could run, naming the recipe and what is allowed.
    """
    if entries is None:
        return WarmStarts()
    if not isinstance(entries, list | tuple):
        raise ConfigError(
            f"The 'warm_start' key of space '{space.name}' must be a list of recipes, e.g. "
            f"[{{pipeline: quant, quant.bits: 8}}]. Got {entries!r} instead."
        )
    recipes, left_out = [], []
    for number, entry in enumerate(entries, start=1):
        text = _text(entry)
        where = f"warm-start recipe {number} {text} of space '{space.name}'"
        if not isinstance(entry, Mapping) or not entry:
            raise ConfigError(
                f"The {where} must be a mapping of parameter names to values, e.g. "
                "{pipeline: quant, quant.bits: 8}."
            )
        try:
            recipes.append(WarmStart(text, _params(_flatten(entry), space, where)))
        except _Unfit as why:
            left_out.append(LeftOut(number, text, str(why)))
    return WarmStarts(tuple(recipes), tuple(left_out))


def _params(recipe: dict[str, Any], space: SearchSpace, where: str) -> dict[str, Any]:
    """The Optuna parameters of one flat recipe; `ConfigError` if no space could run it,
    `_Unfit` if this one cannot."""
    pipeline = recipe.pop("pipeline", None)
    if pipeline is not None:
        parts = _pipeline_parts(pipeline, where)
        space.check_pipeline(parts, where)
    for name, value in recipe.items():  # names and values first: these are errors anywhere
        comp, key = _check_value(name, value, space, where)
        if pipeline is not None and comp != "finetune" and comp not in parts:
            raise ConfigError(
                f"The {where} sets '{name}', but its pipeline '{'+'.join(parts)}' does not "
                f"use '{comp}'. Add '{comp}' to its pipeline or remove '{name}'."
            )
    options = space.pipelines
    params: dict[str, Any] = {}
    if pipeline is not None:
        if tuple(parts) not in options:
            raise _Unfit(f"this space's pipeline is {_pipelines(options)}, not '{'+'.join(parts)}'")
        if len(options) > 1:
            params["pipeline"] = "+".join(parts)
        options = [tuple(parts)]
    values: dict[str, Any] = {}
    for prefix in {*(c for option in options for c in option), "finetune"}:
        values.update(space.values(prefix))
    for name, value in recipe.items():
        comp = name.split(".")[0]
        missing = [o for o in options if comp != "finetune" and comp not in o]
        if missing:
            raise _Unfit(
                f"it sets '{name}' but names no pipeline, and this space's pipeline "
                f"{'is' if len(options) == 1 else 'may be'} {_pipelines(missing)}, without "
                f"'{comp}'"
            )
        if name not in values:
            given = sorted(
                v for v in values if v.startswith(f"{name}.") or name.startswith(f"{v}.")
            )
            raise _Unfit(f"this space has {', '.join(given) or 'no such parameter'}, not '{name}'")
        params.update(_fit(name, value, values[name]))
    if not params:
        raise _Unfit("it sets nothing this space samples (it would be a sampled trial)")
    return params


def _check_value(name: str, value: Any, space: SearchSpace, where: str) -> tuple[str, str]:
    """Check that ``name`` is a parameter some space has and that its compressor accepts
    ``value``; return the compressor (or ``finetune``) and the parameter's key."""
    comp, _, rest = name.partition(".")
    key, _, layer = rest.partition(".")
    known = comp == "finetune" or comp in space.compressor_names
    constraint = space.constraint(comp, key) if known else None
    if constraint is None or (layer and not getattr(constraint, "per_layer", False)):
        allowed = "pipeline, finetune.<setting>, or <compressor>.<parameter> with a compressor of"
        raise ConfigError(
            f"Unknown parameter '{name}' in the {where}. Allowed: {allowed} "
            f"{', '.join(space.compressor_names)} (e.g. quant.bits)."
        )
    try:
        check_param(where, f"{comp}.{key}", constraint, value)
    except InvalidParameterError as err:
        raise ConfigError(str(err)) from None
    return comp, key


def _fit(name: str, value: Any, space_value: Any) -> dict[str, Any]:
    """``{name: value}`` as Optuna takes it if the space's distribution holds ``value``;
    nothing if the space fixes it to ``value``; else `_Unfit`."""
    if not isinstance(space_value, BaseDistribution):
        if value != space_value or isinstance(value, bool) != isinstance(space_value, bool):
            raise _Unfit(f"this space fixes {name}={space_value!r}, the recipe sets {value!r}")
        return {}
    if isinstance(space_value, CategoricalDistribution):
        for choice in space_value.choices:
            if choice == value and isinstance(choice, bool) == isinstance(value, bool):
                return {name: choice}
    elif isinstance(value, int | float) and not isinstance(value, bool):
        low, high, step = space_value.low, space_value.high, space_value.step
        inside = low <= value <= high
        if isinstance(space_value, IntDistribution):
            if isinstance(value, int) and inside and (value - low) % step == 0:
                return {name: value}
        elif inside and (step is None or _on_grid(value, low, step)):
            return {name: float(value)}
    raise _Unfit(f"{name}={value!r} is outside this space's {_describe(space_value)}")


def _on_grid(value: float, low: float, step: float) -> bool:
    steps = (value - low) / step
    return math.isclose(steps, round(steps), abs_tol=1e-8)


def _describe(dist: BaseDistribution) -> str:
    """The distribution in the space's own syntax, e.g. ``int(interval(2, 8))``."""
    if isinstance(dist, CategoricalDistribution):
        return "choice(" + ", ".join(map(str, dist.choices)) + ")"
    assert isinstance(dist, FloatDistribution | IntDistribution)
    text = f"interval({dist.low}, {dist.high})"
    if isinstance(dist, IntDistribution):
        text = f"int({text})"
    if dist.log:
        text = f"tag(log, {text})"
    return text + (f" in steps of {dist.step}" if dist.step not in (None, 1) else "")


def _pipeline_parts(pipeline: Any, where: str) -> list[str]:
    if isinstance(pipeline, str):
        parts = [p.strip() for p in pipeline.split("+")]
    elif isinstance(pipeline, list | tuple) and all(isinstance(p, str) for p in pipeline):
        parts = [p.strip() for p in pipeline]
    else:
        parts = []
    if not parts or not all(parts):
        raise ConfigError(
            f"The 'pipeline' of the {where} must be compressor names joined by '+' (prune+quant) "
            f"or a list of them. Got {pipeline!r} instead."
        )
    return parts


def _pipelines(options: Sequence[tuple[str, ...]]) -> str:
    return " or ".join(f"'{'+'.join(o)}'" for o in options)


def _flatten(entry: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{quant: {bits: 8}}`` and ``{quant.bits: 8}`` alike as ``{'quant.bits': 8}``."""
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _text(value: Any) -> str:
    """A recipe as YAML's flow style writes it: ``{pipeline: quant, quant.bits: 8}``."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_text, value)) + "]"
    return str(value)
