"""The ClientApp's side of a node's warm trainer (``fedlora trainer``).

A deployed ClientApp is a fresh process per message (Flower ≥ 1.21). When the
node config names a trainer (``trainer='HOST:PORT'`` or ``'unix:PATH'``), the
ClientApp only forwards the message to it over ``fedlora.v1.Trainer`` (schema:
``proto/fedlora/v1/trainer.proto``) and returns its answer; the trainer keeps
the model, the data and the client state warm. This module is that forwarder,
and the conversion of Flower messages to the service's messages and back,
which the trainer (``fedlora.node.trainer``) shares.

It imports Flower, gRPC, the generated modules and fedlora's message schema
only, never torch, transformers, PEFT or datasets: that is what makes a warm node's per-message
process cheap (``tests/test_trainer.py`` checks it).

Node config keys (``flower-supernode --node-config``):

* ``trainer``: the trainer's address;
* ``trainer-secret-file``: a file holding the secret the trainer was started
  with (sent as ``authorization: Bearer …``; the trainer refuses any other);
* ``trainer-wait``: seconds to wait for a trainer that is not listening (a
  restart, say) before giving up on the message (default 10).

A trainer that cannot be reached, refuses the call or fails the message gets
an error reply naming its address; the server rejects it like any failed
reply, and the round goes on.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.app.constants import DEFAULT_TTL
from flwr.app.message.message import make_message
from flwr.common import MessageType
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from fedlora.v1 import trainer_pb2, trainer_pb2_grpc
from fedlora.wire import codec
from fedlora.wire.messages import CONFIG, PAYLOAD

ADDRESS_KEY = "trainer"
SECRET_FILE_KEY = "trainer-secret-file"
WAIT_KEY = "trainer-wait"
DEFAULT_WAIT_S = 10.0
# What a trainer accepts and sends in one message: a 7B model's r=16 adapter
# is about 160 MB in float32; the base-weight catch-up of FLoRA more.
MAX_MESSAGE_BYTES = 1 << 30
CHANNEL_OPTIONS = (("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES))
MIN_SECRET_CHARS = 32
AUTH_HEADER = "authorization"
TIMEOUT_KEY = "round-timeout"


class TrainerError(Exception):
    """A one-line reason why a message could not go through the trainer."""


def read_secret(path: str | Path, what: str) -> str:
    """The shared secret in ``path`` (whitespace stripped); ``TrainerError``
    naming ``what`` and the file when it is missing or too short to guess."""
    try:
        secret = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise TrainerError(f"{what} {path}: cannot be read "
                           f"({getattr(err, 'strerror', None) or err})") from None
    if len(secret) < MIN_SECRET_CHARS or not secret.isprintable():
        raise TrainerError(f"{what} {path}: needs a printable secret of at least "
                           f"{MIN_SECRET_CHARS} characters (deploy/make-certs.sh writes one)")
    return secret


def secret_matches(metadata: Mapping[str, str], secret: str) -> bool:
    """Whether a call's ``authorization`` metadata carries ``secret``
    (compared in constant time)."""
    given = metadata.get(AUTH_HEADER, "")
    return hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())


# -- Flower message <-> service message ----------------------------------------------
def split_payload(content: RecordDict) -> tuple[bytes, bytes | None]:
    """``content`` as Flower's RecordDict protobuf without its ``payload``
    record, and that record's serialized AdapterPayload (``None``: none)."""
    rest = RecordDict({name: record for name, record in content.items() if name != PAYLOAD})
    payload = None
    if PAYLOAD in content.array_records:
        try:
            payload = codec.from_record(content.array_records[PAYLOAD])
        except codec.PayloadError as err:
            raise TrainerError(f"the {PAYLOAD!r} record: {err}") from None
    return recorddict_to_proto(rest).SerializeToString(), payload


def _parse(proto: ProtoMessage, data: bytes, what: str) -> None:
    """``proto.ParseFromString(data)``; ``TrainerError`` naming ``what`` when
    the bytes are not that message (protobuf's ``DecodeError`` says neither
    which message nor where it came from)."""
    try:
        proto.ParseFromString(data)
    except DecodeError as err:
        raise TrainerError(f"{what} is not a valid {proto.DESCRIPTOR.name} ({err})") from None


def join_payload(content: bytes, payload: bytes | None) -> RecordDict:
    """The inverse of ``split_payload``."""
    proto = RecordDictProto()
    _parse(proto, content, "the message's content")
    records = recorddict_from_proto(proto)
    if payload is not None:
        records[PAYLOAD] = codec.to_record(payload)
    return records


def to_request(message: Message, context: Context) -> trainer_pb2.TaskRequest:
    content, payload = split_payload(message.content)
    request = trainer_pb2.TaskRequest(run_id=context.run_id, node_id=context.node_id,
                                      content=content)
    if payload is not None:
        _parse(request.download, payload, f"the server's {PAYLOAD!r} record")
    return request


def to_reply(reply: Message) -> trainer_pb2.TaskReply:
    """A handled message's reply for the wire (an error reply raises
    ``TrainerError`` with its reason's last line)."""
    if reply.has_error():
        lines = (reply.error.reason or "").strip().splitlines()
        raise TrainerError(lines[-1] if lines else f"error {reply.error.code}")
    content, payload = split_payload(reply.content)
    answer = trainer_pb2.TaskReply(content=content)
    if payload is not None:
        _parse(answer.upload, payload, f"the reply's {PAYLOAD!r} record")
    return answer


def message_of(request: trainer_pb2.TaskRequest, message_type: str) -> Message:
    """The Flower message a request carries, as the trainer hands it to the
    client loop. Built from explicit metadata: ``Message(...)`` would take
    its ids from a Flower task identity, which the trainer, not a Flower
    app process, does not have."""
    download = (request.download.SerializeToString() if request.HasField("download")
                else None)
    metadata = Metadata(run_id=request.run_id, message_id="", src_node_id=0,
                        dst_node_id=request.node_id, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return make_message(metadata=metadata, content=join_payload(request.content, download))


# -- the forwarder --------------------------------------------------------------------
def configured(node_config: Mapping) -> bool:
    """Whether this node's ClientApp forwards to a trainer."""
    return bool(str(node_config.get(ADDRESS_KEY, "")).strip())


def _round_timeout(message: Message) -> float | None:
    """The run's ``round-timeout`` (0: none), as the call's deadline."""
    config = message.content.config_records.get(CONFIG) if CONFIG in message.content else None
    value = config.get(TIMEOUT_KEY, 0) if config is not None else 0
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _wait_s(node_config: Mapping) -> float:
    value = node_config.get(WAIT_KEY, DEFAULT_WAIT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value <= 3600:
        raise TrainerError(f"node config {WAIT_KEY}={value!r}: needs seconds in [0, 3600]")
    return float(value)


def forward(message: Message, context: Context) -> Message:
    """Send ``message`` to this node's trainer and return its reply, or an
    error reply naming the trainer's address and what went wrong."""
    address = str(context.node_config[ADDRESS_KEY]).strip()
    try:
        return _forward(address, message, context)
    except TrainerError as err:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"trainer at {address}: {err}"), reply_to=message)


def _forward(address: str, message: Message, context: Context) -> Message:
    secret_file = context.node_config.get(SECRET_FILE_KEY)
    if not secret_file:
        raise TrainerError(f"node config has no {SECRET_FILE_KEY} (the trainer's secret)")
    secret = read_secret(str(secret_file), f"node config {SECRET_FILE_KEY}")
    wait_s = _wait_s(context.node_config)
    request = to_request(message, context)
    train = message.metadata.message_type == MessageType.TRAIN
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        # trainer-wait=0 skips the wait, not the connection: a ready future
        # with timeout 0 fails even on a listening trainer (connecting takes a
        # moment), and the call below fails fast (UNAVAILABLE) on one that is not
        if wait_s > 0:
            try:
                grpc.channel_ready_future(channel).result(timeout=wait_s)
            except grpc.FutureTimeoutError:
                raise TrainerError(f"unreachable (not listening after {wait_s:g} s)") from None
        stub = trainer_pb2_grpc.TrainerStub(channel)
        call = stub.Train if train else stub.Evaluate
        try:
            reply = call(request, metadata=((AUTH_HEADER, f"Bearer {secret}"),),
                         timeout=_round_timeout(message))
        except grpc.RpcError as err:
            what = "unreachable: " if err.code() == grpc.StatusCode.UNAVAILABLE else ""
            raise TrainerError(f"{what}{err.code().name}: {err.details()}") from None
    upload = reply.upload.SerializeToString() if reply.HasField("upload") else None
    return Message(content=join_payload(reply.content, upload), reply_to=message)

