"""Why a trial stopped early: pruned, or which kind of failure (recorded in Optuna and MLflow)."""

from __future__ import annotations

import optuna

#: Why a trial failed (its user attribute ``fail_kind``).
FAIL_KINDS = ("error", "non_finite_loss", "out_of_memory", "worker_lost")

_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def failure_kind(err: BaseException) -> str:
    """``pruned``, ``out_of_memory``, ``non_finite_loss`` or ``error``.

    Out of memory is ``torch.OutOfMemoryError`` (CUDA and other accelerators) or the
    ``RuntimeError`` torch's CPU allocator raises; a NaN or infinite loss is a
    ``FloatingPointError`` (``experiments``' ``NonFiniteLossError``).
    """
    if isinstance(err, optuna.TrialPruned):
        return "pruned"
    names = {cls.__name__ for cls in type(err).__mro__}
    if "OutOfMemoryError" in names or (
        isinstance(err, RuntimeError) and any(t in str(err) for t in _OOM_TEXT)
    ):
        return "out_of_memory"
    if isinstance(err, FloatingPointError):
        return "non_finite_loss"
    return "error"


def failure_reason(err: BaseException) -> str:
    """A one-line reason: the error's type and the first line of its message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:1000] if text else type(err).__name__
