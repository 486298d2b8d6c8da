"""Log lines for people: one line per fact, third-party chatter off, progress at a bounded rate.

- `OncePerRun`: a handler filter that prints a record marked ``extra={"once": True}`` once per
  command (``structured: keeping net.5 (Linear) whole`` is a fact of the model, not of each
  trial): its repeats are dropped. Records relayed from worker processes pass the same filter
  in the process that started them.
- `quiet_third_party` / `levels` / `apply_levels`: third-party libraries (onnxscript, onnx_ir,
  torch.onnx, alembic, mlflow, optuna...) log at WARNING unless ``--verbose``; worker processes
  get the levels of the process that started them.
- `Ticker`: progress lines (``trial 3 epoch 2/15 val 0.9510 (12 s)``) at most one every few
  seconds and at most `Ticker.max_lines` per job, the last step always shown once the job has
  taken long enough to show any. `Stages` keeps one per stage of a job that reports
  ``(stage, done, total)`` (a baseline's epochs, then its teacher outputs).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

#: Loggers of other libraries that say at INFO what only their developers need.
THIRD_PARTY = (
    "alembic",
    "mlflow",
    "urllib3",
    "optuna",
    "onnxscript",
    "onnx_ir",
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "httpx",
    "filelock",
)

#: Seconds between two progress lines of one job (``$SQUEEZE_PROGRESS_S`` overrides it; 0
#: shows every step, still at most `Ticker.max_lines`).
PROGRESS_ENV = "SQUEEZE_PROGRESS_S"
DEFAULT_EVERY_S = 10.0


class OncePerRun(logging.Filter):
    """Drops a record marked ``once`` whose logger and message this handler printed already
    (one filter per handler: a shared one would let only the first handler print it)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "once", False):
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


#: Third-party loggers whose warnings are notes on their own work, not on the user's model
#: (onnxscript's optimizer: "Skipping constant folding for op SequenceEmpty with multiple
#: outputs", six per export of a model with an ``nn.EmbeddingBag``): at ERROR unless verbose.
NOTES_ONLY = ("onnxscript",)


def quiet_third_party(*, verbose: bool = False) -> None:
    """Third-party loggers at WARNING (`NOTES_ONLY` at ERROR; all at INFO with ``verbose``)."""
    import optuna

    level = logging.INFO if verbose else logging.WARNING
    for name in THIRD_PARTY:
        quiet = name in NOTES_ONLY and not verbose
        logging.getLogger(name).setLevel(logging.ERROR if quiet else level)
    optuna.logging.set_verbosity(level)


def levels() -> dict[str, int]:
    """The root logger's level and the third-party loggers' (for a worker process)."""
    return {"": logging.getLogger().level} | {
        name: logging.getLogger(name).level for name in THIRD_PARTY
    }


def apply_levels(values: dict[str, int]) -> None:
    """Set the loggers' levels `levels` returned in another process."""
    import optuna

    for name, level in values.items():
        logging.getLogger(name or None).setLevel(level)
    optuna.logging.set_verbosity(values.get("optuna", logging.WARNING) or logging.WARNING)


def every_s() -> float:
    """Seconds between two progress lines: ``$SQUEEZE_PROGRESS_S``, else 10."""
    value = os.environ.get(PROGRESS_ENV)
    try:
        seconds = float(value) if value else DEFAULT_EVERY_S
    except ValueError:
        seconds = DEFAULT_EVERY_S
    return seconds if math.isfinite(seconds) and seconds >= 0 else DEFAULT_EVERY_S


class Ticker:
    """Logs the progress of one job (a trial's epochs, a report's trials) at a bounded rate.

    A line is logged for step ``done`` of ``total`` when at least ``every`` seconds passed since
    the job started or since the last line, and never more than `max_lines` lines per job (the
    last step gets the last one). A job quicker than ``every`` seconds logs nothing.

    Args:
        logger: Where the lines go (INFO).
        what: The job, e.g. ``trial 3 epoch``: lines read ``trial 3 epoch 2/15 ...``.
        every: Seconds between lines (default `every_s`).
        clock: Seconds on a monotonic clock (tests pass their own).
        start: When the job started on ``clock`` (default: now).
    """

    max_lines = 10

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        start: float | None = None,
    ) -> None:
        self._logger, self._what, self._clock = logger, what, clock
        self._every = every_s() if every is None else every
        self._start = self._last = clock() if start is None else start
        self.lines = 0

    def __call__(self, done: int, total: int, detail: str = "") -> None:
        """Step ``done`` of ``total`` finished; ``detail`` (e.g. ``val 0.9510``) follows it."""
        now = self._clock()
        if done >= total:  # the end: shown if the job was long enough to show anything
            show = self.lines < self.max_lines and (
                self.lines > 0 or now - self._start >= self._every
            )
        else:  # line k (from 1) at step k * total / max_lines at the earliest
            show = (
                self.lines < self.max_lines - 1
                and now - self._last >= self._every
                and done * self.max_lines >= (self.lines + 1) * total
            )
        if not show:
            return
        self._last = now
        self.lines += 1
        self._logger.info(
            "%s %d/%d%s (%s)",
            self._what,
            done,
            total,
            f" {detail}" if detail else "",
            _duration(now - self._start),
        )


class Stages:
    """One `Ticker` per stage, for callbacks called as ``progress(stage, done, total)`` (a
    baseline being made: ``baseline epochs``, then ``teacher outputs``): lines read
    ``<prefix> baseline epochs 3/40 (12 s)``, bounded per stage as a `Ticker` bounds them.

    Args:
        logger: Where the lines go (INFO).
        prefix: What the lines start with, e.g. ``run:``.
        every: Seconds between lines (default `every_s`).
        clock: Seconds on a monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        logger: logging.Logger,
        prefix: str,
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger, self._prefix, self._every, self._clock = logger, prefix, every, clock
        self._tickers: dict[str, Ticker] = {}
        self._since = clock()  # a new stage started when the one before last reported

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Step ``done`` of ``total`` of ``stage`` finished."""
        if stage not in self._tickers:
            self._tickers[stage] = Ticker(
                self._logger,
                f"{self._prefix} {stage}",
                every=self._every,
                clock=self._clock,
                start=self._since,
            )
        self._tickers[stage](done, total)
        self._since = self._clock()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"
