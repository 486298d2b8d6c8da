"""The schema of the composed config (everything but ``task`` and ``space``, which their own
builders check): known keys, and the type and range of each value.

Every problem raises `ConfigError` with the key, the value and what is allowed, e.g.
``The 'search.n_jobs' config value must be an int in [1, 1024]. Got 0 instead.``

This module imports no torch, so that a bad value is reported at once: its `Integer`, `Real` and
`Options` are the compressors' own constraints (``compressors._params``, which is torch-free).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from compressors._params import AnyOf, Integer, Options, Real
from search._errors import ConfigError
from search.failures import FAIL_KINDS


@dataclass(frozen=True)
class Text:
    """A non-empty string."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def describe(self) -> str:
        return "a non-empty string"


#: What a name that becomes a file or folder name (a study's, a task's, an experiment's) may be.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class FileName:
    """A name that is used as one file or folder name (``<output_dir>/<study>/``): letters,
    digits, ``.``, ``_`` and ``-``, starting with a letter or a digit, at most 128 characters
    (no ``/``, no ``..``, no absolute path: nothing is written outside its folder)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and _FILE_NAME.fullmatch(value) is not None

    def describe(self) -> str:
        return (
            "a file name of letters, digits, '.', '_' and '-', starting with a letter or a "
            "digit (at most 128 characters)"
        )


def check_file_name(value: Any, key: str) -> None:
    """Raise `ConfigError` unless ``value`` is a safe file name (`FileName`); ``key`` names it
    in the message (``search.study_name``, ``--name``)."""
    rule = FileName()
    if not rule.accepts(value):
        raise ConfigError(
            f"The '{key}' config value must be {rule.describe()}. Got {value!r} instead."
        )


@dataclass(frozen=True)
class Flag:
    """``true`` or ``false``."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Nullable:
    """``null`` or a value of ``inner``."""

    inner: Any

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"


@dataclass(frozen=True)
class AutoOr:
    """``auto`` or a value of ``inner``."""

    inner: Any

    def accepts(self, value: Any) -> bool:
        return value == "auto" or self.inner.accepts(value)

    def describe(self) -> str:
        return f"'auto' or {self.inner.describe()}"


@dataclass(frozen=True)
class ListOf:
    """A non-empty list whose items are values of ``inner``."""

    inner: Any

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(map(self.inner.accepts, value))

    def describe(self) -> str:
        return f"a non-empty list of {self.inner.describe()}s"


@dataclass(frozen=True)
class AnyMapping:
    """A mapping with free keys (checked where it is used, e.g. sampler options)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, Mapping)

    def describe(self) -> str:
        return "a mapping"


_POSITIVE = Real(0.0, math.inf, closed="neither")

#: Allowed keys and values. ``task`` and ``space`` are checked by their own builders.
SCHEMA: dict[str, Any] = {
    "task": None,
    "space": None,
    "run": None,  # set by an exported experiment; read by `squeeze run`
    "seed": Integer(0, 2**31 - 1),
    "cache_dir": Text(),
    "output_dir": Text(),
    "threads": Nullable(AutoOr(Integer(1, 4096))),
    "device": Options(("cpu", "cuda", "auto")),
    "checkpoint": Nullable(Text()),
    "measure": {
        "latency_batch_sizes": ListOf(Integer(1, 1 << 20)),
        "latency_repeats": Integer(1, 100_000),
        "latency_budget_s": Nullable(Real(0.0, 3600.0, closed="right")),
        "runtime": Options(("torch", "onnxruntime")),
        "onnx_nbits_tolerance": Nullable(Real(0.0, 1e9)),
    },
    "search": {
        "study_name": FileName(),
        "n_trials": Integer(1, 10_000_000),
        "n_epochs": Nullable(Integer(1, 1_000_000_000)),
        "screen_epochs": Integer(0, 10_000),
        "promote_margin": Real(0.0, 1.0),
        "promote_after": Integer(0, 10_000),
        "promote_floor": Nullable(Real(0.0, 1.0)),
        "screen_warm_starts": Flag(),
        "reuse": Flag(),
        "reuse_epochs": Integer(1, 10_000),
        "plateau": Integer(0, 10_000),
        "n_jobs": Integer(1, 1024),
        "sampler": Text(),
        "sampler_options": AnyMapping(),
        "warm_start": AnyOf((Flag(), Options(("predicted",)))),
        "objectives": ListOf(Text()),
        "directions": Nullable(ListOf(Text())),
        "storage": Text(),
        "timeout": Nullable(_POSITIVE),
        "cv_folds": Nullable(Integer(2, 1000)),
        "heartbeat_interval": Integer(1, 86_400),
        "grace_period": Integer(1, 864_000),
        "storage_retry_s": Real(0.0, 86_400.0),
        "retries": Integer(0, 100),
        "lost_retries": Integer(0, 100),
        "retry_on": ListOf(Options(FAIL_KINDS)),
        "pruner": Text(),
        "pruner_options": AnyMapping(),
        "early_stop": {
            "enabled": Flag(),
            "margin": Real(0.0, 1.0),
            "min_epochs": Integer(1, 10_000),
        },
        "constraints": AnyMapping(),
        "trials_per_gpu": Integer(1, 64),
    },
    "tracking": {
        "uri": Text(),
        "mlflow_experiment": Text(),
        "artifacts": Nullable(Text()),
    },
}


def check_schema(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise `ConfigError` for the first unknown key or bad value of ``cfg``."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    _check(raw, SCHEMA, prefix="")


def _check(values: Mapping[str, Any], schema: Mapping[str, Any], *, prefix: str) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in schema:
            leaf = _only_leaf(value)  # `+serch.n_trials=3` is named in full
            raise ConfigError(unknown_key_message(f"{name}.{leaf}" if leaf else name, SCHEMA))
        rule = schema[key]
        if rule is None:
            continue
        if isinstance(rule, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"The '{name}' config value must be a mapping with keys "
                    f"{', '.join(rule)}. Got {value!r} instead."
                )
            _check(value, rule, prefix=f"{name}.")
        elif not rule.accepts(value):
            raise ConfigError(
                f"The '{name}' config value must be {rule.describe()}. Got {value!r} instead."
            )


def unknown_key_message(key: str, tree: Mapping[str, Any]) -> str:
    """The message for the dotted config ``key`` that ``tree`` (nested mappings of the allowed
    keys; None for a subtree that takes any key) lacks, naming the closest existing key, e.g.
    ``Unknown config key 'serch.n_trials'. Did you mean 'search.n_trials'? Allowed at the top
    level: ...``."""
    parts = key.split(".")
    node: Any = tree
    depth = 0
    while depth < len(parts) and isinstance(node, Mapping) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    known = ".".join(parts[:depth])
    if not isinstance(node, Mapping):
        return f"Unknown config key '{key}': '{known}' holds a value, not keys."
    guess = _closest(parts[depth:], node)
    hint = f" Did you mean '{'.'.join([*parts[:depth], *guess])}'?" if guess else ""
    where = f"under '{known}'" if known else "at the top level"
    return f"Unknown config key '{key}'.{hint} Allowed {where}: {', '.join(map(str, node))}."


def _closest(parts: list[str], node: Any) -> list[str] | None:
    """The existing key path nearest to ``parts`` below ``node``, one close match per level."""
    found: list[str] = []
    for i, part in enumerate(parts):
        if node is None:  # a free subtree (task, space): any key may follow
            return [*found, *parts[i:]]
        if not isinstance(node, Mapping):
            return None
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
            if not close:
                return None
            part = close[0]
        found.append(part)
        node = node[part]
    return found


def _only_leaf(value: Any) -> str | None:
    """``a.b`` for ``{"a": {"b": 1}}``: the path of the one value inside a mapping, else None."""
    if not isinstance(value, Mapping) or len(value) != 1:
        return None
    key, inner = next(iter(value.items()))
    below = _only_leaf(inner)
    return f"{key}.{below}" if below else str(key)
