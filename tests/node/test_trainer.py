"""A node's warm trainer (``fedlora trainer``), tested as a real process.

One trainer serves the whole module: a ``fedlora trainer`` subprocess on a
free loopback port, over a node data directory as a deployment has it
(``train.csv`` only), with its own state directory and secret. Messages reach
it the way a deployed ClientApp sends them (``client.app`` and
``fedlora.node.trainer_link``), and what comes back is compared with the same
message run in-process through ``fedlora.node.client_loop``: the trainer must be a
warm copy of the cold path, not another implementation of it.

The tests wait on what they can observe (log lines, replies, exit codes),
never on sleeps, and every process they start is stopped with SIGTERM and
must exit 0.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import pytest
from conftest import LABEL_WORDS, write_topic_dataset
from fakes import SERVER, message, server_identity
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

from fedlora.node import trainer_link
from fedlora.node.client_state import client_key
from fedlora.strategies import resolve, strategies
from fedlora.v1 import trainer_pb2, trainer_pb2_grpc
from fedlora.wire import codec, messages
from fedlora.wire.messages import LABEL_NAMES, LINEAGE, METRICS, PAYLOAD, RUN_ID, Request, Task

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # deploy/ is not an installed package
from deploy.local import free_port, wait_for_line  # noqa: E402

NODE = 5  # the node id every message here is for (a deployed client's identity)
RUN = 1  # the Flower run id of the messages that name no other
START_S = 60  # a trainer listens within a second; the rest is slack for a busy machine
HEAVY = ("torch", "transformers", "peft", "datasets", "opacus")


class Trainer:
    """The module's ``fedlora trainer`` process and what a node config names."""

    def __init__(self, root: Path) -> None:
        self.data = root / "node"
        write_topic_dataset(self.data, train=40, test=1)
        (self.data / "test.csv").unlink()  # a node holds its training file only
        (self.data / "classes.txt").unlink()
        self.state = root / "state"
        self.secret_file = root / "secret"
        self.secret_file.write_text("trainer-secret-" + "x" * 32 + "\n")
        self.address = f"127.0.0.1:{free_port()}"
        self.log = root / "trainer.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "w") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedlora", "trainer", "--listen", self.address,
                 "--data-path", str(self.data), "--state-dir", str(self.state),
                 "--secret-file", str(self.secret_file), "--device", "cpu"],
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_line(self.log, r"listening on ", START_S, self.process)

    def stop(self) -> int:
        """SIGTERM, and the exit code (killed after a minute: a hang is a failure)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def seen(self) -> int:
        """How much of the log there is now (for ``wait_for_line(after=…)``)."""
        return len(self.log.read_text(errors="replace"))

    def node_config(self, **keys) -> dict:
        return {trainer_link.ADDRESS_KEY: self.address,
                trainer_link.SECRET_FILE_KEY: str(self.secret_file), **keys}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    node = Trainer(tmp_path_factory.mktemp("trainer"))
    node.start()
    try:
        yield node
    finally:
        code = node.stop()
        assert code == 0, node.log.read_text(errors="replace")[-3000:]
        assert re.search(r"INFO: stopped", node.log.read_text(errors="replace"))


# -- messages --------------------------------------------------------------------------
def _config(tiny_bert: Path, **keys):
    return resolve({"model": str(tiny_bert), "batch-size": 8, "local-steps": 2,
                    "lora-dropout": 0.1, **keys})


def _content(config, server_round: int = 1, **transport) -> RecordDict:
    """A request's records as the server sends them to a deployed node: the
    run config, the classes, and the global adapter's download."""
    from fedlora.learning.features import model_with_labels

    model = model_with_labels(config, LABEL_WORDS)
    strategy = strategies()[config["strategy"]](config, model.initial_state)
    _, blob = strategy.download(model.initial_state)
    sent = {**config.to_dict(), LABEL_NAMES: list(LABEL_WORDS), **transport}
    with server_identity():
        return Request(sent, Task(server_round, 0, config["lora-rank"]), blob
                       ).to_message(NODE).content


def _train_message(content: RecordDict, message_id: str = "q") -> Message:
    """A training request as the SuperLink delivers it (``fakes.message``)."""
    return message(SERVER, NODE, content, message_id=message_id)


def _evaluate_message(content: RecordDict) -> Message:
    return message(SERVER, NODE, content, message_id="e", message_type=MessageType.EVALUATE)


def _context(node_config: dict, run_id: int = RUN) -> Context:
    return Context(run_id=run_id, node_id=NODE, node_config=node_config, state=RecordDict(),
                   run_config={})


def _in_process(handler, msg: Message, node_config: dict) -> Message:
    """``msg`` handled by the cold path: the client loop in this process."""
    from fedlora.node import client_loop

    return getattr(client_loop, handler)(msg, _context(node_config))


def _answer(reply: Message) -> tuple[list[str], bytes | None, dict]:
    """What a reply says (its records, its upload's bytes, its metrics), less
    the time it took."""
    assert not reply.has_error(), reply.error.reason
    metrics = dict(reply.content.metric_records[METRICS])
    metrics.pop("compute-seconds", None)
    payload = reply.content.array_records.get(PAYLOAD)
    return (sorted(reply.content), bytes(codec.from_record(payload))
            if payload is not None else None, metrics)


# -- 1: a forwarded message is the in-process one ---------------------------------------
@pytest.mark.e2e
def test_a_forwarded_message_gets_the_in_process_reply(trainer, tiny_bert):
    from client import app

    config = _config(tiny_bert)
    content = _content(config)
    cold = {"data-path": str(trainer.data)}
    reply = app.train(_train_message(content), _context(trainer.node_config()))
    names, upload, metrics = _answer(reply)
    assert names == [METRICS, PAYLOAD] and upload and metrics["partition-id"] == NODE
    assert reply.metadata.reply_to_message_id == "q"
    assert (names, upload, metrics) == _answer(_in_process("handle_train",
                                                           _train_message(content), cold))
    accepted = messages.TrainReply.from_message(reply)  # the server takes it as the node's
    assert accepted.partition_id == NODE and accepted.num_examples == 40

    evaluated = app.evaluate(_evaluate_message(content), _context(trainer.node_config()))
    assert _answer(evaluated) == _answer(_in_process("handle_evaluate",
                                                     _evaluate_message(content), cold))
    assert messages.EvaluateReply.from_message(evaluated).num_examples == 40


FORWARD_ONLY = textwrap.dedent("""
    import json, sys, time
    from flwr.app import Context, Metadata, RecordDict
    from flwr.app.message.message import make_message
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    from client import app

    request_file, reply_file, node_config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    proto = RecordDictProto()
    proto.ParseFromString(open(request_file, "rb").read())
    metadata = Metadata(run_id={RUN}, message_id="q", src_node_id=0, dst_node_id={NODE},
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=3600.0, message_type="train")
    message = make_message(metadata=metadata, content=recorddict_from_proto(proto))
    reply = app.train(message, Context(run_id={RUN}, node_id={NODE}, node_config=node_config,
                                       state=RecordDict(), run_config=dict()))
    if reply.has_error():
        sys.exit("error reply: " + reply.error.reason)
    open(reply_file, "wb").write(recorddict_to_proto(reply.content).SerializeToString())
    print(json.dumps(sorted(m for m in {HEAVY} if m in sys.modules)))
""")


@pytest.mark.e2e
def test_a_forwarding_clientapp_imports_no_training_stack(trainer, tiny_bert, tmp_path):
    """The point of the trainer: the per-message process stays light. A fresh
    interpreter that only imports ``client.app`` and forwards a message has
    none of the training stack loaded, and its reply is the in-process one."""
    content = _content(_config(tiny_bert))
    (tmp_path / "request.pb").write_bytes(recorddict_to_proto(content).SerializeToString())
    script = (FORWARD_ONLY.replace("{HEAVY}", repr(HEAVY)).replace("{NODE}", str(NODE))
              .replace("{RUN}", str(RUN)))
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "request.pb"),
         str(tmp_path / "reply.pb"), json.dumps(trainer.node_config())],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    proto = RecordDictProto()
    proto.ParseFromString((tmp_path / "reply.pb").read_bytes())
    forwarded = Message(content=recorddict_from_proto(proto),
                        reply_to=_train_message(content))
    cold = _in_process("handle_train", _train_message(content),
                       {"data-path": str(trainer.data)})
    assert _answer(forwarded) == _answer(cold)


# -- 2: a caller without the secret ----------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("metadata", [(), ((trainer_link.AUTH_HEADER, "Bearer wrong"),)],
                         ids=["no-secret", "wrong-secret"])
def test_a_call_without_the_secret_is_refused_and_logged(trainer, metadata):
    seen = trainer.seen()
    with grpc.insecure_channel(trainer.address) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        for call in (stub.Train, stub.Evaluate):
            with pytest.raises(grpc.RpcError) as refused:
                call(trainer_pb2.TaskRequest(run_id=RUN, node_id=NODE), metadata=metadata,
                     timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wait_for_line(trainer.log, r"refused a call from ipv4:127\.0\.0\.1:\d+", 10,
                  trainer.process, after=seen)


@pytest.mark.e2e
def test_forwarding_with_a_wrong_secret_is_an_error_reply_naming_the_trainer(
        trainer, tiny_bert, tmp_path):
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-trainer-secret-" + "y" * 32)
    content = _content(_config(tiny_bert))
    reply = trainer_link.forward(_train_message(content), _context(
        trainer.node_config(**{trainer_link.SECRET_FILE_KEY: str(wrong)})))
    assert reply.has_error()
    assert trainer.address in reply.error.reason and "UNAUTHENTICATED" in reply.error.reason
    with pytest.raises(codec.PayloadError, match=re.escape(trainer.address)):
        messages.TrainReply.from_message(reply)


# -- 3: no trainer ----------------------------------------------------------------------
@pytest.mark.parametrize("wait_s", [0.5, 0])
def test_a_trainer_that_is_down_is_an_error_reply_naming_it(tiny_bert, tmp_path, wait_s):
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    reply = trainer_link.forward(
        _train_message(_content(_config(tiny_bert))),
        _context({trainer_link.ADDRESS_KEY: address, trainer_link.SECRET_FILE_KEY: str(secret),
                  trainer_link.WAIT_KEY: wait_s}))
    assert reply.has_error()
    assert address in reply.error.reason and "unreachable" in reply.error.reason
    with pytest.raises(codec.PayloadError, match=re.escape(address)):
        messages.TrainReply.from_message(reply)


def test_a_download_that_is_not_a_payload_is_an_error_reply_naming_the_trainer(
        tiny_bert, tmp_path):
    """Bytes in the server's payload record that are not an AdapterPayload are
    refused before any call, in one line naming the trainer and the record
    (protobuf's own DecodeError names neither)."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    address = f"127.0.0.1:{free_port()}"  # never called: the request cannot be built
    content = _content(_config(tiny_bert))
    content[messages.PAYLOAD] = codec.to_record(b"\x0a\xff\xff\xff\xff\x0f")  # truncated
    reply = trainer_link.forward(_train_message(content), _context(
        {trainer_link.ADDRESS_KEY: address, trainer_link.SECRET_FILE_KEY: str(secret)}))
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith(f"trainer at {address}: the server's 'payload' record is not "
                             "a valid AdapterPayload"), reason
    assert len(reason.splitlines()) == 1


@pytest.mark.e2e
def test_a_node_that_does_not_wait_still_reaches_a_listening_trainer(trainer, tiny_bert):
    """``trainer-wait=0``: no patience for a trainer that is down, but one
    that listens is reached (the connection itself takes a moment)."""
    content = _content(_config(tiny_bert))
    reply = trainer_link.forward(_evaluate_message(content), _context(
        trainer.node_config(**{trainer_link.WAIT_KEY: 0})))
    assert _answer(reply)[2]["num-examples"] == 40


# -- 4: two runs at once -----------------------------------------------------------------
@pytest.mark.e2e
def test_two_runs_at_once_keep_apart(trainer, tiny_bert, tmp_path):
    """Two runs' training messages forwarded at the same time each get what
    they would alone, and their client states (CELLM's error feedback) land in
    one directory per run."""
    runs = {11: ("a11", "ab12", 1), 12: ("b22", "cd34", 2)}  # flower run: id, attempt, seed
    contents = {flower_run: _content(
        _config(tiny_bert, strategy="cellm", seed=seed,
                **{"cellm-error-feedback": True, "cellm-up-density": 0.3}),
        **{RUN_ID: run_id, LINEAGE: f"{attempt}:1"})
        for flower_run, (run_id, attempt, seed) in runs.items()}
    expected = {flower_run: _answer(_in_process(
        "handle_train", _train_message(content),
        {"data-path": str(trainer.data), "state-dir": str(tmp_path / f"cold-{flower_run}")}))
        for flower_run, content in contents.items()}
    assert expected[11] != expected[12]

    together = threading.Barrier(len(runs))
    replies: dict[int, Message] = {}

    def send(flower_run: int) -> None:
        msg = _train_message(contents[flower_run], message_id=f"q{flower_run}")
        together.wait(timeout=30)
        replies[flower_run] = trainer_link.forward(
            msg, _context(trainer.node_config(), run_id=flower_run))

    threads = [threading.Thread(target=send, args=(r,)) for r in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(replies) == sorted(runs)
    assert {r: _answer(reply) for r, reply in replies.items()} == expected

    # each run's state where the cold path keeps it, and the same bytes
    client = client_key({"data-path": str(trainer.data)}, 0)
    for flower_run, (run_id, attempt, _) in runs.items():
        assert [p.name for p in (trainer.state / run_id).iterdir()] == [client]
        saved = list((trainer.state / run_id / client).iterdir())
        assert [p.name for p in saved] == [f"state-1-{attempt}.pb"]
        cold = tmp_path / f"cold-{flower_run}" / run_id / client / saved[0].name
        assert saved[0].read_bytes() == cold.read_bytes()


# -- 5: a failed message ------------------------------------------------------------------
def _without_task(content: RecordDict) -> RecordDict:
    return RecordDict({n: r for n, r in content.items() if n != messages.TASK})


def _unknown_classes(content: RecordDict) -> RecordDict:
    """The node's labels 0..3 where the server knows two classes: bad data."""
    changed = RecordDict(dict(content.items()))
    config = dict(content.config_records[messages.CONFIG])
    changed[messages.CONFIG] = ConfigRecord({**config, LABEL_NAMES: list(LABEL_WORDS[:2])})
    return changed


@pytest.mark.e2e
@pytest.mark.parametrize("broken, code", [(_without_task, "INVALID_ARGUMENT"),
                                          (_unknown_classes, "FAILED_PRECONDITION")],
                         ids=["no-task-record", "bad-data"])
def test_a_failed_message_is_an_error_reply_and_the_trainer_goes_on(trainer, tiny_bert,
                                                                    broken, code):
    content = _content(_config(tiny_bert))
    bad = message(SERVER, NODE, broken(content), message_id="bad")
    reply = trainer_link.forward(bad, _context(trainer.node_config()))
    assert reply.has_error()
    assert reply.error.reason.startswith(f"trainer at {trainer.address}: {code}: ")
    assert len(reply.error.reason.splitlines()) == 1
    good = trainer_link.forward(_train_message(content), _context(trainer.node_config()))
    assert messages.TrainReply.from_message(good).partition_id == NODE
    assert trainer.process.poll() is None


@pytest.mark.e2e
def test_a_trainer_refuses_a_cohort_in_one_line_and_goes_on(trainer, tiny_bert):
    content = _content(_config(tiny_bert))
    requests = [Request.from_content(content)] * 2
    with server_identity():
        cohort = messages.cohort_message(requests, NODE, content.config_records[messages.CONFIG])
    reply = trainer_link.forward(message(SERVER, NODE, cohort.content, message_id="cohort"),
                                 _context(trainer.node_config()))
    assert reply.has_error() and len(reply.error.reason.splitlines()) == 1
    assert reply.error.reason.startswith(f"trainer at {trainer.address}: FAILED_PRECONDITION: "
                                         "ConfigError: a cohort of 2 clients sent to a "
                                         "deployed node")
    good = trainer_link.forward(_train_message(content), _context(trainer.node_config()))
    assert messages.TrainReply.from_message(good).partition_id == NODE


# -- 6: flags it cannot work with --------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("case", ["secret-missing", "secret-short", "data-not-a-dir"])
def test_bad_flags_end_in_one_line_and_exit_2(tmp_path, case):
    data, secret = tmp_path / "data", tmp_path / "secret"
    data.mkdir()
    secret.write_text("z" * 40)
    flag = "--secret-file"
    if case == "secret-missing":
        secret = tmp_path / "no-such-secret"
    elif case == "secret-short":
        secret.write_text("too-short")
    else:
        data, flag = tmp_path / "train.csv", "--data-path"
        data.write_text("text,label\n")
    done = subprocess.run(
        [sys.executable, "-m", "fedlora", "trainer", "--listen", f"127.0.0.1:{free_port()}",
         "--data-path", str(data), "--state-dir", str(tmp_path / "state"),
         "--secret-file", str(secret)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedlora trainer: error: {flag} "), lines


@pytest.mark.e2e
def test_a_second_trainer_on_a_port_in_use_exits_2(trainer, tmp_path):
    """Not a silent second listener sharing the port (gRPC's SO_REUSEPORT):
    the kernel would split the node's calls between the two processes."""
    done = subprocess.run(
        [sys.executable, "-m", "fedlora", "trainer", "--listen", trainer.address,
         "--data-path", str(trainer.data), "--state-dir", str(tmp_path / "state"),
         "--secret-file", str(trainer.secret_file)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    # gRPC's own log line about the bind may come first
    assert done.stderr.splitlines()[-1].startswith(
        f"fedlora trainer: error: --listen {trainer.address}: cannot listen"), done.stderr
    assert trainer.process.poll() is None
