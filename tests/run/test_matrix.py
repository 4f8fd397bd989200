"""Every command on every way of getting workers, as a user runs them: the installed
``astep-dask`` console script in a subprocess, for ``calibrate``, ``kbmod``, ``search``,
``report`` and ``season``, on the local default (threads), local worker processes, a
running TLS scheduler joined with ``--security``, and ``--cluster slurm`` on the localhost
SLURM (``deploy/ci/start-slurm.sh``, which CI starts). Each exits 0 and makes products
whose data are bit-identical to the local default's (``benchmarks/command_matrix.py``,
which also prints the wall times)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole nights end to end, four times

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "command_matrix.py"
spec = importlib.util.spec_from_file_location("command_matrix", SCRIPT)
matrix = sys.modules["command_matrix"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(matrix)


def _check(rows: list[dict]) -> None:
    """Every command exited 0 and printed no traceback."""
    for r in rows:
        said = f"{' '.join(r['argv'])}\n{r['stdout']}\n{r['stderr']}"
        assert r["rc"] == 0, said
        assert "Traceback" not in r["stderr"], said


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """The data, and the reference: every command on the local default layout."""
    root = tmp_path_factory.mktemp("matrix")
    data = matrix.make_data(root / "data")
    with matrix.kind_setup("threads", root / "threads-setup") as kind:
        rows = matrix.run_kind(kind, data, root / "threads", cwd=root)
    _check(rows)
    reference = matrix.fingerprint(root / "threads")
    return {"root": root, "data": data, "reference": reference}


def test_reference_run_makes_every_product(work):
    """The local default run itself: frames, masters, KBMOD files, search, report, and the
    season's two nights."""
    names = set(work["reference"])
    night = "night/2026-06-15/"
    assert sum(n.startswith(night) and n.endswith("_CAL.fits[SCI]") for n in names) == 6
    for product in ("kbmod/2026-06-15_TEMPLATE.fits", "kbmod/2026-06-15_WORKUNIT.fits",
                    "kbmod/search/2026-06-15_CANDIDATES.csv", "report/qa.json",
                    "manifest.json"):
        assert any(n.startswith(night + product) for n in names), product
    for date in matrix.SEASON_DATES:
        assert sum(n.startswith(f"season/{date}/") and n.endswith("_CAL.fits[MASK]")
                   for n in names) == 3


def _run(kind: str, work: dict) -> list[dict]:
    root = work["root"]
    with matrix.kind_setup(kind, root / f"{kind}-setup") as setup:
        rows = matrix.run_kind(setup, work["data"], root / kind, cwd=root)
    _check(rows)
    diff = matrix.differences(work["reference"], matrix.fingerprint(root / kind))
    assert not diff, diff
    return rows


def test_local_worker_processes(work):
    _run("processes", work)


def test_tls_scheduler(work):
    rows = _run("tls-scheduler", work)
    assert all("joined scheduler tls://127.0.0.1:" in r["stderr"] for r in rows)


def test_slurm(work):
    if why := matrix.slurm_ready():
        pytest.skip(f"no SLURM: {why} (deploy/ci/start-slurm.sh starts one; CI does)")
    _run("slurm", work)
    logs = list((work["root"] / "slurm-setup" / "worker-logs").glob("*.err"))
    assert len(logs) >= 5, logs  # each command's workers ran as SLURM jobs
    deadline = time.monotonic() + 60  # the jobs were cancelled as their commands ended
    while True:
        queue = subprocess.run(["squeue", "-h", "-o", "%j %T"], capture_output=True,
                               text=True, timeout=30).stdout.splitlines()
        left = [j for j in queue if j.startswith("astep-matrix-")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, left
