"""astep-dask: distributed calibration of ASTEP frames with dask, xarray and astropy."""

from astep_dask.version import __version__

__all__ = ["__version__"]
