"""CPU seconds of a pytest run, per worker, per phase and per test: what the fast lane costs on a
machine too busy for its wall time to mean anything (at load 6-9 the lane's 370 CPU-seconds a
worker took 1,484 s of wall time).

A pytest plugin: each process (each ``pytest -n`` worker) writes ``<out>/<worker>.json`` with its
CPU seconds (user + system, since the process started) when configured, when collected and at
the end, and each test's CPU and wall seconds; every 10 tests too, so a run still going can be
read. Then ``python bench/lane_cpu.py <out>`` prints each worker's phases and modules and the
costliest tests. The CPU of the subprocesses a test waited for (``squeeze`` commands, spawned
workers: 4-5 s of imports each) is counted apart, as "children".

    PYTHONPATH=.:bench LANE_CPU_OUT=/tmp/lane pytest -p lane_cpu -m "not slow" -n 2 -q
    python bench/lane_cpu.py /tmp/lane [--top 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import pytest

_RECORD: dict = {"phases": {}, "tests": {}}


def _cpu(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _children() -> float:
    """CPU seconds of the subprocesses this process has waited for."""
    return _cpu(resource.RUSAGE_CHILDREN)


def _dump() -> None:
    out = Path(os.environ.get("LANE_CPU_OUT", "lane_cpu"))
    out.mkdir(parents=True, exist_ok=True)
    _RECORD["cpu_now"] = _cpu()
    _RECORD["children_now"] = _children()
    _RECORD["wall"] = time.time() - _RECORD["wall0"]
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (out / f"{name}.json.tmp").write_text(json.dumps(_RECORD))
    os.replace(out / f"{name}.json.tmp", out / f"{name}.json")


def pytest_configure(config) -> None:
    _RECORD["phases"]["configure"] = _cpu()
    _RECORD["wall0"] = time.time()


def pytest_collection_finish(session) -> None:
    _RECORD["phases"]["collected"] = _cpu()
    _RECORD["n_collected"] = len(session.items)
    _dump()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall, children = _cpu(), time.time(), _children()
    yield
    _RECORD["tests"][item.nodeid] = [_cpu() - cpu, time.time() - wall, _children() - children]
    if len(_RECORD["tests"]) % 10 == 0:
        _dump()


def pytest_sessionfinish(session) -> None:
    _RECORD["phases"]["finish"] = _cpu()
    _dump()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    tests = []
    for path in sorted(args.out.glob("*.json")):
        record = json.loads(path.read_text())
        phases = {k: round(v, 1) for k, v in record["phases"].items()}
        rows = {k: (*v, 0.0)[:3] for k, v in record["tests"].items()}  # (older files: no children)
        cpu = sum(c for c, _, _ in rows.values())
        children = sum(k for _, _, k in rows.values())
        print(f"{path.stem}: CPU s since the process started {phases}")
        print(
            f"  {len(rows)} tests: {cpu:.1f} CPU s (+ {children:.1f} in children); the process: "
            f"{record['cpu_now']:.1f} CPU s, {record['wall']:.0f} wall s since configured"
        )
        modules: dict[str, list[float]] = {}
        for nodeid, (c, w, k) in rows.items():
            row = modules.setdefault(nodeid.split("::")[0], [0.0, 0.0, 0.0, 0])
            row[0], row[1], row[2], row[3] = row[0] + c, row[1] + w, row[2] + k, row[3] + 1
        for module, (c, w, k, n) in sorted(modules.items(), key=lambda kv: -kv[1][0] - kv[1][2]):
            print(f"  {c:7.1f} CPU s {k:6.1f} children {w:7.1f} wall s {n:4d} tests  {module}")
        tests += [(c + k, c, k, w, nodeid, path.stem) for nodeid, (c, w, k) in rows.items()]
    print(f"costliest tests, their own CPU and their children's ({len(tests)} in all):")
    for _, c, k, w, nodeid, worker in sorted(tests, reverse=True)[: args.top]:
        print(f"  {c:6.2f} CPU s {k:5.2f} children {w:6.1f} wall s {worker} {nodeid}")


if __name__ == "__main__":
    main()
