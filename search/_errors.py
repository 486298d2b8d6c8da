"""Errors the command line reports in one line: bad input (exit code 2), a sweep stopped by
what it writes to (exit code 1)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong: the message names the key, the value and what is allowed."""


class SweepStopped(RuntimeError):
    """What a sweep writes to failed and would fail every trial after it (a full disk, a
    database that stays unreachable): the sweep stopped, the trials that finished kept. The
    message is the one line the command line prints (exit code 1); rerunning the command once
    the cause is fixed continues the study."""
