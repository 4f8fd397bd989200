"""A stranger on the same machine: tries every port a running astep-dask cluster listens on.

Shared by tests/run/test_security.py (LocalCluster with worker processes) and
tests/run/test_slurm.py (dask-jobqueue through SLURM). It holds no credentials of the run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import dask
import msgpack
import psutil
from distributed import Client

MARK = "intruder-was-here"


def listening(pids: set[int]) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket the processes ``pids`` listen on."""
    found = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def run_pids(client: Client) -> set[int]:
    """This process, the workers and their parents (nannies, or this process)."""
    pids = {os.getpid()}
    for pid in client.run(os.getpid).values():
        pids.add(pid)
        try:
            pids.add(psutil.Process(pid).ppid())
        except psutil.Error:
            pass
    return pids


def comm_ports(client: Client) -> set[int]:
    """Ports of the scheduler, workers and nannies, from the scheduler's own account."""
    info = client.scheduler_info()
    addresses = [info["address"]]
    for address, worker in info["workers"].items():
        addresses += [address, worker.get("nanny") or address]
    return {int(a.rsplit(":", 1)[1]) for a in addresses}


async def _plain_client(address: str, marker: str) -> str | None:
    """What a plain dask Client (no credentials) gets at ``address``: None when refused."""
    try:
        client = await asyncio.wait_for(Client(address, asynchronous=True, timeout="3s"), 10)
    except Exception:
        return None
    try:
        await asyncio.wait_for(client.run(Path(marker).write_text, MARK), 10)
        return f"{address}: a plain Client got a session and ran code"
    except Exception as exc:
        return f"{address}: a plain Client got a session ({type(exc).__name__} running code)"
    finally:
        await client.close()


async def _stranger(ports: list[int], comms: list[int], marker: str) -> list[str]:
    problems = []
    for port in ports:
        for scheme in ("tcp", "tls"):
            if why := await _plain_client(f"{scheme}://127.0.0.1:{port}", marker):
                problems.append(why)
        answer = raw_answer("127.0.0.1", port, Path(marker))
        if port in comms:
            # a TLS server answers plain bytes with nothing or a TLS alert record
            if answer and answer[0] not in (0x15, 0x16):
                problems.append(f"127.0.0.1:{port}: raw TCP got {answer[:40]!r}")
        elif not (answer == b"" or answer.startswith(b"HTTP/")):
            problems.append(f"127.0.0.1:{port}: raw TCP got {answer[:40]!r}")
    return problems


def _frame(msg: dict) -> bytes:
    """A message as distributed frames it on plain TCP (count, lengths, payloads)."""
    header = msgpack.dumps({"compression": None, "python": (3, 11, 0)}, use_bin_type=True)
    body = msgpack.dumps(msg, use_bin_type=True)
    frames = [header, body]
    head = struct.pack("Q", len(frames)) + struct.pack(f"{len(frames)}Q", *map(len, frames))
    payload = head + b"".join(frames)
    return struct.pack("Q", len(payload)) + payload


def raw_answer(host: str, port: int, marker: Path) -> bytes:
    """Connect with a raw socket, send dask's plain-TCP handshake and a request to run a
    function, and return whatever comes back within 3 s."""
    data = b""
    with socket.create_connection((host, port), timeout=3) as s:
        try:
            s.sendall(_frame({"op": "identity", "reply": True}))
            s.sendall(_frame({"op": "run", "function": b"", "args": (str(marker), MARK),
                              "reply": True}))
            while chunk := s.recv(65536):
                data += chunk
                if len(data) > 1 << 16:
                    break
        except OSError:  # reset or timed out: the server has nothing to say to us
            pass
    return data


def try_every_port(client: Client, pids: set[int], before: set[tuple[str, int]],
                   marker: Path) -> dict:
    """Try every port the run listens on (new listening sockets of ``pids`` since
    ``before``, plus the scheduler's, workers' and nannies' ports) as a stranger; return
    a dict of what was found (``problems`` empty when all was refused)."""
    comms = comm_ports(client)
    sockets = listening(pids) - before
    problems = []
    for ip, port in sorted(sockets):
        if not ipaddress.ip_address(ip).is_loopback and port not in comms:
            problems.append(f"{ip}:{port} (not dask comm) listens beyond the loopback")
    ports = {port for _, port in sockets} | comms
    # the stranger is another process, with nothing of ours but the port numbers
    job = {"ports": sorted(ports), "comms": sorted(comms), "marker": str(marker)}
    run = subprocess.run([sys.executable, __file__, json.dumps(job)], capture_output=True,
                         text=True, timeout=60 + 30 * len(ports))
    if run.returncode != 0:
        problems.append(f"the stranger failed: {run.stderr[-2000:]}")
    else:
        problems += json.loads(run.stdout.strip().splitlines()[-1])
    if marker.exists():
        problems.append(f"code ran: {marker} written")
    return {"comm_ports": comms, "sockets": sockets, "ports": ports, "problems": problems}


def probe_while_running(monkeypatch, marker: Path) -> dict:
    """Wrap :func:`astep_dask.run.cluster.connect` so that, once the run's cluster is up
    and before its work starts, a stranger tries every port; returns the dict that the
    results (:func:`try_every_port`) land in."""
    import astep_dask.run.cluster as cluster_module

    real = cluster_module.connect
    found: dict = {}

    @contextmanager
    def connect(settings, log=print):
        before = listening({os.getpid()})
        with real(settings, log) as client:
            client.wait_for_workers(1, timeout=180)
            found.update(try_every_port(client, run_pids(client), before, marker))
            found["settings"] = settings
            yield client

    monkeypatch.setattr(cluster_module, "connect", connect)
    return found


if __name__ == "__main__":  # the stranger's process: python intruder.py JOB_JSON
    job = json.loads(sys.argv[1])
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        found = asyncio.run(_stranger(job["ports"], job["comms"], job["marker"]))
    print(json.dumps(found))
