"""A new MLflow SQLite database, created whole or not at all, once however many sweeps start.

MLflow creates a SQLite tracking database on first use by running its schema migrations in the
file itself. Two processes doing so at once, or a disk that fills up halfway through, leave
tables such as ``_alembic_tmp_params`` behind, and every later run on that file fails. Here the
database is created under a file lock (``<file>.lock``, `fcntl.flock`) in a temporary file next
to it, which is renamed into place only once every migration ran: a second process waits for the
lock and then finds the whole database; a failed creation leaves no file.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from search._errors import SweepStopped
from search.run.locks import file_lock

logger = logging.getLogger(__name__)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///file.db`` tracking URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def first_use(uri: str) -> AbstractContextManager[None]:
    """Hold the lock of ``uri``'s SQLite file (nothing for other URIs) and create the file if it
    is missing, so that the block (creating the client and the experiment) runs once at a time
    on a whole database."""
    path = sqlite_file(uri)
    return nullcontext() if path is None else _created(path)


@contextmanager
def _created(path: Path) -> Iterator[None]:
    with file_lock(path.with_name(path.name + ".lock")):
        if not path.exists() or path.stat().st_size == 0:
            create(path)
        yield


def create(path: Path) -> None:
    """Create the MLflow database ``path`` (every migration run) in a temporary file beside it,
    then rename it into place; on any error remove the temporary file and re-raise."""
    from mlflow.tracking import MlflowClient

    temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    logger.info("creating the MLflow database %s", path)
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{temp}")
        client.search_experiments()  # runs the migrations
        engine = getattr(client._tracking_client.store, "engine", None)
        if engine is not None:
            engine.dispose()
        os.replace(temp, path)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepStopped(f"cannot create the MLflow database {path}: {reason}") from err
    finally:
        for leftover in (temp, *(temp.with_name(temp.name + s) for s in ("-journal", "-wal"))):
            leftover.unlink(missing_ok=True)
