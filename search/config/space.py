"""The search space written in YAML, turned into Optuna distributions and sampled per trial.

This is the only module that calls ``trial.suggest_*``. Parameter names are namespaced by the
compressor they belong to (``prune.amount``, ``quant.bits``, ``finetune.lr``); the pipeline itself
may be a search dimension (``pipeline: choice(prune+quant, quant+kd)``), in which case only the
chosen compressors' parameters are sampled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from torch import nn

from compressors import (
    Compressor,
    InvalidParameterError,
    available,
    check_param,
    coverage,
    get_compressor,
    parameter_count,
    targets,
)
from compressors._params import Constraint, Integer, Options, Real, check_known
from search._errors import ConfigError
from search.config.blocks import AUTO, AUTO_PARAMS
from search.config.compose import EXAMPLES

#: Fine-tuning settings every space has, with their constraints.
FINETUNE_PARAMS: dict[str, Constraint] = {
    "epochs": Integer(0, 10_000, default=10),
    "batch_size": Integer(1, 1_000_000, default=64),
    "lr": Real(0.0, math.inf, closed="neither", default=1e-3),
    "schedule": Options(("constant", "cosine"), default="constant"),
}

_parser = OverridesParser.create()
_STAGES = {
    0: "trains the dense model before anything is removed",
    1: "changes layer shapes",
    2: "constrains weights in place",
    3: "only changes the fine-tuning",
}


def parse_value(key: str, value: Any) -> Any:
    """Turn one space value into an Optuna distribution, or return it as a fixed value.

    Args:
        key: The value's key, for error messages (e.g. ``space.prune.amount``).
        value: A number, bool, list, or a string in the sweeper syntax.

    Raises:
        ConfigError: If a string is a malformed search expression.
    """
    if not isinstance(value, str):
        return value
    try:
        override = _parser.parse_override(f"x={value}")
    except HydraException as err:
        raise ConfigError(
            f"Malformed search expression for '{key}': {value!r} ({err}). Expected a fixed value "
            f"or one of: {EXAMPLES}."
        ) from None
    parsed = override.value()
    if isinstance(parsed, IntervalSweep):
        log = "log" in parsed.tags
        if isinstance(parsed.start, int) and isinstance(parsed.end, int):
            return _checked(key, value, IntDistribution, parsed.start, parsed.end, log=log)
        return _checked(key, value, FloatDistribution, parsed.start, parsed.end, log=log)
    if isinstance(parsed, RangeSweep):
        start, stop, step = parsed.start, parsed.stop, parsed.step
        if any(isinstance(v, float) for v in (start, stop, step)):
            last = start + step * math.floor((stop - start) / step - 1e-9)
            return _checked(key, value, FloatDistribution, start, last, step=step)
        return _checked(
            key, value, IntDistribution, start, stop - 1 if step > 0 else stop, step=step
        )
    if isinstance(parsed, ChoiceSweep):
        return CategoricalDistribution(list(parsed.list))
    return parsed


def _checked(key: str, text: str, dist: type, low: Any, high: Any, **kwargs: Any):
    try:
        return dist(low, high, **kwargs)
    except ValueError as err:
        raise ConfigError(f"Invalid search expression for '{key}': {text!r} ({err}).") from None


@dataclass(frozen=True)
class Recipe:
    """What one trial applies.

    Attributes:
        pipeline: Compressor names, in the order they are applied.
        compressors: The parameters of each compressor in the pipeline.
        finetune: Fine-tuning settings (``epochs``, ``batch_size``, ``lr``).
        params: Every value of the recipe, flat and namespaced, for logging.
    """

    pipeline: tuple[str, ...]
    compressors: dict[str, dict[str, Any]]
    finetune: dict[str, Any]
    params: dict[str, Any]


class SearchSpace:
    """A validated search space. Build it with `SearchSpace.from_config`."""

    def __init__(
        self,
        *,
        name: str,
        pipeline: Any,
        classes: Mapping[str, type[Compressor]],
        entries: Mapping[str, Mapping[str, Any]],
        finetune: Mapping[str, Any],
    ) -> None:
        self.name = name
        self._pipeline = pipeline  # tuple of names, or a CategoricalDistribution of "a+b" strings
        self._classes = dict(classes)
        self._entries = {k: dict(v) for k, v in entries.items()}
        self._finetune = dict(finetune)

    @classmethod
    def from_config(cls, space: DictConfig | Mapping[str, Any]) -> SearchSpace:
        """Parse and check a ``space`` config; every problem raises `ConfigError` up front."""
        raw = (
            OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) else space
        )
        raw = dict(raw)
        name = str(raw.pop("name", "space"))
        where = f"space '{name}'"
        pipeline_value = raw.pop("pipeline", None)
        raw.pop("warm_start", None)  # recipes run first (search.config.warm_start checks them)
        finetune_raw = raw.pop("finetune", {}) or {}
        pipeline = _parse_pipeline(pipeline_value, where)
        classes, entries = {}, {}
        for comp in sorted(k for k, v in raw.items() if isinstance(v, Mapping)):
            classes[comp], entries[comp] = _parse_entry(comp, raw[comp], where)  # used or not
        pipeline = _expand_kinds(pipeline, classes)
        used = set(
            pipeline.choices if isinstance(pipeline, CategoricalDistribution) else [pipeline]
        )
        for comp in sorted({n for option in used for n in _split_pipeline(option)}):
            if comp not in classes:
                raise ConfigError(
                    f"Unknown compressor '{comp}' in space.pipeline of {where}. Available: "
                    f"{', '.join(available())}, or a kind standing for each compressor of it: "
                    f"{', '.join(sorted({c.kind for c in classes.values() if c.kind}))}. A space "
                    f"gets an entry for every conf/compressor/<name>.yaml when its defaults list "
                    f"has '- _compressors'."
                )
        for option in used:
            _check_combination(_split_pipeline(option), classes, where)
        finetune = _parse_params("finetune", FINETUNE_PARAMS, finetune_raw, where)
        if isinstance(pipeline, str):
            pipeline = tuple(_split_pipeline(pipeline))
        return cls(
            name=name, pipeline=pipeline, classes=classes, entries=entries, finetune=finetune
        )

    def sample(self, trial: optuna.Trial) -> Recipe:
        """Sample one recipe: the pipeline first, then only the chosen compressors' parameters."""
        params: dict[str, Any] = {}
        if isinstance(self._pipeline, CategoricalDistribution):
            choice = _suggest(trial, "pipeline", self._pipeline)
            pipeline = tuple(_split_pipeline(choice))
        else:
            pipeline = self._pipeline
        params["pipeline"] = "+".join(pipeline)
        compressors = {
            comp: _sample_tree(trial, comp, self._entries[comp], params) for comp in pipeline
        }
        finetune = _sample_tree(trial, "finetune", self._finetune, params)
        return Recipe(pipeline, compressors, finetune, params)

    def build(self, recipe: Recipe) -> list[Compressor]:
        """Instantiate the recipe's compressors in pipeline order."""
        return [self._classes[n](**recipe.compressors[n]) for n in recipe.pipeline]

    def check_outputs(self, outputs: str, *, task: str) -> None:
        """Check the space's values against what the task's model outputs (``logits`` or
        ``embeddings``), e.g. that distillation's loss suits them.

        Raises:
            ConfigError: Naming the parameter, the values it may take for this task, and the
                value given.
        """
        where = f"space '{self.name}' (task '{task}', whose model outputs {outputs})"
        for comp, compressor_cls in self._classes.items():
            for key, constraint in compressor_cls.output_params.get(outputs, {}).items():
                value = self._entries[comp][key]
                for candidate in _candidates(value):
                    try:
                        check_param(where, f"{comp}.{key}", constraint, candidate)
                    except InvalidParameterError as err:
                        raise ConfigError(str(err)) from None

    def check_model(
        self, model: nn.Module, *, task: str, example_inputs: Any = None
    ) -> dict[str, float]:
        """Check that every compressor the pipeline can use acts on ``model``, before any
        training; return the coverage of each pipeline (the fraction of the model's parameters
        its compressors compress, `compressors.coverage`), by pipeline.

        Raises:
            ConfigError: If a compressor that shrinks models can act on none of this one's
                tensors, or meets a module it cannot handle (the message says which).
        """
        options = (
            [tuple(_split_pipeline(c)) for c in self._pipeline.choices]
            if isinstance(self._pipeline, CategoricalDistribution)
            else [tuple(self._pipeline)]
        )
        built: dict[str, Compressor] = {}
        for comp in sorted({c for option in options for c in option}):
            params = {k: _representative(v) for k, v in self._entries[comp].items()}
            try:
                built[comp] = self._classes[comp](**params)  # (parameters checked together)
                built[comp].check_model(model, example_inputs)
            except InvalidParameterError as err:  # UnsupportedModelError included
                raise ConfigError(f"{err} (task '{task}', space '{self.name}')") from None
        return {
            "+".join(o): coverage([built[c] for c in o], model, example_inputs) for o in options
        }

    @property
    def compressor_names(self) -> list[str]:
        """Every compressor this space can use."""
        return sorted(self._classes)

    @property
    def pipelines(self) -> list[tuple[str, ...]]:
        """Every pipeline this space can produce; several when the pipeline is a search
        dimension (the Optuna parameter ``pipeline``, whose choices are ``a+b`` strings)."""
        if isinstance(self._pipeline, CategoricalDistribution):
            return [tuple(_split_pipeline(c)) for c in self._pipeline.choices]
        return [tuple(self._pipeline)]

    def values(self, prefix: str) -> dict[str, Any]:
        """The values of compressor ``prefix`` (or of ``finetune``), flat and namespaced as
        `sample` names them (``prune.amount``): an Optuna distribution, or a fixed value."""
        tree = self._finetune if prefix == "finetune" else self._entries[prefix]
        return _flat_values(prefix, tree)

    def constraint(self, prefix: str, key: str) -> Constraint | None:
        """The declared constraint of parameter ``key`` of compressor ``prefix`` (or of
        ``finetune``), None if it has no such parameter."""
        if prefix == "finetune":
            return FINETUNE_PARAMS.get(key)
        return self._classes[prefix].params.get(key) if prefix in self._classes else None

    def check_pipeline(self, pipeline: list[str], where: str) -> None:
        """Raise `ConfigError` unless ``pipeline`` is a pipeline some space could hold: known
        compressors, none twice, in an order their stages allow, one of each kind."""
        for comp in pipeline:
            if comp not in self._classes:
                raise ConfigError(
                    f"Unknown compressor '{comp}' in the pipeline of {where}. Available: "
                    f"{', '.join(self.compressor_names)}."
                )
        _check_combination(pipeline, self._classes, where)


def claims_table(
    model: nn.Module, example_inputs: Any = None, space: SearchSpace | None = None
) -> list[dict[str, Any]]:
    """One row per parameter tensor of ``model`` (a tied tensor once): its name, shape, size,
    kind of target (`compressors.KINDS`, or ``-`` for biases, norms and other tensors no method
    compresses) and, for each registered compressor that shrinks models (with its default
    parameters), whether it acts on the tensor; then one row per pipeline of ``space`` with the
    fraction of the parameters it compresses."""
    found = targets(model)
    methods = [get_compressor(n)() for n in available() if get_compressor(n).shrinks]
    claimed = {m.name: set(m.claims(model, example_inputs)) for m in methods}
    rows = []
    for name, tensor in model.named_parameters():
        key = name.replace(".parametrizations.", ".").removesuffix(".original")
        rows.append(
            {
                "tensor": key,
                "shape": "x".join(map(str, tensor.shape)),
                "parameters": tensor.numel(),
                "kind": found[key].kind if key in found else "-",
                **{m: "yes" if key in claimed[m] else "" for m in claimed},
            }
        )
    if space is not None:
        total = parameter_count(model)
        coverages = space.check_model(model, task="", example_inputs=example_inputs)
        for pipeline, fraction in coverages.items():
            rows.append(
                {
                    "tensor": f"pipeline {pipeline}",
                    "parameters": round(fraction * total),
                    "kind": f"{100 * fraction:.0f}% compressed",
                }
            )
    return rows


def _parse_pipeline(value: Any, where: str) -> Any:
    if value is None:
        raise ConfigError(
            f"The 'pipeline' key of {where} is missing: list the compressors to apply."
        )
    if isinstance(value, list | tuple | ListConfig):
        if not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f"The 'pipeline' parameter of {where} must be a non-empty list of compressor names "
                f"or a choice(...) of 'a+b' strings. Got {value!r} instead."
            )
        return "+".join(value)
    parsed = parse_value("space.pipeline", value)
    if isinstance(parsed, CategoricalDistribution):
        return parsed
    if isinstance(parsed, str):
        return parsed
    raise ConfigError(
        f"The 'pipeline' parameter of {where} must be a list of compressor names, 'a+b', or "
        f"choice(a+b, c). Got {value!r} instead."
    )


def _expand_kinds(pipeline: Any, classes: Mapping[str, type[Compressor]]) -> Any:
    """Replace each kind named in the pipeline (``quantizer``) by each compressor of the space
    of that kind (``quant``, ``cluster``): a pipeline with a kind becomes a choice of pipelines,
    so that a method added with its yaml is offered wherever its kind is."""
    kinds: dict[str, list[str]] = {}
    for comp, compressor_cls in sorted(classes.items()):
        if compressor_cls.kind and comp not in kinds:
            kinds.setdefault(compressor_cls.kind, []).append(comp)
    options = pipeline.choices if isinstance(pipeline, CategoricalDistribution) else [pipeline]
    expanded: list[str] = []
    for option in options:
        slots = [
            kinds[part] if part in kinds and part not in classes else [part]
            for part in _split_pipeline(option)
        ]
        for combination in itertools.product(*slots):
            if "+".join(combination) not in expanded:
                expanded.append("+".join(combination))
    if isinstance(pipeline, str) and len(expanded) == 1:
        return expanded[0]
    return CategoricalDistribution(expanded)


def _split_pipeline(option: Any) -> list[str]:
    return [part.strip() for part in str(option).split("+") if part.strip()]


def _parse_entry(comp: str, entry: Mapping[str, Any], where: str):
    entry = dict(entry)
    target = entry.pop("_target_", None)
    if target is None:
        raise ConfigError(f"space.{comp} of {where} has no '_target_' naming its compressor class.")
    try:
        compressor_cls = get_class(target)
    except Exception:  # noqa: BLE001 - Hydra raises several kinds here
        raise ConfigError(
            f"The '_target_' of space.{comp} ({target!r}) cannot be imported."
        ) from None
    if not (isinstance(compressor_cls, type) and issubclass(compressor_cls, Compressor)):
        raise ConfigError(f"The '_target_' of space.{comp} ({target!r}) is not a Compressor.")
    for key in AUTO_PARAMS:
        if key in compressor_cls.params and key in entry:
            entry[key] = _auto_value(comp, key, compressor_cls.params[key], entry[key], where)
    return compressor_cls, _parse_params(comp, compressor_cls.params, entry, where)


def _auto_value(comp: str, key: str, constraint: Constraint, value: Any, where: str) -> Any:
    """A parameter that may be ``auto`` (`search.config.blocks`): ``auto`` left in the space
    (one built without `search.config.plan.plan_sweep`, which fixes it for the sweep's CPU) is
    1, as in a size-only sweep; any other value must be what the compressor declares."""
    if value == AUTO:
        return 1
    try:
        parsed = parse_value(f"space.{comp}.{key}", value)
        ok = all(constraint.accepts(c) for c in _candidates(parsed))
    except ConfigError:
        ok = False
    if not ok:
        raise ConfigError(
            f"The '{comp}.{key}' parameter of {where} must be {AUTO!r} (the channel block of "
            f"the CPU that times a sweep whose objectives include latency or speed-up: 16 with "
            f"AVX-512, 8 with AVX2; 1 in a size-only sweep), {constraint.describe()}, or a "
            f"search expression of such ints (choice(8, 16)). Got {value!r} instead."
        )
    return value


def _parse_params(
    prefix: str, constraints: Mapping[str, Constraint], values: Mapping[str, Any], where: str
) -> dict[str, Any]:
    try:
        check_known(where, prefix, constraints, values)
    except InvalidParameterError as err:
        raise ConfigError(str(err)) from None
    parsed = {}
    for key, constraint in constraints.items():
        value = values.get(key, constraint.default)
        parsed[key] = _parse_leaf(f"{prefix}.{key}", constraint, value, where)
    return parsed


def _parse_leaf(name: str, constraint: Constraint, value: Any, where: str) -> Any:
    if isinstance(value, Mapping) and getattr(constraint, "per_layer", False):
        return {k: _parse_leaf(f"{name}.{k}", constraint, v, where) for k, v in value.items()}
    parsed = parse_value(f"space.{name}", value)
    for candidate in _candidates(parsed):
        try:
            check_param(where, name, constraint, candidate)
        except InvalidParameterError as err:
            if isinstance(parsed, CategoricalDistribution):
                shown = f"{candidate!r} (in {value})"
            else:
                shown = repr(value if isinstance(parsed, BaseDistribution) else candidate)
            hint = ""
            options = getattr(constraint, "constraints", (constraint,))
            wants_int = any(isinstance(c, Integer) for c in options)
            if wants_int and isinstance(parsed, FloatDistribution):
                hint = " Use int(interval(a, b)) for integers."
            raise ConfigError(
                str(err).replace(f"Got {candidate!r}", f"Got {shown}") + hint
            ) from None
    return parsed


def _representative(parsed: Any) -> Any:
    """One value a parsed space value can take (an interval's low end, a choice's first)."""
    if isinstance(parsed, Mapping):
        return {k: _representative(v) for k, v in parsed.items()}
    return _candidates(parsed)[0]


def _candidates(parsed: Any) -> list[Any]:
    """The values a parsed space value can take that constraints must accept (an interval's
    ends, a choice's options, or the fixed value)."""
    if isinstance(parsed, CategoricalDistribution):
        return list(parsed.choices)
    if isinstance(parsed, IntDistribution | FloatDistribution):
        return [parsed.low, parsed.high]
    return [parsed]


def _check_combination(pipeline: list[str], classes: Mapping[str, type[Compressor]], where: str):
    if len(set(pipeline)) != len(pipeline):
        raise ConfigError(f"The pipeline {'+'.join(pipeline)!r} of {where} repeats a compressor.")
    for before, after in zip(pipeline, pipeline[1:], strict=False):
        if classes[after].stage < classes[before].stage:
            raise ConfigError(
                f"The pipeline {'+'.join(pipeline)!r} of {where} applies '{after}' after "
                f"'{before}'; '{after}' {_STAGES[classes[after].stage]}, so it must come first."
            )
    seen: dict[str, str] = {}
    for comp in pipeline:
        kind = classes[comp].kind
        if kind and kind in seen:
            raise ConfigError(
                f"The pipeline {'+'.join(pipeline)!r} of {where} combines '{seen[kind]}' and "
                f"'{comp}', which are both of kind '{kind}'; use at most one of them."
            )
        seen.setdefault(kind, comp)


def _flat_values(prefix: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat_values(f"{prefix}.{key}", value))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def _sample_tree(trial: optuna.Trial, prefix: str, tree: Mapping[str, Any], flat: dict) -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out[key] = _sample_tree(trial, name, value, flat)
            continue
        if isinstance(value, BaseDistribution):
            value = _suggest(trial, name, value)
        out[key] = value
        flat[name] = value
    return out


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_categorical(name, dist.choices)
