"""errors: TODO docstring."""

from __future__ import annotations


class CalibrationError(Exception):
    """A frame or master cannot be made from what the night holds; says why."""


class ArchiveError(Exception):
    """A path that is not an archive night or season; the message names it."""


class RunError(Exception):
    """The run cannot start or must stop; the message says why (one line)."""
