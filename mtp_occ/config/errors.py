"""`ConfigError` and `require`: the one validation primitive every config group's `__post_init__` uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise `ConfigError` naming `key` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"config key `{key}`: {msg}")
