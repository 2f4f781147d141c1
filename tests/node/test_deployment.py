"""The deployment of docker-compose.yml, tested as real Flower processes.

No Docker engine runs here, so ``deploy/local.py`` starts the compose file's own
commands and flags (``flower-superlink``, ``flower-superexec``,
``flower-supernode``) as local processes: service host names become 127.0.0.1,
ports are made free, container paths become temporary directories, and every
process gets its own ``FLWR_HOME``. TLS and SuperNode authentication are on, as
in the compose file; certificates, keys and trainer secrets come from
``deploy/make-certs.sh``. As in the compose file, each node is warm: its
ClientApp forwards every message to the node's trainer (``fedlora trainer``),
which reads the node's own data directory and keeps its state; one node of
the failure run is cold (``data-path``: the ClientApp trains itself).

One deployment (three registered SuperNodes) is shared by the tests of this
module, and one run with a bad node and a killed node by the two failure
tests (every message costs a process start); what adds or kills a node
restores the three before the tests look. Every process is stopped by pid when
the module ends, and the tests wait on observable events (log lines, processes,
files) with deadlines, never on sleeps.

Flower 1.41 and a dead SuperNode: the SuperNode sends a heartbeat every ~24 s
(interval 30 s) and the SuperLink holds it online for 2 × 30 s after the last
one; then it answers the node's pending message with a ``NODE_UNAVAILABLE``
error reply, which the server rejects like any failed reply, and stops
sampling the node. So a killed node costs its round at most a minute and the
run goes on (``round-timeout`` is for a node that hangs while connected).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import LABEL_WORDS, write_topic_dataset
from processes import listening_sockets, ours, stop

from fedlora.core.config import ConfigError
from fedlora.learning.tasks.labels import load_node_examples

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # deploy/ is not an installed package
from deploy.local import (  # noqa: E402
    COLD,
    COMPOSE,
    CONNECTION,
    LocalDeployment,
    free_port,
    option,
    wait_for_line,
    with_option,
)

RUN_TIMEOUT_S = 420
NODE_EXAMPLES = (48, 64, 80)  # each node's own training set: nodes differ
ENV = dict(os.environ, HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _write_node_data(directory: Path, examples: int) -> None:
    """A node's private training file (no test split: evaluation is central)."""
    write_topic_dataset(directory, train=examples, test=1)
    (directory / "test.csv").unlink()
    (directory / "classes.txt").unlink()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_bert):
    """SuperLink + ServerApp executor + three registered SuperNodes with their
    executors, each node with its own data; keys for two more nodes exist
    (``supernode-4`` for the bad-data node, ``supernode-5`` never registered)."""
    dep = LocalDeployment(tmp_path_factory.mktemp("deployment"), ENV)
    dep.make_certs(nodes=5)
    write_topic_dataset(dep.host_path("superexec-serverapp", "/fedlora/data/server"),
                        train=40, test=80)
    for supernode, examples in zip(dep.supernodes(), NODE_EXAMPLES):
        _write_node_data(dep.data_dir(supernode), examples)
    started = time.monotonic()
    try:
        dep.up()
        print(f"deployment up in {time.monotonic() - started:.1f}s")
        yield dep
    finally:
        dep.down()
        left = [p for home in dep.homes for p in ours(str(home))]
        stop(left)
        assert not left, f"left running: {[p.pid for p in left]}"


def _run(dep: LocalDeployment, name: str, tiny_bert: Path, **keys) -> dict:
    """Submit a run with ``flwr run`` (streaming its logs into ``logs/name.log``)
    and return its output, metrics rows and summary once it finished."""
    log = dep.log(name)
    process = _submit(dep, name, tiny_bert, **keys)
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    return _finished(dep, name, process.returncode, log.read_text(errors="replace"))


def _submit(dep: LocalDeployment, name: str, tiny_bert: Path, **keys) -> subprocess.Popen:
    server = dep.host_path("superexec-serverapp", "/fedlora/data/server")
    out = dep.host_path("superexec-serverapp", f"/fedlora/runs/{name}")
    config = {"model": f"'{tiny_bert}'", "dataset": f"'{server}'", "out-dir": f"'{out}'",
              "batch-size": 8, "lr": 0.005, **keys}
    run_config = " ".join(f"{key}={value}" for key, value in config.items())
    log = dep.log(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "flwr"), "run", str(REPO), CONNECTION,
             "--run-config", run_config, "--stream"],
            env={**dep.env, "FLWR_HOME": str(dep.cli_home())}, cwd=dep.root,
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _finished(dep: LocalDeployment, name: str, returncode: int, output: str) -> dict:
    assert returncode == 0, f"flwr run exited {returncode}:\n{output[-4000:]}"
    run_id = re.search(r"Successfully started run (\d+)", output).group(1)
    listed = dep.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
    runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], f"{runs}\n{output[-4000:]}"
    out = dep.host_path("superexec-serverapp", f"/fedlora/runs/{name}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"output": output, "rows": rows, "summary": summary, "out": out}


@pytest.mark.e2e
def test_two_rounds_on_three_nodes_with_tls_and_node_auth(deployment, tiny_bert):
    """``flwr run`` through the TLS Control API: 2 FedAvg rounds on the three
    authenticated nodes' own data; the outputs contract on the server side."""
    executor_logs = [deployment.log(deployment.executor_of(n)) for n in deployment.supernodes()]
    seen = [len(log.read_text(errors="replace")) for log in executor_logs]
    trainers = [deployment.trainer_of(n) for n in deployment.supernodes()]
    trainer_pids = {t: deployment.processes[t].pid for t in trainers}
    trainer_seen = {t: len(deployment.log(t).read_text(errors="replace")) for t in trainers}
    started = time.monotonic()
    run = _run(deployment, "two-rounds", tiny_bert, **{
        "num-clients": 3, "clients-per-round": 3, "rounds": 2})
    print(f"2 rounds in {time.monotonic() - started:.1f}s")
    rows, summary, out = run["rows"], run["summary"], run["out"]

    # The outputs contract, on the server side of the deployment.
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["clients"] == 3 and row["rejected"] == 0, row
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert row["train_loss"] > 0 and row["uplink_bytes"] > 0 and row["downlink_bytes"] > 0
        assert row["updated"] is True
    assert summary["rounds"] == 2 and summary["final_round"] == 2
    assert summary["client_updates"] == 6 and summary["out_dir"] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == str(tiny_bert) and config["num-clients"] == 3
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0

    # Each node's executor ran a fresh ClientApp process per message, which
    # forwarded it to the node's trainer: one process, up since before the run,
    # trained every round (the model loaded once per node).
    for log, offset in zip(executor_logs, seen):
        text = log.read_text(errors="replace")[offset:]
        assert text.count("Start `flwr-clientapp` process") == 2, text[-3000:]
        assert "ClientApp raised an exception" not in text, text[-3000:]
    for name in deployment.supernodes():
        trainer = deployment.trainer_of(name)
        assert trainer_pids[trainer] == deployment.processes[trainer].pid
        assert deployment.processes[trainer].poll() is None
        text = deployment.log(trainer).read_text(errors="replace")[trainer_seen[trainer]:]
        loaded = re.findall(r"run \d+: train for node \d+ in .* loaded by this trainer: (\d+)",
                            text)
        assert loaded == ["1", "1"], text[-3000:]  # two rounds, one model load

    # Everything this deployment runs listens on loopback only.
    pids = {p.pid for home in deployment.homes for p in ours(str(home))}
    listening = listening_sockets(pids)
    assert listening and all(listening.values()), listening


@pytest.mark.e2e
def test_a_stopped_run_resumes_with_resume_from_on_the_nodes_state(deployment, tiny_bert):
    """``flwr stop`` ends a run after round 1 (the ServerApp is killed); ``flwr
    run`` with ``resume-from`` goes on from its checkpoint, each node's client
    state coming from its own ``state-dir`` (compose's ``node-K-state``
    volume). CELLM with error feedback (client state) and a server Adam
    (strategy state): the adapter equals an uninterrupted run's, byte for
    byte, and the metrics hold rounds 1..3 once each."""
    from fedlora.federation import checkpoint

    keys = {"num-clients": 3, "clients-per-round": 3, "rounds": 3, "strategy": "'cellm'",
            "cellm-error-feedback": "true", "cellm-server-optimizer": "'adam'",
            "cellm-server-lr": 0.01}
    whole = _run(deployment, "resume-whole", tiny_bert, **keys)
    log, process = deployment.log("resume-stopped"), _submit(deployment, "resume-stopped",
                                                              tiny_bert, **keys)
    out = deployment.host_path("superexec-serverapp", "/fedlora/runs/resume-stopped")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (out / checkpoint.CHECKPOINT_FILE).is_file():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        run_id = re.search(r"Successfully started run (\d+)", log.read_text()).group(1)
        stopped = deployment.flwr("stop", run_id, CONNECTION)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert checkpoint.load(out).round < 3 and not (out / "summary.json").exists()

    resumed = _submit(deployment, "resume-continued", tiny_bert,
                      **{"resume-from": f"'{out}'"})
    try:
        assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, \
            deployment.log("resume-continued").read_text()[-4000:]
    finally:
        if resumed.poll() is None:
            resumed.kill()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all(row["clients"] == 3 and row["rejected"] == 0 for row in rows), rows
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (whole["out"] / adapter).read_bytes()
    # the residuals were kept on the nodes' own disks, one directory per node
    run_id = checkpoint.load(out).run_id
    states = [deployment.state_dir(n) / run_id for n in deployment.supernodes()]
    assert all(len(list(state.glob("data-*/state-*.pb"))) >= 1 for state in states), states


@pytest.mark.e2e
def test_a_trainer_killed_between_rounds_costs_one_reply_and_keeps_its_state(deployment,
                                                                           tiny_bert):
    """Node 1's trainer is SIGKILLed as soon as round 1 is recorded: in round
    2 its ClientApp waits ``trainer-wait`` (10 s) for it, then replies with an
    error naming the trainer's address, which the server rejects; the round
    goes on with the other two. Restarted after round 2, the trainer takes
    round 3 with the node's DP ledger from its state directory: the node has
    spent two rounds' steps (rounds 1 and 3), not one."""
    from fedlora.learning.privacy import HISTORY_KEY

    dep, victim = deployment, deployment.supernodes()[0]
    trainer = dep.trainer_of(victim)
    address = re.search(r"trainer='([^']+)'", option(dep.command(victim), "--node-config"))
    process = _submit(dep, "trainer-killed", tiny_bert, **{
        "num-clients": 3, "clients-per-round": 3, "rounds": 3, "dp": "'local'",
        "dp-noise-multiplier": 1.0, "local-steps": 2})
    out = dep.host_path("superexec-serverapp", "/fedlora/runs/trainer-killed")
    try:
        _wait_for_rounds(out, 1, process)
        dep.stop(trainer, signal.SIGKILL)
        _wait_for_rounds(out, 2, process)
        dep.start_trainer(trainer)
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
        if dep.processes[trainer].poll() is not None:
            dep.start_trainer(trainer)
    run = _finished(dep, "trainer-killed", process.returncode,
                    dep.log("trainer-killed").read_text(errors="replace"))
    rows = run["rows"]
    assert [(row["clients"], row["rejected"]) for row in rows] == [(3, 0), (2, 1), (3, 0)], rows
    node = dep.node_ids[victim]
    assert re.search(rf"round 2: reply from node {node} rejected: client failed: trainer at "
                     rf"{re.escape(address.group(1))}: unreachable", run["output"]), \
        run["output"][-4000:]

    # the ledger the restarted trainer kept: rounds 1 and 3, two steps each
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    from fedlora.federation import checkpoint

    run_dir = dep.state_dir(victim) / checkpoint.load(run["out"]).run_id
    latest = max(run_dir.glob("data-*/state-*.pb"),
                 key=lambda path: int(path.name.split("-")[1]))
    assert latest.name.startswith("state-3-"), latest
    proto = RecordDictProto()
    proto.ParseFromString(latest.read_bytes())
    history = recorddict_from_proto(proto).config_records[HISTORY_KEY]
    assert sum(history["steps"]) == 4, dict(history)


def _wait_for_rounds(out: Path, rounds: int, process: subprocess.Popen) -> None:
    """Until ``rounds`` rounds are in the run's metrics (the run must go on)."""
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + RUN_TIMEOUT_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rounds):
        assert process.poll() is None and time.monotonic() < deadline, \
            f"run ended or stalled before round {rounds}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def troubled_run(deployment, tiny_bert):
    """One 3-round run over the three nodes and a fourth whose data has the
    wrong columns, in which one good node is SIGKILLed (SuperNode, executor and
    its ClientApp: the host goes down) while it works on round 2; round 3
    then has one node fewer than ``clients-per-round``. One run
    serves both failure tests: in deployment every message costs a process
    start, and a dead node costs its round up to a minute. Before the tests
    look, the deployment is restored: the bad node stopped (SIGTERM, it
    deactivates itself), the killed one restarted."""
    dep = deployment
    bad_data = dep.root / "bad-data"
    bad_data.mkdir()
    with open(bad_data / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("title", "body"), ("a", "b"), ("c", "d")])
    keys = dep.root / "deploy" / "certs" / "supernode-4"
    bad_id = dep.register(keys / "supernode.key.pub")
    port = free_port()
    node = with_option(dep.command("supernode-3"), "--auth-supernode-private-key",
                       str(keys / "supernode.key"))
    node = with_option(with_option(node, "--port", str(port)), "--node-config",
                       f"data-path='{bad_data}'")
    executor = with_option(dep.command("superexec-3"), "--runtime-api-address",
                           f"127.0.0.1:{port}")
    executors = {dep.executor_of(n): n for n in dep.supernodes()}
    executors["superexec-bad"] = "supernode-bad"
    superlink_log = dep.log("superlink")
    victim = run = None
    try:
        process = dep.start("supernode-bad", node)
        dep.start("superexec-bad", executor)
        wait_for_line(dep.log("supernode-bad"), rf"SuperNode ID: {bad_id}", 90, process)
        run = _submit(dep, "troubled", tiny_bert, **{
            "num-clients": 4, "clients-per-round": 4, "min-clients": 1, "rounds": 3})
        # ClientApps 1-4 are round 1's; the next of a good node is round 2's.
        started = _clientapp_starts(dep, executors, run, lambda nodes: any(
            node != "supernode-bad" for node in nodes[4:]))
        victim = next(node for node in started[4:] if node != "supernode-bad")
        dep.stop(dep.executor_of(victim), signal.SIGKILL)
        dep.stop(victim, signal.SIGKILL)
        dep.stop(dep.trainer_of(victim), signal.SIGKILL)  # the whole host
        killed = time.monotonic()
        run.wait(timeout=RUN_TIMEOUT_S)
        print(f"run ended {time.monotonic() - killed:.1f}s after the kill")
        listed = dep.flwr("supernode", "ls", CONNECTION, "--format", "json")
        statuses = {int(n["node-id"]): n["status"]
                    for n in json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]}
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        seen = len(superlink_log.read_text(errors="replace"))
        dep.stop("superexec-bad")
        dep.stop("supernode-bad")
        if victim is not None:
            dep.start_node(victim)
    wait_for_line(superlink_log, rf"Deactivated node_id={bad_id}", 30, after=seen)
    result = _finished(dep, "troubled", run.returncode,
                       dep.log("troubled").read_text(errors="replace"))
    return {**result, "bad_id": bad_id, "bad_data": bad_data, "victim": victim,
            "statuses": statuses}


@pytest.mark.e2e
def test_a_node_with_bad_data_fails_alone_with_a_clear_line(troubled_run, deployment):
    """Its ClientApp fails with one ``data-path`` line in the node's log, the
    server rejects its reply with that reason, the others' updates count."""
    rows = troubled_run["rows"]
    assert rows[0]["clients"] == 3 and rows[0]["rejected"] == 1, rows
    reason = (f"data-path {troubled_run['bad_data']}: dataset train.csv: cannot detect the "
              "text column among title, body; set 'text-column'")
    rejected = re.findall(rf"round (\d): reply from node {troubled_run['bad_id']} rejected: "
                          rf"client failed: .*{re.escape(reason)}", troubled_run["output"])
    assert rejected == ["1", "2", "3"], troubled_run["output"][-4000:]
    node_log = deployment.log("superexec-bad").read_text(errors="replace")
    assert re.search(rf"^fedlora\.core\.config\.ConfigError: {re.escape(reason)}$", node_log,
                     re.MULTILINE), node_log[-3000:]


@pytest.mark.e2e
def test_a_node_killed_in_round_2_leaves_the_run_to_the_others(troubled_run, deployment):
    """Round 2 closes with one update fewer once the SuperLink gives the dead
    node up (it answers for it; the rejection names the dead node), round 3
    asks the three nodes left instead of waiting for a fourth, the run
    completes, and the node is offline for the SuperLink."""
    rows = troubled_run["rows"]
    victim_id = deployment.node_ids[troubled_run["victim"]]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert [row["sampled"] for row in rows] == [4, 4, 3], rows
    assert [row["clients"] for row in rows] == [3, 2, 2], rows
    assert [row["rejected"] for row in rows] == [1, 2, 1], rows  # bad node (+ dead one)
    assert all(row["updated"] and row["missing"] == 0 for row in rows)
    assert re.search(rf"round 2: reply from node {victim_id} rejected: client failed: Error: "
                     r"Node Unavailable", troubled_run["output"]), troubled_run["output"][-4000:]
    assert troubled_run["summary"]["client_updates"] == 7
    assert troubled_run["statuses"][victim_id] == "offline", troubled_run["statuses"]


def _clientapp_starts(dep: LocalDeployment, executors: dict[str, str],
                      run: subprocess.Popen, enough) -> list[str]:
    """The SuperNodes of the ClientApp processes the executors start, in order,
    as soon as ``enough`` of them. Each lives for seconds (its imports alone
    take that long), so polling sees every one."""
    seen: dict[int, tuple[float, str]] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not enough(nodes := [node for _, node in sorted(seen.values())]):
        if run.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ClientApps of {nodes} seen, then the run ended")
        for executor, supernode in executors.items():
            for child in psutil.Process(dep.processes[executor].pid).children():
                try:
                    if child.pid not in seen and "flwr-clientapp" in " ".join(child.cmdline()):
                        seen[child.pid] = (child.create_time(), supernode)
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.1)
    return nodes


@pytest.mark.e2e
def test_nodes_and_clients_without_key_or_ca_are_refused(deployment, tmp_path):
    """SuperNode authentication: an unregistered key, or no key at all (a
    SuperNode then asks to register itself), is refused. TLS: without the CA
    (system roots), with another CA, or with a missing CA file, nothing
    connects; the flwr CLI with another CA is refused too."""
    dep = deployment
    subprocess.run(["bash", str(REPO / "deploy" / "make-certs.sh"), "-o", str(tmp_path),
                    "-n", "0"], check=True, capture_output=True, timeout=60)
    other_ca = tmp_path / "ca.crt"
    keys = dep.root / "deploy" / "certs"
    base = dep.command("supernode-3")
    cases = {
        "unregistered-key": (with_option(base, "--auth-supernode-private-key",
                                         str(keys / "supernode-5" / "supernode.key")),
                             r"\[code: 2004\] Failed to activate SuperNode"),
        "no-key": (with_option(base, "--auth-supernode-private-key", None),
                   r"Failed to initialize the connection to the SuperLink"),
        "no-ca": (with_option(base, "--root-certificates", None),
                  r"CERTIFICATE_VERIFY_FAILED"),
        "other-ca": (with_option(base, "--root-certificates", str(other_ca)),
                     r"CERTIFICATE_VERIFY_FAILED"),
        "missing-ca-file": (with_option(base, "--root-certificates", str(tmp_path / "nope")),
                            r"`--root-certificates` does not point to a file"),
    }
    processes = {name: dep.start(f"refused-{name}", with_option(command, "--port",
                                                                 str(free_port())))
                 for name, (command, _) in cases.items()}
    for name, process in processes.items():
        process.wait(timeout=120)
        log = dep.log(f"refused-{name}").read_text(errors="replace")
        assert process.returncode != 0, log[-3000:]
        assert re.search(cases[name][1], log), f"{name}:\n{log[-3000:]}"
        assert "SuperNode ID" not in log, log[-3000:]
    superlink_log = dep.log("superlink").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log

    refused = dep.flwr("supernode", "ls", CONNECTION,
                       home=dep.cli_home("flwr-cli-other-ca", ca=other_ca))
    assert refused.returncode != 0
    assert "Connection to the SuperLink is unavailable" in refused.stderr, refused.stderr
    listed = dep.flwr("supernode", "ls", CONNECTION, "--format", "json")  # the right CA
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    online = {int(node["node-id"]) for node in nodes if node["status"] == "online"}
    assert online == set(dep.node_ids.values()), nodes  # none of the refused got in


def test_compose_file_describes_the_deployment():
    """Without Docker: three nodes, each a SuperNode with its own key, an
    executor that sees only the trainer secret, and a trainer that mounts the
    node's own data and state and shares the node's private network only; TLS
    and node authentication on every Fleet connection; persistent SuperLink
    state."""
    spec = _compose()
    services = spec["services"]
    superlink = services["superlink"]["command"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert flag in superlink
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    assert option(superlink, "--isolation") == "process"
    state = option(superlink, "--database")
    assert any(v.split(":")[0] in spec["volumes"] and state.startswith(v.split(":")[1] + "/")
               for v in services["superlink"]["volumes"])
    serverapp = services["superexec-serverapp"]["command"]
    assert option(serverapp, "--runtime-api-address") == "superlink:8000"
    assert "--root-certificates" in serverapp and "--insecure" not in serverapp

    dep = LocalDeployment(Path("/unused"), {})
    supernodes = dep.supernodes()
    assert len(supernodes) == 3
    data_dirs, key_dirs, secrets = set(), set(), set()
    for name in supernodes:
        command = services[name]["command"]
        assert option(command, "--superlink") == "superlink:8000"
        assert "--root-certificates" in command and "--insecure" not in command
        assert option(command, "--isolation") == "process"
        key = option(command, "--auth-supernode-private-key")
        key_dirs.add(next(v.split(":")[0] for v in services[name]["volumes"]
                          if key.startswith(v.split(":")[1] + "/")))
        node_config = option(command, "--node-config")
        trainer, executor = dep.trainer_of(name), dep.executor_of(name)
        assert trainer is not None and "data-path" not in node_config, node_config
        trainer_command = services[trainer]["command"]
        assert trainer_command[:2] == ["fedlora", "trainer"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[trainer]["volumes"]}
        data_dirs.add(mounts[option(trainer_command, "--data-path")])
        assert mounts[option(trainer_command, "--state-dir")] in spec["volumes"]
        # the executor holds the secret the trainer checks, and nothing else
        secret = re.search(r"trainer-secret-file='([^']+)'", node_config).group(1)
        executor_mounts = {v.split(":")[1]: v.split(":")[0]
                           for v in services[executor]["volumes"]}
        assert executor_mounts == {secret: mounts[option(trainer_command, "--secret-file")]}
        secrets.add(executor_mounts[secret])
        # the node's private network: executor and trainer only, nothing routed out
        private = services[trainer]["networks"]
        assert private == services[executor]["networks"] and len(private) == 1
        assert spec["networks"][private[0]] == {"internal": True}
        assert set(services[executor]["networks"]) < set(services[name]["networks"])
    assert len(data_dirs) == 3 and len(key_dirs) == 3 and len(secrets) == 3


def test_cold_override_only_moves_the_data_into_the_clientapp():
    """deploy/cold.yml: each SuperNode's command is the compose file's with
    the node config naming data and state instead of a trainer; its executor
    mounts them; no trainer is started."""
    services = _compose()["services"]
    cold = LocalDeployment(Path("/unused"), {}, overrides=(COLD,))
    assert not any(name.startswith("trainer-") for name in cold.services)
    for name in cold.supernodes():
        warm_command, cold_command = services[name]["command"], cold.services[name]["command"]
        assert with_option(cold_command, "--node-config", "-") == \
            with_option(warm_command, "--node-config", "-")
        assert option(cold_command, "--node-config") == "data-path='/data' state-dir='/state'"
        assert cold.trainer_of(name) is None
        mounts = {v.split(":")[1]: v.split(":")[0]
                  for v in cold.services[cold.executor_of(name)]["volumes"]}
        warm = LocalDeployment(Path("/unused"), {})
        trainer = warm.trainer_of(name)
        trainer_mounts = {v.split(":")[1]: v.split(":")[0]
                          for v in services[trainer]["volumes"]}
        assert mounts["/data"] == trainer_mounts["/data"]
        assert mounts["/state"] == trainer_mounts["/state"]


def _compose_tool() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.e2e
def test_compose_config_validates():
    tool = _compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` (plugin) nor `docker-compose` is installed")
    for files in ([COMPOSE], [COMPOSE, COLD]):
        done = subprocess.run([*tool, *(a for f in files for a in ("-f", str(f))), "config", "-q"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, f"{files}: {done.stdout}{done.stderr}"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_node_data_maps_labels_onto_the_servers_classes(tmp_path):
    names = LABEL_WORDS  # world, sports, business, tech
    by_name = _write(tmp_path / "names" / "train.jsonl",
                     '{"text": "a", "label": "tech"}\n{"text": "b", "label": "world"}\n')
    assert load_node_examples(str(by_name.parent), names)["label"] == [3, 0]
    by_index = _write(tmp_path / "ints" / "train.csv", '"x y",2\n"z",1\n')  # AG News layout
    examples = load_node_examples(str(by_index.parent), names)
    assert examples["label"] == [2, 1] and examples["text"] == ["x y", "z"]
    assert examples.features["label"].names == list(names)


@pytest.mark.parametrize("files, message", [
    (None, "no such file or directory"),
    ({}, r"no train\.\{csv,tsv,json,jsonl,parquet\} file \(found: nothing\)"),
    ({"test.csv": "a,1\n"}, r"no train\..* file \(found: test\.csv\)"),
    ({"train.csv": "title,body\nx,y\n"}, "cannot detect the text column among title, body"),
    ({"train.jsonl": '{"text": "a", "label": "cooking"}\n'},
     r"label 'cooking' in column 'label' is not one of the server's classes"),
    ({"train.csv": "text,label\nx,7\n"}, r"label 7 .* not one of the server's classes"),
])
def test_node_data_problems_are_one_line(tmp_path, files, message):
    directory = tmp_path / "node"
    for name, text in (files or {}).items():
        _write(directory / name, text)
    if files == {}:
        directory.mkdir()
    with pytest.raises(ConfigError, match=message) as raised:
        load_node_examples(str(directory), LABEL_WORDS)
    assert str(raised.value).startswith(f"data-path {directory}: ")
    assert "\n" not in str(raised.value)
