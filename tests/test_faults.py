"""Faults a sweep must survive without losing data: a full disk, a database outage, two sweeps
started at once (issue 23). A full disk is a patched writer that raises ``OSError(ENOSPC)``; a
database outage is a real TCP proxy in front of the real PostgreSQL, stopped and started."""

from __future__ import annotations

import errno
import logging
import os

import optuna
import pytest
from optuna.trial import TrialState

from search.config.storage import open_storage


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- the journal file ----------------------------------------------------------------------


def _journal_study(path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=open_storage(str(path)), load_if_exists=True)


def test_a_journal_cut_mid_write_is_repaired_on_open(tmp_path, caplog):
    path = tmp_path / "optuna.journal"
    study = _journal_study(path)
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 1.0)
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a writer killed (or out of space) in the middle of a line
        f.write(b'{"op_code":4,"worker_id":"killed-mid')  # (no real worker id holds a "k")
    with caplog.at_level(logging.WARNING, logger="search.config.journal"):
        study = _journal_study(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cut mid-write" in warnings[0]
    repaired = path.read_bytes()
    assert repaired.startswith(whole) and b"killed-mid" not in repaired
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 2.0)
    again = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert [t.state for t in again.trials] == [TrialState.COMPLETE] * 2
    assert [t.value for t in again.trials] == [1.0, 2.0]


def test_a_journal_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "optuna.journal"
    study = _journal_study(path)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    before = path.read_bytes()

    def half_then_full(fd, data):  # the disk fills up halfway through the record
        os.write(fd, data[: len(data) // 2])
        _disk_full()

    monkeypatch.setattr("search.config.journal._append", half_then_full)
    with pytest.raises(Exception, match="No space left"):  # (the sweep stops: SweepStopped)
        study.tell(trial, 1.0)
    assert path.read_bytes() == before
    monkeypatch.undo()  # space freed
    again = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert [t.state for t in again.trials] == [TrialState.RUNNING]
    again.tell(again.trials[0].number, 1.0)
    assert optuna.load_study(study_name="s", storage=open_storage(str(path))).trials[0].value == 1


# --- two sweeps of one study started at once ------------------------------------------------


@pytest.mark.slow
def test_two_sweeps_of_one_study_with_different_spaces_cannot_both_run(
    tmp_path, cache_dir, monkeypatch, capsys
):
    from search import compose_config, run_sweep
    from search.cli import main
    from search.run import study as study_module
    from tests.conftest import sweep_overrides

    codes = []
    prepare = study_module._prepare

    def second_sweep_starts_meanwhile(*args, **kwargs):  # while the first prepares its baseline
        if not codes:
            overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=1")
            codes.append(main(["sweep", "--quiet", *overrides, "space.quant.bits=4"]))
        return prepare(*args, **kwargs)

    monkeypatch.setattr(study_module, "_prepare", second_sweep_starts_meanwhile)
    result = run_sweep(compose_config(sweep_overrides(tmp_path, cache_dir, "search.n_trials=1")))
    assert codes == [2]
    assert "was started with another space than this config" in capsys.readouterr().err
    study = optuna.load_study(
        study_name=result.study_name, storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


# --- a new MLflow SQLite database -------------------------------------------------------------


def _sqlite_full_at(statement: str):
    """A SQLAlchemy hook failing ``statement`` as SQLite does on a full disk."""
    import sqlite3

    def full(conn, cursor, text, *args):
        if text.lstrip().startswith(statement):
            raise sqlite3.OperationalError("database or disk is full")

    return full


@pytest.mark.slow
def test_a_new_mlflow_db_on_a_full_disk_leaves_no_half_database(tmp_path):
    import sqlalchemy

    from search.run.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    hook = _sqlite_full_at("DROP TABLE params")  # halfway through MLflow's migrations
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", hook)
    try:
        with pytest.raises(Exception, match="disk is full"):
            Tracker(uri, "squeeze")
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", hook)
    assert not (tmp_path / "mlflow.db").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    tracker = Tracker(uri, "squeeze")  # space freed: the next sweep creates it whole
    tracker.close()
    assert tracker.client.get_experiment_by_name("squeeze") is not None


def _first_use(uri: str, barrier) -> None:
    from search.run.tracking import Tracker

    barrier.wait()
    Tracker(uri, "squeeze").close()


@pytest.mark.slow
def test_two_sweeps_creating_one_mlflow_db_at_once_both_work(tmp_path):
    import multiprocessing

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    processes = [context.Process(target=_first_use, args=(uri, barrier)) for _ in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    assert [p.exitcode for p in processes] == [0, 0]
    names = [e.name for e in MlflowClient(uri).search_experiments()]
    assert names.count("squeeze") == 1


# --- a full disk mid-sweep --------------------------------------------------------------------


def _sweep(tmp_path, cache_dir, *extra: str) -> tuple[int, str]:
    from search.cli import main
    from tests.conftest import sweep_overrides

    code = main(["sweep", "--quiet", *sweep_overrides(tmp_path, cache_dir, *extra)])
    return code


def _trials(tmp_path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(f"{tmp_path}/optuna.journal")
    return optuna.load_study(study_name="digits_mlp", storage=storage).trials


@pytest.mark.slow
def test_a_trial_whose_mlflow_run_cannot_be_written_is_not_complete(
    tmp_path, cache_dir, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    from search.run import tracking

    write = tracking._write

    def full_for_trials(client, run_id, params, metrics, tags, *args):
        if tags.get("squeeze.state") == "COMPLETE":  # a completed trial's run: the disk is full
            _disk_full()
        return write(client, run_id, params, metrics, tags, *args)

    monkeypatch.setattr(tracking, "_write", full_for_trials)  # (the writer forks with it)
    code = _sweep(tmp_path, cache_dir, "search.n_trials=2", "search.warm_start=false")
    err = capsys.readouterr().err
    assert code == 1
    assert "squeeze: stopped: the MLflow store" in err and "No space left on device" in err
    assert "Traceback" not in err
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL]  # told to Optuna only once written
    assert "No space left on device" in trials[0].user_attrs["fail_reason"]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(
        trials[0].user_attrs["mlflow_run_id"]
    )
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_a_full_output_dir_stops_the_sweep_at_once_and_keeps_finished_trials(
    tmp_path, cache_dir, monkeypatch, capsys
):
    from search.run import trial as trial_module

    save_packed, calls = trial_module.save_packed, []

    def full_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            _disk_full()
        return save_packed(*args, **kwargs)

    monkeypatch.setattr(trial_module, "save_packed", full_after_one)
    code = _sweep(tmp_path, cache_dir, "search.n_trials=4", "search.warm_start=false")
    err = capsys.readouterr().err
    assert code == 1 and len(calls) == 2  # stopped at the first full write, not 3 more
    stop = [line for line in err.splitlines() if "No space left on device" in line]
    assert stop == [
        f"squeeze: stopped: cannot write {tmp_path}/trials/digits_mlp/trial-0001.sqz in "
        "output_dir: No space left on device (ENOSPC)"
    ]
    assert "Traceback" not in err and "OSError" not in err
    assert [t.state for t in _trials(tmp_path)] == [TrialState.COMPLETE, TrialState.FAIL]
    monkeypatch.undo()  # space freed: the rerun runs the stopped trial's recipe again
    assert _sweep(tmp_path, cache_dir, "search.n_trials=2", "search.warm_start=false") == 0
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == trials[1].params


# --- a database outage ------------------------------------------------------------------------


class _Proxy:
    """A TCP forwarder on 127.0.0.1 in front of PostgreSQL: `stop` drops every connection and
    refuses new ones (the server is gone), `start` listens again on the same port.

    Every socket is shut down before it is closed: a process forked meanwhile (the sweep's
    MLflow writer) holds copies of them, and a close alone would leave the server's end open."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self._target, self._socket, self._threading = (host, port), socket, threading
        self._guard = threading.Lock()  # (a connection accepted as `stop` runs is dropped too)
        self._open: list = []
        self._listener = None
        self.port = 0
        self.start()

    def start(self) -> None:
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        with self._guard:
            self.port, self._listener = s.getsockname()[1], s
        self._threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self) -> None:
        with self._guard:
            listener, self._listener = self._listener, None
            dropped, self._open = self._open, []
        for sock in (listener, *dropped):  # (shutdown wakes the thread blocked in accept)
            if sock is not None:  # (already stopped)
                self._close(sock)

    def _close(self, sock) -> None:
        try:
            sock.shutdown(self._socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                server = self._socket.create_connection(self._target)
            except OSError:
                self._close(client)
                continue
            with self._guard:
                live = self._listener is listener
                if live:
                    self._open += [client, server]
            if not live:  # stopped while this one connected
                self._close(client)
                self._close(server)
                return
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src)
            self._close(dst)


@pytest.fixture
def pg_proxy(pg_url):
    import uuid

    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = _Proxy(url.host, url.port or 5432)
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield proxy, proxied, name
    proxy.stop()
    try:
        optuna.delete_study(study_name=name, storage=pg_url)
    except KeyError:
        pass


@pytest.mark.slow
def test_a_two_worker_sweep_survives_a_postgresql_outage(tmp_path, cache_dir, pg_url, pg_proxy):
    import threading

    from search import compose_config, run_sweep
    from tests.conftest import sweep_overrides

    proxy, proxied, name = pg_proxy
    outages = []

    def outage_after_first_trial(study, trial) -> None:
        if not outages:  # the server goes away for a few seconds, mid-sweep
            proxy.stop()
            outages.append(threading.Timer(3.0, proxy.start))
            outages[0].start()

    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=4",
        "search.n_jobs=2",
        f"search.study_name={name}",
        "search.storage_retry_s=120",
        storage=proxied,
    )
    run_sweep(compose_config(overrides), callbacks=[outage_after_first_trial])
    assert outages
    trials = optuna.load_study(study_name=name, storage=pg_url).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert sum(t.state == TrialState.COMPLETE for t in finished) >= 4
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_a_postgresql_outage_longer_than_the_retry_time_stops_the_sweep_in_one_line(
    tmp_path, cache_dir, pg_url, pg_proxy, monkeypatch, capsys
):
    from search.run import loop
    from tests.conftest import sweep_overrides

    proxy, proxied, name = pg_proxy
    run_one = loop.run_one

    def server_gone_after_first_trial(*args):
        frozen = run_one(*args)
        proxy.stop()  # and it does not come back
        return frozen

    monkeypatch.setattr(loop, "run_one", server_gone_after_first_trial)
    from search.cli import main

    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=3",
        f"search.study_name={name}",
        "search.storage_retry_s=2",
        storage=proxied,
    )
    code = main(["sweep", "--quiet", *overrides])
    err = capsys.readouterr().err
    assert code == 1
    stop = [line for line in err.splitlines() if line.startswith("squeeze: stopped:")]
    assert len(stop) == 1 and "was unreachable for 2 s (search.storage_retry_s)" in stop[0]
    assert "Traceback" not in err
    trials = optuna.load_study(study_name=name, storage=pg_url).trials
    assert trials[0].state == TrialState.COMPLETE  # the finished trial is kept


def test_a_server_that_accepts_but_never_answers_is_an_outage_not_a_hang(monkeypatch):
    """A TCP listener that never speaks PostgreSQL (a hung server, a dead proxy's backlog): the
    connection fails after `CONNECT_TIMEOUT_S`, is retried like any outage, and the sweep stops
    in one line instead of waiting forever."""
    import socket

    from search._errors import SweepStopped
    from search.config import storage as storage_module

    monkeypatch.setattr(storage_module, "CONNECT_TIMEOUT_S", 2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nothing ever answers
    try:
        url = f"postgresql+psycopg2://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
        with pytest.raises(SweepStopped, match=r"unreachable for 1 s .*timeout expired"):
            storage_module.open_storage(url, retry_s=1.0)
    finally:
        silent.close()


def test_the_study_lock_names_its_holder_and_ends_its_session(pg_url):
    """The lock's connection says whose it is in pg_stat_activity while held, and its session
    is gone once the lock is released (a session left open would hold the lock forever)."""
    import os
    import socket
    import uuid

    import sqlalchemy

    from search.run.budget import budget_lock

    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    label = f"squeeze lock {os.getpid()}@{socket.gethostname()}"[:63]
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)

    def sessions() -> list[str]:
        with engine.connect() as conn:
            query = "SELECT state FROM pg_stat_activity WHERE application_name = :label"
            return [row[0] for row in conn.execute(sqlalchemy.text(query), {"label": label})]

    try:
        with budget_lock(pg_url, name, retry_s=5):
            assert sessions() == ["idle"]  # autocommit: not "idle in transaction"
        assert sessions() == []
    finally:
        engine.dispose()


def _lock_session(pg_url: str, name: str, application_name: str):
    """A database session of its own holding the study lock ``name`` (as a leftover would)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    from search.run.locks import lock_key

    url = make_url(pg_url)
    conn = psycopg2.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        dbname=url.database,
        application_name=application_name,
    )
    conn.autocommit = True
    conn.cursor().execute("SELECT pg_advisory_lock(%s)", (lock_key(name),))
    return conn


def test_a_session_of_this_process_left_holding_the_study_lock_is_ended(
    pg_url, monkeypatch, caplog
):
    """An unlock lost on a half-open connection leaves the server's session holding the lock;
    the next claim of the same process ends that session instead of waiting for it forever."""
    import os
    import socket
    import uuid

    from search.run import locks
    from search.run.budget import budget_lock

    monkeypatch.setattr(locks, "LOCK_WAIT_S", 1)
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    leftover = _lock_session(pg_url, name, f"squeeze lock {os.getpid()}@{socket.gethostname()}")
    try:
        with budget_lock(pg_url, name, retry_s=5):
            pass
        assert "still held the study's lock" in caplog.text
        with pytest.raises(Exception, match="terminat|closed"):
            leftover.cursor().execute("SELECT 1")
    finally:
        leftover.close()


def test_the_study_lock_waits_for_another_process_without_ending_its_session(pg_url, monkeypatch):
    import threading
    import uuid

    from search.run import locks
    from search.run.budget import budget_lock

    monkeypatch.setattr(locks, "LOCK_WAIT_S", 1)
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    other = _lock_session(pg_url, name, "squeeze lock 1@another-machine")
    held = threading.Event()

    def claim() -> None:
        with budget_lock(pg_url, name, retry_s=5):
            held.set()

    thread = threading.Thread(target=claim, daemon=True)
    thread.start()
    try:
        assert not held.wait(3)  # three waits of 1 s: still the other's
        other.cursor().execute("SELECT 1")  # its session lives
        other.cursor().execute("SELECT pg_advisory_unlock_all()")
        assert held.wait(60)
        thread.join(60)
    finally:
        other.close()


def test_threads_of_one_process_take_the_study_lock_in_turn_without_ending_each_other(
    pg_url, monkeypatch, caplog
):
    """Two threads of this process share its name in pg_stat_activity: the one waiting must not
    take the other's live session for a leftover."""
    import threading
    import uuid

    from search.run import locks
    from search.run.budget import budget_lock

    monkeypatch.setattr(locks, "LOCK_WAIT_S", 1)
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    inside, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with budget_lock(pg_url, name, retry_s=5):
            order.append("first")
            inside.set()
            release.wait(60)
            order.append("first done")

    def second() -> None:
        with budget_lock(pg_url, name, retry_s=5):
            order.append("second")

    a = threading.Thread(target=first, daemon=True)
    a.start()
    assert inside.wait(60)
    b = threading.Thread(target=second, daemon=True)
    b.start()
    b.join(3)  # three waits of 1 s, the holder alive and of this process
    assert b.is_alive() and order == ["first"]
    release.set()
    a.join(60)
    b.join(60)
    assert order == ["first", "first done", "second"]
    assert "still held the study's lock" not in caplog.text
