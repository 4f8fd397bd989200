"""astep-dask: distributed calibration of ASTEP frames with dask, xarray and astropy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("astep-dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.2.0"

__all__ = ["__version__"]
