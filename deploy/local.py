"""docker-compose.yml's Flower services as local processes, without Docker.

The deployment tests and the round-cost benchmark start exactly the commands
and flags that docker-compose.yml gives each service, so the compose file and
what is tested cannot drift apart. Only what a container would provide is
replaced:

- service host names and ``0.0.0.0`` become ``127.0.0.1`` (loopback only);
- every service's ``--port`` (and a trainer's ``--listen`` port) becomes a free
  loopback port (all services share one host here), and ``service:port``
  references follow it, also inside a SuperNode's node config;
- override files (``deploy/cold.yml``) are merged as ``docker compose -f … -f …``
  merges them: ``command`` replaced, ``volumes`` merged by container path,
  other keys replaced; a service with ``profiles`` is not started;
- container paths of a service's volumes become paths under ``root``: a bind
  mount ``./deploy/certs/ca.crt`` is ``root/deploy/certs/ca.crt``, a named
  volume ``superlink-state`` is ``root/volumes/superlink-state``;
- every process gets its own ``FLWR_HOME`` (its container's home) and log file,
  and its service's ``environment`` (a mapping).

Processes are stopped by pid, with their children (the executors' app
processes), by the library's one stopper (``fedlora.runtime.stopping.stop_tree``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from fedlora.runtime.stopping import stop_tree, tree_of

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
COLD = REPO / "deploy" / "cold.yml"  # the nodes without trainers
MAKE_CERTS = REPO / "deploy" / "make-certs.sh"
BIN = Path(sys.executable).parent  # flower-superlink & co. beside this Python
CONNECTION = "fedlora"  # the flwr CLI's name for the deployed SuperLink
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def option(command: list[str], flag: str) -> str:
    """The value following ``flag`` in ``command``."""
    return command[command.index(flag) + 1]


def with_option(command: list[str], flag: str, value: str | None) -> list[str]:
    """``command`` with ``flag``'s value replaced (``None``: the flag removed)."""
    i = command.index(flag)
    return command[:i] + ([flag, value] if value is not None else []) + command[i + 2:]


def wait_for_line(log: Path, pattern: str, timeout: float,
                  process: subprocess.Popen | None = None, after: int = 0) -> re.Match:
    """The first match of ``pattern`` in ``log`` (from character ``after`` on)
    once it appears; fails with the log's tail after ``timeout`` seconds or when
    ``process`` exits first."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")[after:] if log.exists() else ""
        if match := regex.search(text):
            return match
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{log.name}: exited {process.returncode} before "
                               f"/{pattern}/:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log.name}: no /{pattern}/ after {timeout}s:\n{text[-3000:]}")
        time.sleep(0.2)


def merged_services(compose: Path, *overrides: Path) -> dict:
    """The services of ``compose`` with ``overrides`` merged in, in order."""
    services: dict = yaml.safe_load(compose.read_text())["services"]
    for override in overrides:
        for name, changes in yaml.safe_load(override.read_text())["services"].items():
            service = services.setdefault(name, {})
            for key, value in changes.items():
                if key == "volumes":
                    by_target = {v.split(":")[1]: v for v in service.get("volumes", [])}
                    by_target.update({v.split(":")[1]: v for v in value})
                    service["volumes"] = list(by_target.values())
                else:
                    service[key] = value
    return services


def _listen_port(command: list[str]) -> str | None:
    """A trainer's ``--listen HOST:PORT`` port."""
    return option(command, "--listen").rsplit(":", 1)[1] if "--listen" in command else None


class LocalDeployment:
    """The compose services as processes under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, env: Mapping[str, str], compose: Path = COMPOSE,
                 overrides: tuple[Path, ...] = ()) -> None:
        self.root = root
        self.services = {name: service for name, service
                         in merged_services(compose, *overrides).items()
                         if not service.get("profiles")}
        self.env = {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
        self.ports = {name: free_port() for name, service in self.services.items()
                      if "--port" in service["command"] or "--listen" in service["command"]}
        self.processes: dict[str, subprocess.Popen] = {}
        self.homes: list[Path] = []
        self.node_ids: dict[str, int] = {}  # SuperNode service -> node id, once registered

    # -- the compose file, mapped ------------------------------------------------
    def host_path(self, service: str, container_path: str) -> Path:
        """Where ``service``'s ``container_path`` lives here."""
        for volume in sorted(self.services[service].get("volumes", []),
                             key=lambda v: -len(v.split(":")[1])):
            source, target = volume.split(":")[:2]
            if container_path == target or container_path.startswith(target + "/"):
                base = (self.root / source if source.startswith(".")
                        else self.root / "volumes" / source)
                return base / container_path[len(target):].lstrip("/")
        raise KeyError(f"{container_path} is not on a volume of {service}")

    def _map_paths(self, service: str, arg: str) -> str:
        """Container paths of ``service``'s volumes in ``arg`` made host paths."""
        targets = sorted((v.split(":")[1] for v in self.services[service].get("volumes", [])),
                         key=len, reverse=True)
        for target in targets:
            arg = re.sub(rf"(?<![\w./-]){re.escape(target)}(?=/|'|\"|$)",
                         lambda m: str(self.host_path(service, m.group(0))), arg)
        return arg

    def command(self, service: str) -> list[str]:
        """``service``'s compose command with hosts, ports and paths mapped. A
        SuperNode's ``--node-config`` paths are read by the ClientApp, so they
        are paths in its executor's container."""
        spec = self.services[service]
        mapped = []
        for arg in map(str, spec["command"]):
            if arg == "0.0.0.0":
                arg = LOOPBACK
            if mapped and mapped[-1] == "--listen":
                arg = f"{LOOPBACK}:{self.ports[service]}"
            for name, port in self.ports.items():
                arg = re.sub(rf"(?<![\w.-]){re.escape(name)}:\d+(?!\d)", f"{LOOPBACK}:{port}",
                             arg)
            if mapped and mapped[-1] == "--node-config":
                arg = self._map_paths(self.executor_of(service), arg)
            else:
                arg = self._map_paths(service, arg)
            mapped.append(arg)
        if service in self.ports and "--port" in mapped:
            mapped = with_option(mapped, "--port", str(self.ports[service]))
        return [str(BIN / mapped[0]), *mapped[1:]]

    @property
    def address(self) -> str:
        """The SuperLink as the flwr CLI and SuperNodes reach it."""
        return f"{LOOPBACK}:{self.ports['superlink']}"

    def ca_certificate(self) -> Path:
        return self.host_path("supernode-1", "/certs/ca.crt")

    def public_key(self, service: str) -> Path:
        """A SuperNode's public key: its private key file + ``.pub``."""
        private = option(self.command(service), "--auth-supernode-private-key")
        return Path(private + ".pub")

    def supernodes(self) -> list[str]:
        """SuperNode services: ``flower-supernode``, or ``fedlora supernode`` (the same
        with a shorter poll)."""
        return [n for n, s in self.services.items()
                if s["command"][0] == "flower-supernode"
                or s["command"][:2] == ["fedlora", "supernode"]]

    def trainer_of(self, supernode: str) -> str | None:
        """The trainer service ``supernode``'s node config names (None: cold path)."""
        config = option(self.services[supernode]["command"], "--node-config")
        named = re.search(r"\btrainer='([\w.-]+):\d+'", config)
        return named.group(1) if named and named.group(1) in self.services else None

    def _node_dir(self, supernode: str, trainer_flag: str, executor_path: str) -> Path:
        """A node directory here: its trainer's ``trainer_flag`` (warm), or its
        executor's ``executor_path`` (cold)."""
        trainer = self.trainer_of(supernode)
        if trainer is not None:
            return self.host_path(trainer, option(self.services[trainer]["command"],
                                                  trainer_flag))
        return self.host_path(self.executor_of(supernode), executor_path)

    def data_dir(self, supernode: str) -> Path:
        """Where ``supernode``'s own data lives here."""
        return self._node_dir(supernode, "--data-path", "/data")

    def state_dir(self, supernode: str) -> Path:
        """Where ``supernode``'s client state is kept here."""
        return self._node_dir(supernode, "--state-dir", "/state")

    def executor_of(self, supernode: str) -> str:
        """The executor service whose Runtime API address is ``supernode``'s."""
        return next(n for n, s in self.services.items()
                    if s["command"][0] == "flower-superexec"
                    and option(s["command"], "--runtime-api-address").startswith(
                        supernode + ":"))

    # -- preparing the host paths ------------------------------------------------
    def make_certs(self, nodes: int) -> None:
        """CA, SuperLink certificate and ``nodes`` SuperNode keys where the
        compose file's ``./deploy/certs`` points, by deploy/make-certs.sh."""
        subprocess.run(["bash", str(MAKE_CERTS), "-o", str(self.root / "deploy" / "certs"),
                        "-n", str(nodes)], check=True, capture_output=True, timeout=60)
        for service in self.services:  # volume directories the services write to
            for volume in self.services[service].get("volumes", []):
                if not volume.split(":")[0].startswith("."):
                    self.host_path(service, volume.split(":")[1]).mkdir(parents=True,
                                                                         exist_ok=True)

    def cli_home(self, name: str = "flwr-cli", ca: Path | None = None) -> Path:
        """A FLWR_HOME for the flwr CLI whose connection ``CONNECTION`` is this
        SuperLink, trusting ``ca`` (default: the deployment's CA)."""
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n'
            f'root-certificates = "{ca or self.ca_certificate()}"\n')
        return home

    def flwr(self, *args: str, home: Path | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the flwr CLI against this deployment (from ``home``, default
        ``cli_home()``)."""
        env = {**self.env, "FLWR_HOME": str(home or self.cli_home())}
        return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.root)

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink; its node id."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION,
                         "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed:\n{done.stdout}{done.stderr}")
        return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])

    # -- processes -----------------------------------------------------------------
    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start(self, name: str, command: list[str] | None = None) -> subprocess.Popen:
        """Start service ``name`` (or ``command`` under that name) with its own
        FLWR_HOME, output to ``log(name)``."""
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        self.homes.append(home)
        log = self.log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        environment = {k: str(v) for k, v in
                       self.services.get(name, {}).get("environment", {}).items()}
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                command or self.command(name),
                env={**self.env, **environment, "FLWR_HOME": str(home)},
                cwd=home, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.processes[name] = process
        return process

    def start_superlink(self, timeout: float = 60) -> None:
        process = self.start("superlink")
        wait_for_line(self.log("superlink"), r"Uvicorn running on https://", timeout, process)

    def start_trainer(self, trainer: str, timeout: float = 60) -> subprocess.Popen:
        """A node's trainer; returns once it listens (also when restarted)."""
        log = self.log(trainer)
        seen = len(log.read_text(errors="replace")) if log.exists() else 0
        process = self.start(trainer)
        wait_for_line(log, r"listening on ", timeout, process, after=seen)
        return process

    def start_node(self, supernode: str, timeout: float = 90) -> None:
        """A SuperNode, its trainer (if it has one) and its executor; returns
        once the SuperLink accepted it (also when restarted: its log is
        appended to)."""
        trainer = self.trainer_of(supernode)
        if trainer is not None and (trainer not in self.processes
                                    or self.processes[trainer].poll() is not None):
            self.start_trainer(trainer, timeout)
        log = self.log(supernode)
        seen = len(log.read_text(errors="replace")) if log.exists() else 0
        process = self.start(supernode)
        self.start(self.executor_of(supernode))
        wait_for_line(log, r"SuperNode ID: \d+", timeout, process, after=seen)

    def up(self, supernodes: list[str] | None = None, timeout: float = 120) -> dict[str, int]:
        """SuperLink, ServerApp executor, registered SuperNodes (default: all)
        with their executors and trainers, all running; returns each
        SuperNode's node id."""
        self.start_superlink(timeout)
        self.node_ids = {name: self.register(self.public_key(name))
                         for name in supernodes or self.supernodes()}
        self.start("superexec-serverapp")
        for name in self.node_ids:
            self.start_node(name, timeout)
        return self.node_ids

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal process ``name`` and its children (an executor's app
        processes), wait, and SIGKILL what is left."""
        stop_tree(tree_of(self.processes[name].pid), timeout, sig)
        self.processes[name].wait(timeout=timeout)

    def down(self) -> None:
        """Stop every process started here, the SuperLink last."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            self.stop(name)
