"""Warnings corral gives once per process."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a RuntimeWarning, once per process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def claim(key: str) -> bool:
    """Take over the once-per-process warning `key`: True the first time, when the caller
    gives it itself (in words that fit where it is used); corral then stays silent on it."""
    if key in _warned:
        return False
    _warned.add(key)
    return True
