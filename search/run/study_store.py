"""A study's storage and identity: open it, claim it for a config, load it for a worker.

A study records the fingerprint of the config that started it
(`search.config.plan.fingerprint_parts`); a later sweep or worker with another task, space,
objectives, constraints or seed is refused with the parts that changed (`check_same_study`). The
storage is opened with the sweep's heartbeat and outage settings (`open_study_storage`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from search._errors import ConfigError
from search.config.blocks import AUTO_PARAMS
from search.config.early_stop import make_pruner
from search.config.plan import SweepPlan, fingerprint_parts
from search.config.storage import DEFAULT_RETRY_S, is_url, mask_url, open_storage
from search.run.budget import budget_lock


def open_study_storage(plan: SweepPlan) -> optuna.storages.BaseStorage:
    """The storage ``plan`` names, with its heartbeat and outage settings."""
    search = plan.cfg.search
    return open_storage(
        plan.storage,
        heartbeat_interval=int(search.heartbeat_interval),
        grace_period=int(search.grace_period),
        retry_s=storage_retry_s(plan),
    )


def storage_retry_s(plan: SweepPlan) -> float:
    """Seconds an outage of the study's storage is ridden out (``search.storage_retry_s``)."""
    return float(plan.cfg.search.get("storage_retry_s", DEFAULT_RETRY_S))


def load_study(plan: SweepPlan) -> optuna.Study:
    """The study ``plan`` names, for a worker joining it.

    Raises:
        ConfigError: If the storage holds no such study, one with no MLflow parent run yet, or
            one started with another config.
    """
    search = plan.cfg.search
    missing = ConfigError(
        f"No study {plan.study_name!r} in search.storage {mask_url(plan.storage)!r}. Start "
        "it with `squeeze sweep` and the same overrides, then add workers."
    )
    if not is_url(plan.storage) and not Path(plan.storage).exists():
        raise missing  # (opening a journal would create the file)
    try:
        study = optuna.load_study(
            study_name=plan.study_name,
            storage=open_study_storage(plan),
            pruner=make_pruner(search.pruner, search.pruner_options),
        )
    except KeyError:
        raise missing from None
    if "mlflow_parent_run_id" not in study.user_attrs:
        raise ConfigError(
            f"Study {plan.study_name!r} has no MLflow parent run yet: start it with "
            "`squeeze sweep` (same overrides) and add workers once it runs trials."
        )
    check_same_study(study, plan)
    return study


def name_objectives(study: optuna.Study, objectives: tuple[str, ...]) -> None:
    """Give the study its objectives' names (optuna-dashboard shows them instead of
    "Objective 0/1")."""
    if study.metric_names != list(objectives):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives))


#: Study user attribute: a hash of each part of the fingerprint (`fingerprint_parts`).
PARTS_ATTR = "fingerprint_parts"
#: Study user attribute: the values the study's space gave the parameters that may be ``auto``
#: (``{"structured.round_to": 8}``, `search.config.blocks`), named when another machine's
#: ``auto`` would change them.
AUTO_ATTR = "auto_params"


def auto_params(plan: SweepPlan) -> dict[str, Any]:
    """The values of the space's `AUTO_PARAMS` in ``plan`` (``auto`` resolved), by name."""
    space = plan.cfg.space
    return {
        f"{comp}.{key}": entry[key]
        for comp, entry in space.items()
        if isinstance(entry, Mapping)
        for key in AUTO_PARAMS
        if isinstance(entry.get(key), int)
    }


def claim_study(study: optuna.Study, plan: SweepPlan) -> None:
    """Record ``plan``'s fingerprint on a new study, or check it against the one recorded,
    under the study's lock: of two sweeps of one study with different configs started at once,
    the second is refused (`_check_same_study`), whichever wrote first."""
    with budget_lock(plan.storage, plan.study_name, retry_s=storage_retry_s(plan)):
        attrs = study.user_attrs
        if "fingerprint" not in attrs:
            study.set_user_attr(PARTS_ATTR, fingerprint_parts(plan))
            study.set_user_attr(AUTO_ATTR, auto_params(plan))
            study.set_user_attr("fingerprint", plan.fingerprint)
            return
    check_same_study(study, plan, attrs)


def check_same_study(
    study: optuna.Study, plan: SweepPlan, attrs: Mapping[str, Any] | None = None
) -> None:
    attrs = study.user_attrs if attrs is None else attrs
    previous = attrs.get("fingerprint")
    if previous is None or previous == plan.fingerprint:
        return
    recorded, parts = attrs.get(PARTS_ATTR) or {}, fingerprint_parts(plan)
    changed = sorted(k for k in {*recorded, *parts} if recorded.get(k) != parts.get(k))
    what = (
        f"another {', '.join(changed)} than this config"
        if recorded and changed
        else "another task, space, objectives, constraints or seed"
    )
    recorded_auto, auto = attrs.get(AUTO_ATTR) or {}, auto_params(plan)
    moved = {k: v for k, v in recorded_auto.items() if k in auto and auto[k] != v}
    hint = (
        " Its "
        + ", ".join(f"{k} is {v}, this config's {auto[k]}" for k, v in moved.items())
        + " (auto: the channel block of the CPU that times the sweep); continue it on this "
        "machine with " + " ".join(f"space.{k}={v}" for k, v in moved.items()) + "."
        if moved
        else ""
    )
    raise ConfigError(
        f"Study {plan.study_name!r} in {mask_url(plan.storage)} was started with {what}. "
        "Continue it with the same config, or start a new study with "
        f"search.study_name=<new name>.{hint}"
    )
