"""Why a trial stopped early: pruned, or which kind of failure, in which phase, with which
traceback (recorded in Optuna and MLflow). The whole failure story is here: the kinds and phases,
how an exception is classified and recorded on its trial (`record_failure`), which failures are no
fault of the recipe (`INTERRUPTIONS`, run again by `search.run.budget`), and the line printed
when no trial completed.

Where a trial failed is carried by the exception itself, as Python exception notes
(``err.add_note``) that also show in its traceback: `phase` adds ``phase 'compress'`` (the trial's
steps are wrapped in it), and compressors may add ``compressor 'structured'`` and
``layer 'encoder.layers.0.self_attn'``. The innermost note of each kind wins.
"""

from __future__ import annotations

import errno
import re
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import optuna
from optuna.trial import FrozenTrial, TrialState

from search._errors import SweepStopped

#: Why a trial failed (its user attribute ``fail_kind``). ``interrupted`` (Ctrl-C, SIGTERM, a sweep
#: stopped by a full disk or an unreachable database: `search._errors.SweepStopped`) and
#: ``worker_lost`` are no fault of the recipe: such a trial runs again (`search.run.budget`).
FAIL_KINDS = ("error", "non_finite_loss", "out_of_memory", "worker_lost", "interrupted")
#: Failures that are not the recipe's: the trial is run again and uses no budget.
INTERRUPTIONS = ("interrupted", "worker_lost")
#: The steps of a trial a failure is attributed to (its user attribute ``fail_phase``).
PHASES = ("compress", "fine-tune", "pack", "reload", "export", "measure")
#: Characters of a traceback kept in the Optuna user attribute ``fail_traceback`` (the end).
TRACEBACK_ATTR_CHARS = 20_000
#: Characters of a traceback kept in the MLflow artifact ``traceback.txt`` (the end).
TRACEBACK_FILE_CHARS = 1_000_000

_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")
_NOTE = re.compile(r"^(phase|compressor|layer) '(.*)'$", re.DOTALL)


class NonFiniteObjectiveError(ValueError):
    """A trial's objective values are not all finite (a failure of its ``measure`` phase)."""

    def __init__(self, values: Iterable[float]) -> None:
        super().__init__(f"objective values {list(values)} are not all finite")
        self.add_note("phase 'measure'")


def record_failure(trial: optuna.Trial, err: BaseException) -> str:
    """Record why ``trial`` failed with ``err`` as its user attributes ``fail_kind``,
    ``fail_reason`` and, when known, ``fail_phase`` and ``fail_traceback``; return the reason."""
    kind, where = failure_kind(err), failure_phase(err)
    if isinstance(err, SweepStopped):
        reason = f"the sweep stopped: {err}"
    elif kind == "interrupted":
        reason = f"interrupted in {where}" if where else "interrupted"
    else:
        reason = failure_reason(err)
    trial.set_user_attr("fail_kind", kind)
    trial.set_user_attr("fail_reason", reason)
    if where is not None:
        trial.set_user_attr("fail_phase", where)
    if kind != "interrupted" and err.__traceback__ is not None:
        trial.set_user_attr("fail_traceback", failure_traceback(err))
    return reason


def fail_kind(trial: FrozenTrial) -> str:
    """Why a FAIL trial failed (one of `FAIL_KINDS`); one without the attribute was failed by
    Optuna's heartbeat check, i.e. its worker was lost."""
    return trial.user_attrs.get("fail_kind", "worker_lost")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Attribute an error raised in the body to the trial phase ``name`` (one of `PHASES`).

    The error gets the note ``phase '<name>'`` unless an inner phase named it already;
    ``optuna.TrialPruned`` passes untouched.

    Raises:
        ValueError: If ``name`` is not one of `PHASES`.
    """
    if name not in PHASES:
        raise ValueError(f"Unknown trial phase {name!r}. Available: {', '.join(PHASES)}")
    try:
        yield
    except BaseException as err:
        if not isinstance(err, optuna.TrialPruned) and failure_phase(err) is None:
            err.add_note(f"phase '{name}'")
        raise


def _notes(err: BaseException) -> dict[str, str]:
    """The first ``phase``, ``compressor`` and ``layer`` notes of ``err``."""
    found: dict[str, str] = {}
    for note in getattr(err, "__notes__", ()):
        match = _NOTE.match(str(note).strip())
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def failure_kind(err: BaseException) -> str:
    """``pruned``, ``interrupted``, ``out_of_memory``, ``non_finite_loss`` or ``error``.

    Interrupted is a ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM in a worker process) or a
    `search._errors.SweepStopped` (what the sweep writes to failed, not the recipe); out of
    memory is ``torch.OutOfMemoryError`` (CUDA and other accelerators) or the ``RuntimeError``
    torch's CPU allocator raises; a NaN or infinite loss is a ``FloatingPointError``
    (``experiments``' ``NonFiniteLossError``).
    """
    if isinstance(err, optuna.TrialPruned):
        return "pruned"
    if isinstance(err, KeyboardInterrupt | SweepStopped):  # (the trial runs again)
        return "interrupted"
    names = {cls.__name__ for cls in type(err).__mro__}
    if "OutOfMemoryError" in names or (
        isinstance(err, RuntimeError) and any(t in str(err) for t in _OOM_TEXT)
    ):
        return "out_of_memory"
    if isinstance(err, FloatingPointError):
        return "non_finite_loss"
    return "error"


#: What an error says when the disk it wrote to is full (SQLite says "database or disk is full").
_FULL_TEXT = ("no space left on device", "disk is full", "disk quota exceeded")


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` (or an error it comes from) is a write to a full disk: ``ENOSPC`` or
    ``EDQUOT``, or a database's or MLflow's error saying so."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err).lower() for text in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def failure_phase(err: BaseException) -> str | None:
    """The trial phase ``err`` was raised in (one of `PHASES`), or None if not known."""
    return _notes(err).get("phase")


def failure_reason(err: BaseException) -> str:
    """A one-line reason: the phase, compressor and layer when known, then the error's type and
    the first line of its message.

    For example ``compress: compressor 'structured', layer 'fc1': AssertionError: ...``.
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    notes = _notes(err)
    where = ", ".join(f"{key} '{notes[key]}'" for key in ("compressor", "layer") if key in notes)
    prefix = ": ".join(part for part in (notes.get("phase"), where) if part)
    return (f"{prefix}: {reason}" if prefix else reason)[:1000]


def failure_traceback(err: BaseException, *, limit: int = TRACEBACK_ATTR_CHARS) -> str:
    """The formatted traceback of ``err`` (with its causes and notes), its last ``limit``
    characters if longer."""
    text = "".join(traceback.format_exception(err))
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"[... the first {cut} characters are cut ...]\n{text[cut:]}"


def no_trial_completed(trials: Iterable[FrozenTrial]) -> str | None:
    """The line to print when none of ``trials`` completed, or None if one did (or there are
    none).

    For example ``no trial completed (4 failed: 3 in fine-tune, 1 elsewhere; 1 pruned; first
    reason: ...)`` (``elsewhere``: a failure outside the trial's phases, e.g. a lost worker).
    """
    trials = sorted(trials, key=lambda t: t.number)
    if not trials or any(t.state == TrialState.COMPLETE for t in trials):
        return None
    failed = [t for t in trials if t.state == TrialState.FAIL]
    others = Counter(t.state.name.lower() for t in trials if t.state != TrialState.FAIL)
    phases = Counter(t.user_attrs.get("fail_phase") for t in failed)
    where = ", ".join(
        f"{n} in {p}" if p else f"{n} elsewhere"
        for p, n in sorted(phases.items(), key=lambda pn: (pn[0] is None, -pn[1]))
    )
    parts = [f"{len(failed)} failed: {where}"] if failed else []
    parts += [f"{n} {state}" for state, n in others.items()]
    if failed:
        first = failed[0].user_attrs.get("fail_reason", "worker lost (no heartbeat)")
        parts.append(f"first reason: {first}")
    return f"no trial completed ({'; '.join(parts)})"
