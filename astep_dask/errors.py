"""The exceptions this package raises on purpose, each with a one-line message that names
the file or night and the reason. Nothing else of ours is imported here: every layer may
raise them, and the command line turns each into its exit code."""

from __future__ import annotations

__all__ = ["ArchiveError", "CalibrationError", "RunError", "SettingsError"]


class CalibrationError(Exception):
    """A frame or master cannot be made from what the night holds; says why."""


class ArchiveError(Exception):
    """A path that is not an archive night or season; the message names it."""


class RunError(Exception):
    """The run cannot start or must stop; the message says why (one line)."""


class SettingsError(ValueError):
    """A setting (from a settings file or an option) that is refused: of the wrong type,
    out of its documented range, or more than this machine or job can hold. The message
    names the table and key (and the file); the command line exits 2 (usage)."""
