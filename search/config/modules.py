"""Importing what a config's ``_target_`` names, such as a user's task module.

A user's task lives in a module of their own (``my_task.py`` beside ``my_conf/``), named by the
``_target_`` of ``my_conf/task/<name>.yaml``. When that module is not importable as it is (not
installed, not on ``PYTHONPATH``), squeeze searches, in this order, the parent folder of each
``--config-dir`` and the current directory for it (``my_task.py`` or a package ``my_task/``),
and appends the first folder that holds it to ``sys.path``; nothing is added when the module
imports as it is. Worker processes a sweep starts inherit ``sys.path``.

`search.config.compose.compose_config` tells this module its ``--config-dir`` folders
(`use_config_dirs`); `import_target` is the one place a ``_target_`` is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from search._errors import ConfigError

logger = logging.getLogger(__name__)

#: The ``--config-dir`` folders of the config this process composed last.
_config_dirs: list[Path] = []


def use_config_dirs(config_dirs: Sequence[str | Path]) -> None:
    """Remember the ``--config-dir`` folders whose parents `module_folders` searches."""
    _config_dirs[:] = [Path(d).resolve() for d in config_dirs]


def module_folders(config_dirs: Sequence[str | Path] | None = None) -> list[Path]:
    """Where a module that is not importable as it is gets searched, in order: the parent of
    each ``--config-dir`` (``config_dirs``, by default those of the last composed config), then
    the current directory; repeats left out."""
    dirs = _config_dirs if config_dirs is None else [Path(d).resolve() for d in config_dirs]
    found: list[Path] = []
    for folder in [*(d.parent for d in dirs), Path.cwd().resolve()]:
        if folder not in found:
            found.append(folder)
    return found


def import_target(
    target: str, *, key: str = "task._target_", folders: Sequence[Path] | None = None
) -> Any:
    """The object ``target`` (``module.function``) names, its module made importable first.

    Args:
        target: A dotted path, e.g. ``my_task.blobs``.
        key: The config key that names it (for messages).
        folders: Where to search for a module that is not importable as it is (default:
            `module_folders`).

    Raises:
        ConfigError: Naming the module that is needed and how to make it importable, or what
            went wrong while importing it.
    """
    top = target.split(".")[0]
    if "." not in target or not top.isidentifier():
        raise ConfigError(
            f"{key} {target!r} cannot be imported: expected <module>.<function>, e.g. "
            "my_task.blobs."
        )
    if not _importable(top):
        folders = module_folders() if folders is None else list(folders)
        holder = next((f for f in folders if _holds(f, top)), None)
        if holder is None:
            raise ConfigError(_not_found_message(target, key, top, folders))
        if str(holder) not in sys.path:
            sys.path.append(str(holder))
            importlib.invalidate_caches()
            logger.info("module %s found in %s (appended to sys.path)", top, holder)
    return _locate(target, key)


def _locate(target: str, key: str) -> Any:
    """Import the longest module prefix of ``target``, then get the attributes after it."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and (name == err.name or name.startswith(f"{err.name}.")):
                continue  # this prefix is not a module; a shorter one may be
            raise ConfigError(_import_failed(target, key, name, err)) from None
        except Exception as err:  # noqa: BLE001 - the module's own code raised it
            raise ConfigError(_import_failed(target, key, name, err)) from None
        break
    else:
        raise ConfigError(f"{key} {target!r} cannot be imported: no module {parts[0]!r}.")
    for attr in parts[cut:]:
        if not hasattr(obj, attr):
            where = getattr(obj, "__file__", None) or getattr(obj, "__name__", "")
            raise ConfigError(
                f"{key} {target!r} cannot be imported: {'.'.join(parts[:cut])} ({where}) has no "
                f"attribute {attr!r}."
            )
        obj = getattr(obj, attr)
    return obj


def _import_failed(target: str, key: str, module: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (
        f"{key} {target!r} cannot be imported: importing module {module!r} raised "
        f"{type(err).__name__}{': ' + text[-1] if text else ''}."
    )


def _importable(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _holds(folder: Path, module: str) -> bool:
    """Whether ``folder`` holds module ``module`` (a file or a package folder)."""
    return (folder / f"{module}.py").is_file() or (folder / module).is_dir()


def _not_found_message(target: str, key: str, module: str, folders: Sequence[Path]) -> str:
    searched = ", ".join(str(f) for f in folders)
    return (
        f"{key} {target!r} cannot be imported: no module named {module!r} is installed or on "
        f"sys.path, and no {module}.py (or package {module}/) is in the folders searched "
        f"({searched}: each --config-dir's parent folder, then the current directory). Run "
        f"squeeze from the folder that holds {module}.py, keep your config folder beside it "
        f"(--config-dir <that folder>/<config folder>), add that folder to PYTHONPATH, or "
        "install the module (pip install -e)."
    )
