"""Errors the command line reports as bad input (exit code 2)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong: the message names the key, the value and what is allowed."""
