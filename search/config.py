"""Composing the Hydra config of a command, with search expressions kept as strings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from search._errors import ConfigError
from search.space import EXAMPLES

#: The project's config tree.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

_SWEEP_PREFIXES = ("space.", "+space.", "++space.")


def compose_config(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "config",
    config_dirs: Sequence[str | Path] = (),
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line ``overrides``.

    Values under ``space.`` may be search expressions (``interval(0.5, 0.98)``); Hydra would read
    them as sweeps, so they are passed on as strings for `search.space` to parse.

    Args:
        overrides: Hydra overrides, e.g. ``["task=mnist1d_cnn", "search.n_trials=30"]``.
        config_name: The primary config in ``conf/``.
        config_dirs: More config folders searched for groups after ``conf/`` (a user's own
            ``task/``, ``experiment/``, ... yaml files).

    Raises:
        ConfigError: For an unknown config group option, key or a malformed override.
    """
    prepared = [_keep_search_expression(o) for o in overrides]
    if config_dirs:
        dirs = ", ".join(f"file://{Path(d).resolve()}" for d in config_dirs)
        prepared.append(f"hydra.searchpath=[{dirs}]")
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=prepared)
        OmegaConf.resolve(cfg)
    except MissingConfigException as err:
        raise ConfigError(_missing_option_message(err)) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"Invalid config override: {err}") from None
    return cfg


def group_options(group: str) -> list[str]:
    """Names of the yaml files of a config group, e.g. ``group_options("task")``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _keep_search_expression(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep or not key.startswith(_SWEEP_PREFIXES):
        return override
    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException as err:
        raise ConfigError(
            f"Malformed search expression for '{key.lstrip('+')}': {value!r} ({err}). Expected a "
            f"fixed value or one of: {EXAMPLES}."
        ) from None
    if not parsed.is_sweep_override():
        return override
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{escaped}'"


def _missing_option_message(err: MissingConfigException) -> str:
    text = str(err)
    match = re.search(r"Could not find '([\w/]+?)/([^'/]+)'", text)
    if match is None:
        return text.splitlines()[0]
    group, name = match.group(1).split("/")[-1], match.group(2)
    options = ", ".join(group_options(group)) or "none"
    return f"Unknown {group} '{name}' (no conf/{group}/{name}.yaml). Available: {options}."
