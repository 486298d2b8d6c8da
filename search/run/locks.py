"""Locks held while a trial is claimed: a file lock (``fcntl.flock``) for the processes of one
machine, a PostgreSQL advisory lock for workers on many.

A session-level advisory lock lives as long as its database session, so a session that outlives
its use holds the lock forever: a connection its process could no longer use (its unlock failed
on a half-open connection, e.g. behind a proxy or NAT that dropped one side) while the server
still has it open. The lock's connection therefore names itself in ``pg_stat_activity``
(``squeeze lock <pid>@<host>``), is closed whatever its unlock did, and while this
process waits for the lock it ends any session of its own that still holds it while no lock of
this process is alive on it (a leftover). A wait on another process's session
is logged with that session's name once a minute.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy

from search.config.retry import retrying
from search.config.storage import connect_args, mask_url

logger = logging.getLogger(__name__)

#: Seconds one wait for the advisory lock lasts before this process looks at who holds it.
LOCK_WAIT_S = 5
#: Seconds between two log lines while the lock is held by another process.
_REPORT_EVERY_S = 60.0
#: Server pids of this process's lock sessions in use now, held or waiting (threads may have
#: several): only other sessions of this process can be leftovers.
_LIVE: set[int] = set()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder, if absent) for the body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def advisory_lock(storage: str, name: str, *, retry_s: float) -> Iterator[None]:
    """Hold PostgreSQL's session-level advisory lock named ``name`` on the server ``storage``
    names for the body; reaching the server is retried for up to ``retry_s`` seconds."""
    key = lock_key(name)
    options = connect_args(storage, "lock")
    engine = sqlalchemy.create_engine(
        storage,
        poolclass=sqlalchemy.pool.NullPool,
        isolation_level="AUTOCOMMIT",  # (idle while held, not "idle in transaction")
        connect_args=options,
    )
    label = options.get("application_name")

    def lock() -> tuple[sqlalchemy.Connection, int]:
        conn, server_pid = engine.connect(), None
        try:
            conn.execute(sqlalchemy.text(f"SET lock_timeout = '{int(LOCK_WAIT_S * 1000)}ms'"))
            server_pid = conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
            _LIVE.add(server_pid)  # (before it holds the lock: no other thread ends it)
            _wait_for(conn, key, label)
        except BaseException:
            _LIVE.discard(server_pid)
            end_session(conn)
            raise
        return conn, server_pid

    try:
        # a killed worker's connection closes: the lock is freed
        conn, server_pid = retrying(lock, retry_s=retry_s, name=mask_url(storage))
        try:
            yield
        finally:
            _LIVE.discard(server_pid)
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            except sqlalchemy.exc.DBAPIError as err:  # the connection died: so did its lock
                logger.debug("advisory unlock: %s", err)
            finally:  # the session ends whatever the unlock did: its locks go with it
                end_session(conn)
    finally:
        engine.dispose()


def lock_key(name: str) -> int:
    """The advisory lock's key (a signed bigint) for lock ``name``."""
    key = int.from_bytes(hashlib.sha256(f"squeeze:{name}".encode()).digest()[:8], "big")
    return key - (1 << 64) if key >= 1 << 63 else key


def _wait_for(conn: sqlalchemy.Connection, key: int, label: str | None) -> None:
    """Take the lock ``key`` on ``conn``, in waits of `LOCK_WAIT_S` seconds; between two, end
    this process's own leftover sessions that hold it (named as this process's, held by no
    lock of it alive now) and say who else does."""
    start = reported = time.monotonic()
    while True:
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            return
        except sqlalchemy.exc.OperationalError as err:
            if getattr(err.orig, "pgcode", None) != "55P03":  # lock_not_available
                raise
        holders = _holders(conn, key)
        for pid, name in holders:
            if label is not None and name == label and pid not in _LIVE:
                logger.warning(
                    "ending a connection of this process that still held the study's lock "
                    "(server pid %d): its unlock was lost",
                    pid,
                )
                conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        if time.monotonic() - reported >= _REPORT_EVERY_S:
            reported = time.monotonic()
            logger.warning(
                "waiting %.0f s for the study's lock, held by %s",
                reported - start,
                ", ".join(f"{name or 'a session'} (server pid {pid})" for pid, name in holders)
                or "no one now",
            )


def _holders(conn: sqlalchemy.Connection, key: int) -> list[tuple[int, str]]:
    """Server pid and application name of the sessions holding advisory lock ``key``."""
    query = sqlalchemy.text(
        "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.classid = :high AND l.objid = :low AND a.pid <> pg_backend_pid()"
    )
    unsigned = key % (1 << 64)
    rows = conn.execute(query, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF})
    return [(int(pid), str(name or "")) for pid, name in rows]


def end_session(conn: sqlalchemy.Connection) -> None:
    """Close ``conn``'s database connection now (not when the garbage collector finds it)."""
    try:
        conn.invalidate()
        conn.close()
    except Exception as err:  # noqa: BLE001 - a connection already gone
        logger.debug("closing the lock's connection: %s", err)
