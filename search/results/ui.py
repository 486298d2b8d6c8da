"""``squeeze ui``: MLflow's UI opened on a study's runs, not on its GenAI overview.

`find_study` reads the MLflow experiment of ``tracking.*`` and the study's parent run, saves the
study's views if a sweep before them did not (`search.run.mlflow_views`), and gives the link;
`serve` starts ``mlflow server`` on a local tracking store (SQLite, PostgreSQL) and waits until
it answers. A tracking server (``http://...``) is not started: the link points at it.
"""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from search._errors import ConfigError
from search.config.storage import mask_url
from search.run.mlflow_views import VIEW_TAG_PREFIX, runs_url, save_views, view_key

#: How long ``mlflow server`` may take to answer (it took 20-120 s on a busy 2-core machine).
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class StudyRuns:
    """Where a study's runs are: the MLflow experiment and the study's name."""

    experiment_id: str
    study: str

    def url(self, base: str, *, front: bool = False) -> str:
        """The link to the study's runs (``front``: its Pareto front) on the server ``base``."""
        return runs_url(base, self.experiment_id, self.study, front=front)


def find_study(cfg: DictConfig, study: str | None = None) -> StudyRuns:
    """The study ``study`` (default: the latest) in ``tracking.mlflow_experiment``; its views are
    saved if they are missing.

    Raises:
        ConfigError: If the experiment or the study is not there (it names those that are).
    """
    uri, name = str(cfg.tracking.uri), str(cfg.tracking.mlflow_experiment)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ConfigError(
            f"tracking.mlflow_experiment {name!r} is not in tracking.uri {mask_url(uri)}: run "
            "`squeeze sweep` first, or name the experiment and store it wrote to."
        )
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`squeeze.role` = 'study'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    studies = list(
        dict.fromkeys(r.data.tags.get("squeeze.study", r.info.run_name) for r in parents)
    )
    if not studies or (study is not None and study not in studies):
        raise ConfigError(
            f"--study {study or '(the latest)'}: no such study in MLflow experiment {name!r}. "
            f"Studies there: {', '.join(studies) or 'none'}."
        )
    chosen = study or studies[0]
    if VIEW_TAG_PREFIX + view_key(chosen) not in experiment.tags:  # a sweep before the views
        params = next(r for r in parents if r.data.tags.get("squeeze.study") == chosen).data.params
        objectives = ast.literal_eval(params.get("search.objectives", "['val_acc']"))
        save_views(client, experiment.experiment_id, chosen, [str(o) for o in objectives])
    return StudyRuns(experiment.experiment_id, chosen)


def server_base(uri: str) -> str | None:
    """A tracking server's own address (``http(s)://host:port``, credentials left out), or None
    for a store that ``squeeze ui`` serves itself."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve(
    uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    ready: Callable[[str], None],
    timeout: float = START_TIMEOUT_S,
) -> int:
    """Run ``mlflow server`` on the tracking store ``uri`` until it stops or Ctrl-C; call
    ``ready(base)`` once it answers. Its output goes to a temporary log file (the links stay
    readable). Returns 0 after Ctrl-C, else the server's exit code.

    Raises:
        ConfigError: If the server stops before it answers (e.g. the port is taken); it quotes
            the end of the server's log.
    """
    base = f"http://{host}:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    log = tempfile.NamedTemporaryFile(prefix="squeeze-ui-", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(base):
            if server.poll() is not None:
                tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-5:]
                raise ConfigError(
                    f"mlflow server stopped (exit {server.returncode}) before it answered on "
                    f"{base}; is port {port} taken? Choose another with --port (0: any free "
                    "one). The end of its log:\n  " + "\n  ".join(tail)
                )
            if time.monotonic() > deadline:
                raise ConfigError(f"mlflow server did not answer on {base} in {timeout:.0f} s.")
            time.sleep(0.5)
        ready(base)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
