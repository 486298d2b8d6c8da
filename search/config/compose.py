"""Composing the Hydra config of a command, with search expressions kept as strings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from search._errors import ConfigError
from search.config.modules import use_config_dirs
from search.config.schema import unknown_key_message
from search.config.storage import move_tracking_credentials

#: The project's config tree.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: The config folder of the current directory: searched after ``conf/`` and any ``--config-dir``,
#: and where `squeeze export` and `squeeze sensitivity` write when no ``--config-dir`` is given.
LOCAL_CONF = "conf"

#: The search expressions a space value may be (the syntax of Hydra's Optuna sweeper).
EXAMPLES = (
    "interval(0.1, 0.9), int(interval(2, 8)), choice(a, b), range(2, 9), "
    "tag(log, interval(1e-4, 1e-1))"
)

_SWEEP_PREFIXES = ("space.", "+space.", "++space.")


def compose_config(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "config",
    config_dirs: Sequence[str | Path] = (),
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line ``overrides``.

    Values under ``space.`` may be search expressions (``interval(0.5, 0.98)``); Hydra would read
    them as sweeps, so they are passed on as strings for `search.config.space` to parse.

    Args:
        overrides: Hydra overrides, e.g. ``["task=mnist1d_cnn", "search.n_trials=30"]``.
        config_name: The primary config in ``conf/``.
        config_dirs: More config folders searched for groups after ``conf/`` (a user's own
            ``task/``, ``experiment/``, ... yaml files); ``./conf`` of the current directory
            is searched after them (see `search_dirs`). Their parent folders, then the current
            directory, are where a ``_target_``'s module is searched when it is not importable
            as it is (`search.config.modules`).

    Raises:
        ConfigError: For an unknown config group option, key or a malformed override.
    """
    prepared = [_keep_search_expression(o) for o in overrides]
    use_config_dirs(config_dirs)
    dirs = search_dirs(config_dirs)
    try:
        cfg = _compose(config_name, prepared, dirs)
        OmegaConf.resolve(cfg)  # (${oc.env:VAR} references read the environment here)
    except MissingConfigException as err:
        raise ConfigError(_missing_option_message(err, dirs)) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_override_message(err, prepared, config_name, dirs)) from None
    except ValueError as err:  # Hydra's own, for a group option its grammar reads as a number
        raise ConfigError(_unquoted_option_message(err, prepared)) from None
    move_tracking_credentials(cfg)  # http://user:pw@host: to MLflow's variables, out of cfg
    return cfg


def _unquoted_option_message(err: ValueError, overrides: Sequence[str]) -> str:
    """Why Hydra refused an override with a ValueError: a config group option its override
    grammar reads as a number, a bool or null (a yaml file named ``nan.yaml``, ``1.yaml``)."""
    odd = []
    for override in overrides:
        key, _, value = override.partition("=")
        if "." not in key and (value.strip().lower() in _NOT_STRINGS or _number(value)):
            odd.append(override)
    which = f" ({', '.join(odd)})" if odd else ""
    return (
        f"{err}: Hydra reads an option{which} as a number, a bool or null, not as the name of "
        "a yaml file; quote it (\"task='nan'\") or rename the file"
    )


_NOT_STRINGS = {"nan", "inf", "-inf", "+inf", "null", "true", "false"}


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def search_dirs(config_dirs: Sequence[str | Path] = ()) -> list[Path]:
    """The config folders searched after ``conf/``: each ``--config-dir``, then ``./conf`` of the
    current directory when it exists (where `squeeze export` writes); ``conf/`` itself and
    repeats left out."""
    found: list[Path] = []
    local = Path.cwd() / LOCAL_CONF
    for folder in [*map(Path, config_dirs), *([local] if local.is_dir() else [])]:
        folder = folder.resolve()
        if folder != CONF_DIR and folder not in found:
            found.append(folder)
    return found


def writable_config_dir(config_dirs: Sequence[str | Path] = ()) -> Path:
    """Where commands that write configs write: the last ``--config-dir``, else ``./conf`` of the
    current directory (never the installed package's ``conf/``, unless that is where one works)."""
    return Path(config_dirs[-1]) if config_dirs else Path.cwd() / LOCAL_CONF


def group_options(group: str, dirs: Sequence[Path] = ()) -> list[str]:
    """Names of the yaml files of a config group, e.g. ``group_options("task")``, in ``conf/``
    and in ``dirs``."""
    return sorted({p.stem for d in (CONF_DIR, *dirs) for p in (Path(d) / group).glob("*.yaml")})


def task_option(task: Any, config_dirs: Sequence[str | Path] = ()) -> str:
    """The option of the ``task`` group (a yaml file's name, as ``task=<option>`` selects it)
    that composes ``task`` (a composed config's ``task``): the file named as the task (squeeze's
    own, README's examples), else the first whose ``task`` has the same ``_target_`` and
    ``name`` (``my_conf/task/seg.yaml`` naming its task ``shapes_seg``); ``task.name`` where
    none does."""
    name, target = task.get("name"), task.get("_target_")
    dirs = search_dirs(config_dirs)
    options = group_options("task", dirs)
    for option in sorted(options, key=lambda o: o != name):  # its own name first
        try:
            composed = compose_config([f"task={option}"], config_dirs=config_dirs).task
        except ConfigError:
            continue
        if composed.get("name") == name and composed.get("_target_") == target:
            return option
    return str(name)


#: The config a space's defaults list names to get an entry for every compressor (``-
#: _compressors``): made at compose time from the yaml files of the ``compressor`` group (the
#: project's and those of each config folder), so that a new method's yaml is all a space needs to
#: offer it.
COMPRESSORS_NODE = "_compressors"


def _register_compressors(dirs: Sequence[Path]) -> None:
    """Store ``space/_compressors`` in Hydra's config store: a defaults list that places each
    ``compressor/<name>.yaml`` at ``space.<name>``."""
    defaults = [{f"/compressor@{name}": name} for name in group_options("compressor", dirs)]
    ConfigStore.instance().store(group="space", name=COMPRESSORS_NODE, node={"defaults": defaults})


def _compose(config_name: str, overrides: list[str], dirs: Sequence[Path]) -> DictConfig:
    _register_compressors(dirs)
    if dirs:
        paths = ", ".join(f"file://{d}" for d in dirs)
        overrides = [*overrides, f"hydra.searchpath=[{paths}]"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


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


def _missing_option_message(err: MissingConfigException, dirs: Sequence[Path]) -> str:
    text = str(err)
    match = re.search(r"Could not find '([\w/]+?)/([^'/]+)'", text)
    if match is None:
        return text.splitlines()[0]
    group, name = match.group(1).split("/")[-1], match.group(2)
    options = ", ".join(group_options(group, dirs)) or "none"
    return f"Unknown {group} '{name}' (no conf/{group}/{name}.yaml). Available: {options}."


def _override_message(
    err: Exception, overrides: list[str], config_name: str, dirs: Sequence[Path]
) -> str:
    """Hydra's message, except for a key that does not exist: that one names the closest key
    (``serch.n_trials`` -> ``search.n_trials``) instead of Hydra's advice to add it with '+'."""
    missing_env = re.search(r"Environment variable '([^']+)' not found", str(err))
    if missing_env is not None:
        variable = missing_env.group(1)
        keys = [o.partition("=")[0].lstrip("+~") for o in overrides if variable in o]
        return (
            f"The config value of {', '.join(keys) or 'a key'} reads the environment variable "
            f"{variable} (${{oc.env:{variable}}}), which is not set. Set it first: export "
            f"{variable}=<the password> (see README, Passwords)."
        )
    match = re.match(r"Could not override '([^']+)'", str(err))
    if match is not None:
        tree = _known_keys(config_name, overrides, dirs, missing=match.group(1))
        if tree is not None:
            return unknown_key_message(match.group(1), tree)
    return f"Invalid config override: {err}"


def _known_keys(
    config_name: str, overrides: list[str], dirs: Sequence[Path], *, missing: str
) -> dict[str, Any] | None:
    """The keys the config has with the user's choices of groups (``task=...``) but none of
    the values, or None if ``missing`` is among them after all (another problem)."""
    choices = [o for o in overrides if "." not in o.partition("=")[0] and o[:1] not in "+~"]
    choices = [o for o in choices if o.partition("=")[0] != missing]
    for attempt in (choices, []):
        try:
            tree = OmegaConf.to_container(_compose(config_name, attempt, dirs), resolve=False)
            break
        except (HydraException, OmegaConfBaseException):
            continue
    else:
        return None
    tree.setdefault("experiment", None)  # a group of the defaults list, not a key
    node: Any = tree
    for part in missing.split("."):
        if not isinstance(node, dict) or part not in node:
            return tree
        node = node[part]
    return None
