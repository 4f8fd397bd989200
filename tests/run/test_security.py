"""Secure by default: clusters we start with worker processes talk TLS with credentials made
for the run, nobody else gets a session through any port; the dashboard stays on the
loopback; a TLS scheduler is joined with a security file, and one that demands credentials
we lack is named in one line."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import dask
import numpy as np
import pytest
from astropy.io import fits
from distributed import Client, LocalCluster

from astep_dask.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from astep_dask.config import ClusterSettings
from astep_dask.errors import RunError
from astep_dask.io.products import output_dir
from astep_dask.run.cluster import connect, dashboard_of, load_security, run_security
from astep_dask.testing.simulate import SimConfig, simulate_night
from tests.run.intruder import MARK, listening, probe_while_running

TINY = dataclasses.replace(SimConfig(), size=64, n_science=3, n_darks=3, n_flats=3, seed=11)


@pytest.fixture(scope="module")
def tiny_night(tmp_path_factory) -> Path:
    return simulate_night(tmp_path_factory.mktemp("archive"), TINY)


def _pem_texts(security) -> list[str]:
    return [security.tls_ca_file, security.tls_worker_key]


def test_run_credentials_private_and_removed(tmp_path):
    with run_security() as mem:
        assert mem.require_encryption and "PRIVATE KEY" in mem.tls_worker_key
    with run_security(tmp_path) as sec:
        folder = Path(sec.tls_ca_file).parent
        assert folder.parent == tmp_path
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for path in (sec.tls_ca_file, sec.tls_worker_cert, sec.tls_worker_key,
                     sec.tls_client_key, sec.tls_scheduler_key):
            assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        assert "PRIVATE KEY" in Path(sec.tls_worker_key).read_text()
        assert sec.require_encryption
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []


def test_security_file_errors_name_the_file(tmp_path):
    with pytest.raises(RunError, match=r"missing\.toml: cannot read"):
        load_security(tmp_path / "missing.toml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ca: ca.pem\ncert: me.pem\n")
    with pytest.raises(RunError, match=r"bad\.yaml: a security file needs ca, cert and key"):
        load_security(bad)
    bad.write_text("ca: ca.pem\ncert: me.pem\nkey: me.key\n")
    with pytest.raises(RunError, match=r"bad\.yaml: ca file .*ca\.pem does not exist"):
        load_security(bad)


def _security_file(folder: Path, sec, name: str) -> Path:
    """A security file (relative paths) for the credentials ``sec`` wrote to ``folder``."""
    path = folder / name
    rel = {k: os.path.relpath(v, folder) for k, v in
           (("ca", sec.tls_ca_file), ("cert", sec.tls_client_cert), ("key", sec.tls_client_key))}
    if name.endswith(".toml"):
        path.write_text("".join(f'{k} = "{v}"\n' for k, v in rel.items()))
    else:
        path.write_text("".join(f"{k}: {v}\n" for k, v in rel.items()))
    return path


def test_join_tls_scheduler_with_security_file(tmp_path, tiny_night, capsys):
    with run_security(tmp_path) as sec, run_security(tmp_path) as other, \
            dask.config.set({"distributed.comm.timeouts.connect": "3s"}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                         protocol="tls://", security=sec, dashboard_address=":0") as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        good = _security_file(tmp_path, sec, "good.toml")
        wrong = _security_file(tmp_path, other, "wrong.yaml")
        with connect(ClusterSettings(scheduler=address, security=str(good)),
                     log=lambda m: None) as client:
            assert client.submit(lambda x: 2 * x, 21).result() == 42
        # no credentials, a tls:// address: refused before connecting
        with pytest.raises(RunError, match=r"^scheduler tls://\S+ demands TLS credentials"):
            with connect(ClusterSettings(scheduler=address)):
                pass
        # a tcp:// address to a TLS scheduler: it answers TLS, we say what it wants
        plain = address.replace("tls://", "tcp://")
        with pytest.raises(RunError, match=r"^scheduler tcp://\S+ demands TLS credentials"):
            with connect(ClusterSettings(scheduler=plain)):
                pass
        # credentials of another run: the scheduler refuses them
        with pytest.raises(RunError, match=r"our TLS credentials \(.*wrong.yaml\)"):
            with connect(ClusterSettings(scheduler=address, security=str(wrong))):
                pass
        # the command line: one line, no traceback; with the file, the night is calibrated
        capsys.readouterr()
        assert main(["calibrate", str(tiny_night), "--security", str(good)]) == EXIT_USAGE
        assert "--security is for joining a --scheduler" in capsys.readouterr().err
        code = main(["calibrate", str(tiny_night), "--out", str(tmp_path / "o1"),
                     "--scheduler", address, "--no-cosmics"])
        err = capsys.readouterr().err
        assert code == EXIT_FAILED
        assert err.count("\n") == 1 and "demands TLS credentials" in err
        assert "Traceback" not in err
        code = main(["calibrate", str(tiny_night), "--out", str(tmp_path / "o2"),
                     "--scheduler", address, "--security", str(good), "--no-cosmics"])
        assert code == EXIT_OK, capsys.readouterr()


def test_dashboard_on_loopback_by_default():
    """The default dashboard address is the loopback; so is everything a default
    (in-process) cluster listens on."""
    address, shown = dashboard_of(ClusterSettings())
    assert shown and ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback
    # an unattended batch run has none unless asked; "off" is none anywhere
    assert dashboard_of(ClusterSettings(kind="slurm")) == ("127.0.0.1:0", False)
    assert dashboard_of(ClusterSettings(kind="pbs", dashboard_address="127.0.0.1:8787")) == (
        "127.0.0.1:8787", True)
    assert not dashboard_of(ClusterSettings(dashboard_address="off"))[1]
    before = listening({os.getpid()})
    logged: list[str] = []
    with connect(ClusterSettings(n_workers=1, threads_per_worker=1), log=logged.append):
        opened = listening({os.getpid()}) - before
        assert opened, "the dashboard should listen somewhere"
        assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in opened), opened
        # the link printed is the address it is bound to, and says how to reach it
        link = next(m for m in logged if m.startswith("dask dashboard:"))
        port = int(link.split("http://127.0.0.1:")[1].split("/")[0])
        assert ("127.0.0.1", port) in opened and "ssh -N -L" in link
    # "off": the log says so, and the scheduler serves no dashboard page
    logged.clear()
    with connect(ClusterSettings(n_workers=1, threads_per_worker=1, dashboard_address="off"),
                 log=logged.append) as client:
        assert "dask dashboard: off" in logged
        port = client.scheduler_info()["services"]["dashboard"]  # its HTTP server
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError, match="404"):
            opener.open(f"http://127.0.0.1:{port}/status", timeout=10)
    # asked for, it opens where the user says (every interface here)
    with connect(ClusterSettings(n_workers=1, threads_per_worker=1, dashboard_address=":0"),
                 log=lambda m: None):
        opened = listening({os.getpid()}) - before
        assert any(not ipaddress.ip_address(ip).is_loopback for ip, _ in opened), opened


def _products(folder: Path) -> dict[str, list[np.ndarray]]:
    out = {}
    for path in sorted(folder.glob("*_CAL.fits")):
        with fits.open(path) as hdul:
            out[path.name] = [hdul[n].data.copy() for n in ("SCI", "VAR", "MASK")]
    return out


def _no_secret_in(folder: Path, secrets: list[str]) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"PRIVATE KEY" not in data, path
            for secret in secrets:
                assert secret.encode() not in data, path


@pytest.mark.slow
def test_local_run_with_processes_refuses_strangers(tiny_night, tmp_path, monkeypatch):
    """A run with worker processes: while it runs, a stranger without its credentials tries
    every port it listens on (scheduler, workers, nannies, HTTP) with a dask Client and a
    raw TCP connection; none gets a session or runs code, the night completes with the
    same products as an in-process run."""
    marker = tmp_path / "intruder.txt"
    keys: list[str] = []
    real_security = run_security

    def remember(*args, **kwargs):  # the run's key, to look for it in what it leaves
        cm = real_security(*args, **kwargs)
        sec = cm.__enter__()
        keys.append(sec.tls_worker_key.split("-----")[2].strip().splitlines()[1])
        return _Entered(cm, sec)

    monkeypatch.setattr("astep_dask.run.cluster.run_security", remember)
    found = probe_while_running(monkeypatch, marker)
    out = tmp_path / "tls"
    code = main(["calibrate", str(tiny_night), "--out", str(out), "--processes",
                 "--workers", "2", "--threads", "1", "--no-cosmics"])
    assert code == EXIT_OK
    assert found["settings"].processes and found["settings"].tls
    assert len(found["comm_ports"]) == 5  # scheduler, 2 workers, 2 nannies
    assert found["comm_ports"] <= {p for _, p in found["sockets"]}
    assert len(found["ports"]) >= 6  # and at least the dashboard
    assert found["problems"] == [], found["problems"]
    assert not marker.exists() and MARK
    assert keys, "the run made no credentials"
    _no_secret_in(output_dir(tiny_night, out), keys)

    monkeypatch.undo()
    ref = tmp_path / "threads"
    assert main(["calibrate", str(tiny_night), "--out", str(ref), "--no-cosmics"]) == EXIT_OK
    got, want = _products(output_dir(tiny_night, out)), _products(output_dir(tiny_night, ref))
    assert sorted(got) == sorted(want) and len(got) == TINY.n_science
    for name in want:
        for a, b in zip(got[name], want[name], strict=True):
            np.testing.assert_array_equal(a, b)


class _Entered:
    """A context manager already entered (for the test's wrapper of run_security)."""

    def __init__(self, cm, value):
        self.cm, self.value = cm, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def test_plain_client_without_credentials_cannot_use_tls_cluster():
    """The run's credentials are what lets a client in: with them a session, without none."""
    with run_security() as sec, \
            dask.config.set({"distributed.comm.timeouts.connect": "3s"}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                         protocol="tls://", security=sec, dashboard_address=":0") as cluster:
        with Client(cluster.scheduler_address, security=sec) as c:
            assert c.submit(lambda: 1).result() == 1
        with pytest.raises((OSError, TypeError, ValueError)):
            Client(cluster.scheduler_address, timeout="3s")
