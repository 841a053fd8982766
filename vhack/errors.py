"""Exceptions that name a user's mistake (bad arguments, files, names) rather than a bug."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A user error with a message that names the problem and the fix. The `vhack` command prints
    it as one line and exits with status 2, without a traceback."""
