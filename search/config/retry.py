"""An Optuna storage that rides out an outage of its database: each call is retried with back-off.

A PostgreSQL server that restarts, a network that drops for seconds, a SQLite file locked by
another process: Optuna's `RDBStorage` raises on the first failed call (an ``OperationalError``,
or a ``StorageInternalError`` that wraps one), and every worker of a sweep dies with it.
`RetryingStorage` wraps the storage a study uses, so that every call (asking for a trial,
telling it, a user attribute, a heartbeat, the polls of the workers) is retried, with back-off,
for up to ``search.storage_retry_s`` seconds, with one warning when the outage starts and one
line when it ends. After that the sweep stops (`search._errors.SweepStopped`, one line naming
the cause); so does a storage whose disk is full, at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat

from search._errors import SweepStopped
from search.failures import failure_reason, out_of_space

logger = logging.getLogger(__name__)

#: The longest wait between two tries, in seconds.
MAX_DELAY_S = 5.0
#: Names of the error types that mean "not reachable now" (psycopg2, sqlite3, SQLAlchemy).
_TRANSIENT = ("OperationalError", "InterfaceError", "DisconnectionError")


def transient(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it comes from) says the database cannot be reached or is
    locked now, rather than that the call was wrong."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in _TRANSIENT or getattr(err, "connection_invalidated", False):
            return True
        err = err.__cause__ or err.__context__
    return False


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """``storage`` with every call retried while its database is unreachable.

    Args:
        storage: The storage to wrap (as `optuna.storages.get_storage` returns it).
        retry_s: Seconds an outage is ridden out before the sweep stops (0: not at all).
        name: The storage as shown in messages (its password masked).
    """

    def __init__(self, storage: BaseStorage, *, retry_s: float, name: str) -> None:
        self._inner, self._retry_s, self._name = storage, float(retry_s), name
        self._down_since: float | None = None
        self._lock = threading.Lock()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        delay, deadline = 0.25, None
        while True:
            try:
                result = getattr(self._inner, method)(*args, **kwargs)
            except Exception as err:
                if out_of_space(err):
                    raise SweepStopped(
                        f"the study's storage {self._name} is out of space: {_reason(err)}"
                    ) from err
                if not transient(err):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self._retry_s
                self._outage(err, now)
                if now >= deadline:
                    raise SweepStopped(
                        f"the study's storage {self._name} was unreachable for "
                        f"{self._retry_s:g} s (search.storage_retry_s): {_reason(err)}"
                    ) from err
                time.sleep(min(delay, deadline - now))
                delay = min(2 * delay, MAX_DELAY_S)
                continue
            if self._down_since is not None:
                self._back()
            return result

    def _outage(self, err: BaseException, now: float) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = now
                logger.warning(
                    "the study's storage %s is unreachable (%s); retrying for up to %g s",
                    self._name,
                    _reason(err),
                    self._retry_s,
                )

    def _back(self) -> None:
        with self._lock:
            if self._down_since is not None:
                logger.warning(
                    "the study's storage %s is reachable again (after %.0f s)",
                    self._name,
                    time.monotonic() - self._down_since,
                )
                self._down_since = None

    # Heartbeats: only where the wrapped storage keeps them.
    def get_heartbeat_interval(self) -> int | None:
        inner = self._inner
        return inner.get_heartbeat_interval() if isinstance(inner, BaseHeartbeat) else None

    def get_heartbeat_stale_trial_callback(self) -> Any:
        inner = self._inner
        if not isinstance(inner, BaseHeartbeat):
            return None
        return inner.get_heartbeat_stale_trial_callback()

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped storage has
        if name == "_inner":  # (not set yet: unpickling)
            raise AttributeError(name)
        return getattr(self._inner, name)


def retrying(action: Any, *, retry_s: float, name: str, what: str = "the study's storage") -> Any:
    """``action()``, retried like a `RetryingStorage` call (for connections of its own, such as
    the study's lock)."""
    return RetryingStorage(_Call(action), retry_s=retry_s, name=name)._call("run")


class _Call:
    def __init__(self, action: Any) -> None:
        self.run = action


def _reason(err: BaseException) -> str:
    cause = err
    while cause.__cause__ is not None and type(cause).__name__ not in _TRANSIENT:
        cause = cause.__cause__
    return failure_reason(cause)


def _retried(name: str):
    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    return method


_NAMES = {
    name
    for cls in (BaseStorage, BaseHeartbeat)
    for name, value in vars(cls).items()
    if callable(value) and (not name.startswith("_") or name == "_get_stale_trial_ids")
}
for _name in sorted(_NAMES - {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}):
    setattr(RetryingStorage, _name, _retried(_name))
RetryingStorage.__abstractmethods__ = frozenset()
