"""Shared fixtures: small simulated nights with known truth."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from astep_dask.testing.simulate import SimConfig, simulate_night

# A high cosmic-ray rate (about 15x the realistic default) gives the CR tests statistics.
SMALL = SimConfig(size=128, n_science=6, n_darks=5, n_flats=7, cr_per_mpix=400.0, seed=3)


@pytest.fixture(scope="session")
def small_night(tmp_path_factory) -> Path:
    """A clean 128² night (6 science, 5+5 darks, 7 flats), written once per session."""
    return simulate_night(tmp_path_factory.mktemp("archive"), SMALL)


@pytest.fixture(scope="session")
def bad_night(tmp_path_factory) -> Path:
    """The same night plus one unusable file of each kind."""
    cfg = SimConfig(**{**SMALL.__dict__, "bad_files": True})
    return simulate_night(tmp_path_factory.mktemp("archive_bad"), cfg)


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes, one cluster per test module."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c
