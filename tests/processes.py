"""Find, watch and stop the processes a test started.

A test gives its child processes a unique ``FLWR_HOME`` (a temporary
directory); every process of the tree it starts (Flower, Ray) inherits it, so
``ours(home)`` finds exactly them and nothing else on the machine is touched.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import psutil

from fedlora.runtime.stopping import stop_tree


def ours(home: str) -> list[psutil.Process]:
    """Live processes started under this test's FLWR_HOME (inherited by the
    whole tree: flwr, flower-superlink, flower-superexec, flwr-simulation, Ray)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("FLWR_HOME") == home:
                found.append(proc)
        except (psutil.Error, OSError):  # gone, zombie, or not ours to read
            continue
    return found


def describe(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
        return " ".join(Path(a).name for a in cmd[:2]) if cmd else proc.name()
    except psutil.Error:
        return "?"


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def listening_sockets(pids: set[int]) -> dict[tuple[int, str, int], bool]:
    """(pid, ip, port) -> is loopback, for sockets of ``pids`` in LISTEN state."""
    found = {}
    for conn in psutil.net_connections("inet"):
        if conn.pid in pids and conn.status == psutil.CONN_LISTEN:
            found[(conn.pid, conn.laddr.ip, conn.laddr.port)] = is_loopback(conn.laddr.ip)
    return found


def stop(procs: list[psutil.Process], timeout: float = 15) -> list[psutil.Process]:
    """``fedlora.runtime.stopping.stop_tree`` with a test's patience (Ray and
    Flower get ``timeout`` to end cleanly); returns those that needed the kill."""
    return stop_tree(procs, timeout)


def watch(command: list[str], env: dict, home: str, log: Path, timeout: float,
          cwd: Path | None = None
          ) -> tuple[int, dict[tuple[int, str, int], bool], dict[int, str]]:
    """Run ``command`` to completion, recording every listening socket of the
    processes under ``home`` once a second; returns (exit code, sockets → is
    loopback, pid → description). Stops the tree and fails on timeout."""
    import subprocess
    import time

    sockets: dict[tuple[int, str, int], bool] = {}
    names: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    with open(log, "w") as handle:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            try:
                child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                stop([psutil.Process(child.pid), *ours(home)])
                raise TimeoutError(f"{command[:3]} still running after {timeout}s:\n"
                                   f"{log.read_text(errors='replace')[-4000:]}")
            procs = ours(home)
            for proc in procs:
                names.setdefault(proc.pid, describe(proc))
            sockets.update(listening_sockets({p.pid for p in procs}))
    return child.returncode, sockets, names
