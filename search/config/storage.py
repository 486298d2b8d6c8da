"""Optuna storages: check a storage URL up front, open it, and mask passwords in URLs.

Two kinds of storage are supported:

- a journal file path (``optuna.journal``, the default): several processes on one machine;
- a database URL: ``sqlite:///file.db`` (one process at a time) or
  ``postgresql+psycopg2://user@host/db`` (workers on many machines, with heartbeats so that
  trials of a lost worker are failed).
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from search._errors import ConfigError

#: URL schemes accepted by ``search.storage`` (the part before any ``+driver``).
SCHEMES = ("sqlite", "postgresql")
_HINT = "Use a journal file path, sqlite:///file.db or postgresql+psycopg2://user@host/db."
_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)@")
#: A password given as a reference to an environment variable (``${oc.env:VAR}``, which
#: OmegaConf resolves when the config is composed): no secret, never masked.
_ENV_REFERENCE = re.compile(r"\$\{oc\.env:[A-Za-z_][A-Za-z0-9_]*(,[^}]*)?\}")
#: The environment variable a printed command reads each URL's password from.
PASSWORD_ENV = {
    "search.storage": "SQUEEZE_DB_PASSWORD",
    "tracking.uri": "SQUEEZE_TRACKING_PASSWORD",
}
#: Where an MLflow client reads the credentials of a tracking server (``http://user:pw@host``).
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def mask_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it as ``***``
    (a password read from the environment, ``${oc.env:VAR}``, is left as it is)."""

    def mask(match: re.Match) -> str:
        if _ENV_REFERENCE.fullmatch(match.group(2)):
            return match.group(0)
        return f"{match.group(1)}***@"

    return _PASSWORD.sub(mask, str(text))


def masked_config(cfg: Any) -> Any:
    """``cfg`` (a `DictConfig`, resolved) as plain data with every URL's password masked: what
    any config file or MLflow artifact squeeze writes holds."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        return mask_url(value) if isinstance(value, str) else value

    if isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return mask(cfg)


def password_from_env(override: str) -> tuple[str, list[str]]:
    """A command-line override that says where results live, fit to print as a command to
    paste: the password of a ``search.storage`` or database ``tracking.uri`` URL replaced by
    ``${oc.env:VAR}`` (`PASSWORD_ENV`: OmegaConf reads it from the environment when the
    config is composed), the credentials of a tracking server's URL left out (MLflow reads
    them from `MLFLOW_CREDENTIALS`). Returns the override and the variables it needs set.

    Example:
        >>> password_from_env("search.storage=postgresql://me:pw@db/optuna")
        ('search.storage=postgresql://me:${oc.env:SQUEEZE_DB_PASSWORD}@db/optuna', \
['SQUEEZE_DB_PASSWORD'])
    """
    key, equals, value = override.partition("=")
    name = key.lstrip("+~")
    if not equals or name not in PASSWORD_ENV:
        return override, []
    match = _PASSWORD.search(value)
    if match is None or _ENV_REFERENCE.fullmatch(match.group(2)):
        return override, []
    if name == "tracking.uri" and re.match(r"['\"]?https?://", value):
        start = match.start() + len("://")
        return f"{key}={value[:start]}{value[match.end() :]}", list(MLFLOW_CREDENTIALS)
    variable = PASSWORD_ENV[name]
    replaced = f"{match.group(1)}${{oc.env:{variable}}}@"
    return f"{key}={value[: match.start()]}{replaced}{value[match.end() :]}", [variable]


def split_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """An http(s) URL without its ``user:password@`` and the pair, or ``(uri, None)``."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri, None
    host = parts.netloc.rpartition("@")[2]
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    user = urllib.parse.unquote(parts.username or "")
    return clean, (user, urllib.parse.unquote(parts.password))


def move_tracking_credentials(cfg: Any) -> None:
    """Move the credentials of ``cfg``'s tracking server URL (``http://user:pw@host``) into
    the environment variables MLflow's client reads (`MLFLOW_CREDENTIALS`), so that the config
    (and so every file, artifact and parameter written from it) holds none; this process's
    workers inherit them."""
    tracking = cfg.get("tracking") if hasattr(cfg, "get") else None
    uri = tracking.get("uri") if tracking is not None else None
    if not isinstance(uri, str):
        return
    clean, credentials = split_credentials(uri)
    if credentials is None:
        return
    os.environ.update(dict(zip(MLFLOW_CREDENTIALS, credentials, strict=True)))
    tracking.uri = clean


def is_url(storage: str) -> bool:
    """Whether ``storage`` is a database URL rather than a journal file path."""
    return "://" in storage


def check_storage(storage: str, *, n_jobs: int = 1, connect: bool = True) -> None:
    """Check ``search.storage`` without creating anything.

    Args:
        storage: A journal file path or a database URL.
        n_jobs: Worker processes that will share it (SQLite takes one writer at a time).
        connect: Also check that a database server answers.

    Raises:
        ConfigError: For a malformed or unsupported URL, a server that does not answer, a SQLite
            file in a folder that does not exist, or SQLite shared by several workers.
    """
    if not is_url(storage):
        if not storage or storage.endswith(("/", "\\")):
            raise ConfigError(
                f"search.storage must be a journal file path or a database URL. Got {storage!r} "
                f"instead. {_HINT}"
            )
        return
    shown = mask_url(storage)
    try:
        url = make_url(storage)
    except (ArgumentError, ValueError) as err:
        raise ConfigError(f"Malformed search.storage URL {shown!r}: {err}. {_HINT}") from None
    scheme = url.get_backend_name()
    if scheme not in SCHEMES:
        raise ConfigError(f"Unsupported search.storage URL scheme {scheme!r}. {_HINT}")
    if scheme == "sqlite":
        _check_sqlite(url, shown, n_jobs)
        return
    if not url.host or not url.database:
        raise ConfigError(
            f"Malformed search.storage URL {shown!r}: it names no host or no database. {_HINT}"
        )
    if connect:
        _check_reachable(storage, shown)


def _check_sqlite(url: sqlalchemy.engine.URL, shown: str, n_jobs: int) -> None:
    if n_jobs > 1:
        raise ConfigError(
            f"search.storage {shown!r} is SQLite, which takes one writer at a time; "
            f"search.n_jobs={n_jobs} workers need a journal file path (the default, "
            "optuna.journal) or postgresql+psycopg2://user@host/db."
        )
    if not url.database or url.database == ":memory:":
        raise ConfigError(
            f"search.storage {shown!r} names no database file; an in-memory study cannot be "
            f"continued. {_HINT}"
        )
    folder = Path(url.database).resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"The folder of search.storage {shown!r} ({folder}) does not exist.")


def _check_reachable(storage: str, shown: str) -> None:
    engine = sqlalchemy.create_engine(
        storage, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 5}
    )
    try:
        with engine.connect():
            pass
    except OperationalError as err:
        reason = mask_url(str(err.orig).strip().splitlines()[0]) if err.orig else "no answer"
        raise ConfigError(f"Cannot reach search.storage {shown!r}: {reason}.") from None
    except Exception as err:  # noqa: BLE001 - a missing driver, a bad option, ...
        raise ConfigError(
            f"Cannot use search.storage {shown!r}: {mask_url(err)}. {_HINT}"
        ) from None
    finally:
        engine.dispose()


_TRACKING_HINT = (
    "Use sqlite:///mlflow.db, postgresql+psycopg2://user@host/db or the URL of an MLflow "
    "tracking server (http://host:5000)."
)


def check_tracking_uri(uri: str, *, connect: bool = True) -> None:
    """Check ``tracking.uri`` without creating anything.

    Raises:
        ConfigError: For an unsupported scheme, a SQLite file in a missing folder, or a database
            or tracking server that does not answer.
    """
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    shown = mask_url(uri)
    if scheme in ("sqlite", "postgresql"):
        try:
            check_storage(uri, connect=connect)
        except ConfigError as err:
            raise ConfigError(str(err).replace("search.storage", "tracking.uri")) from None
    elif scheme in ("http", "https"):
        if connect:
            _check_server(uri.rstrip("/"), shown)
    elif scheme != "file":
        raise ConfigError(f"Unsupported tracking.uri {shown!r}. {_TRACKING_HINT}")


def _check_server(uri: str, shown: str) -> None:
    import base64
    import urllib.error
    import urllib.request

    uri, credentials = split_credentials(uri)
    if credentials is None and all(os.environ.get(v) for v in MLFLOW_CREDENTIALS):
        credentials = (os.environ[MLFLOW_CREDENTIALS[0]], os.environ[MLFLOW_CREDENTIALS[1]])
    request = urllib.request.Request(f"{uri}/health")
    if credentials is not None:  # a server behind basic authentication
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"Cannot reach the MLflow tracking server tracking.uri {shown!r}: {reason}."
        ) from None


#: Seconds an outage of the study's storage is ridden out by default (``search.storage_retry_s``).
DEFAULT_RETRY_S = 120.0

#: SQLAlchemy drivers that take libpq's connection options.
_LIBPQ_DRIVERS = ("postgresql", "postgresql+psycopg2", "postgresql+psycopg")
#: Seconds a connection to a PostgreSQL server may take before it counts as an outage.
CONNECT_TIMEOUT_S = 10


def connect_args(storage: str, purpose: str) -> dict[str, Any]:
    """libpq options of a connection to the PostgreSQL server ``storage`` names (none for other
    storages): a connection that gets no answer, or a server that goes silent, fails within
    seconds (and is retried like any outage) instead of waiting forever; the connection names
    itself in ``pg_stat_activity`` as ``squeeze <purpose> <pid>@<host>``."""
    if not is_url(storage) or make_url(storage).drivername not in _LIBPQ_DRIVERS:
        return {}
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": f"squeeze {purpose} {os.getpid()}@{socket.gethostname()}"[:63],
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }


def open_storage(
    storage: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry_s: float = DEFAULT_RETRY_S,
) -> optuna.storages.BaseStorage:
    """An Optuna storage: a journal file for a plain path, else a database; every call is
    retried while the database is unreachable or locked, for up to ``retry_s`` seconds
    (`search.config.retry.RetryingStorage`).

    Args:
        storage: A journal file path or a database URL.
        heartbeat_interval: Seconds between the heartbeats of a running trial (database URLs of
            a server; SQLite and journal files only ever have workers on this machine, whose
            liveness is checked directly).
        grace_period: Seconds without a heartbeat after which a running trial is failed.
        retry_s: Seconds an outage is ridden out before `search._errors.SweepStopped`.
    """
    from search.config.retry import RetryingStorage, retrying

    opened = retrying(  # (opening a database reads its schema: an outage may be met here too)
        lambda: _open(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period),
        retry_s=retry_s,
        name=mask_url(storage),
    )
    return RetryingStorage(
        optuna.storages.get_storage(opened), retry_s=retry_s, name=mask_url(storage)
    )


def _open(
    storage: str, *, heartbeat_interval: int | None, grace_period: int | None
) -> optuna.storages.BaseStorage:
    if not is_url(storage):
        from optuna.storages.journal import JournalStorage

        from search.config.journal import SafeJournalBackend

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(SafeJournalBackend(storage))
    if storage.startswith("sqlite"):
        return optuna.storages.RDBStorage(storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            storage,
            engine_kwargs={"pool_pre_ping": True, "connect_args": connect_args(storage, "study")},
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )
