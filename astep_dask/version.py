"""The package version, read from the installed distribution (no other import of ours)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("astep-dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.2.0"
