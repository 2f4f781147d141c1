"""The one codec for every byte on the wire: named tensors ↔ protobuf bytes.

Schema: ``proto/fedlora/v1/update.proto`` (generated module
``fedlora.v1.update_pb2``). Payloads travel as the bytes of a Flower ``Array``
with ``stype = PAYLOAD_STYPE``; ``uplink_bytes``/``downlink_bytes`` in the
metrics are the lengths of these serialized payloads.

Decoding trusts nothing: it checks the size before parsing, then names,
shapes, encodings, byte lengths and finiteness against what the receiver
expects, and raises ``PayloadError`` (one line) on the first problem.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from google.protobuf.message import DecodeError

from fedlora.v1 import update_pb2 as pb

FORMAT_VERSION = 1
PAYLOAD_STYPE = "fedlora.v1.AdapterPayload"
PAYLOAD_KEY = "adapter"  # the Array's key inside the message's ArrayRecord
_FRAMING_ALLOWANCE = 64 * 1024  # names, shapes and protobuf tags on top of values

_DTYPES = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2"), pb.INT8: np.dtype("i1")}
_ENCODINGS = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "int8": pb.INT8}


class PayloadError(ValueError):
    """A payload that does not decode to what the receiver expects."""


def _encode_values(values: np.ndarray, encoding: str) -> pb.Values:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if encoding == "int8":
        peak = float(np.max(np.abs(flat))) if flat.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        quantised = np.clip(np.rint(flat / scale), -127, 127).astype(np.int8)
        return pb.Values(encoding=pb.INT8, data=quantised.tobytes(), scale=scale)
    code = _ENCODINGS[encoding]
    return pb.Values(encoding=code, data=flat.astype(_DTYPES[code]).tobytes())


def encode(tensors: Mapping[str, np.ndarray], encoding: str = "float32") -> bytes:
    """Serialize named dense tensors (float32 by default)."""
    if encoding not in _ENCODINGS:
        raise ValueError(f"unknown value encoding {encoding!r}")
    message = pb.AdapterPayload(format_version=FORMAT_VERSION)
    for name, values in tensors.items():
        message.tensors.append(pb.Tensor(
            name=name, shape=list(np.shape(values)),
            dense=_encode_values(np.asarray(values), encoding)))
    return message.SerializeToString()


def _decode_values(values: pb.Values, count: int, where: str) -> np.ndarray:
    dtype = _DTYPES.get(values.encoding)
    if dtype is None:
        raise PayloadError(f"{where}: unknown value encoding {values.encoding}")
    if len(values.data) != count * dtype.itemsize:
        raise PayloadError(f"{where}: {len(values.data)} value bytes for {count} "
                           f"{dtype.name} values")
    array = np.frombuffer(values.data, dtype=dtype).astype(np.float32)
    if values.encoding == pb.INT8:
        if not (np.isfinite(values.scale) and values.scale >= 0):
            raise PayloadError(f"{where}: bad int8 scale {values.scale}")
        with np.errstate(over="ignore"):  # overflow to Inf is rejected just below
            array = array * np.float32(values.scale)
    if not np.all(np.isfinite(array)):
        raise PayloadError(f"{where}: non-finite values (NaN or Inf)")
    return array


def decode(blob: bytes, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Parse and validate a payload that must hold exactly the ``expected``
    tensors (name → shape); returns float32 arrays."""
    limit = sum(int(np.prod(shape)) * 4 for shape in expected.values())
    limit += _FRAMING_ALLOWANCE + 64 * len(expected)
    if len(blob) > limit:
        raise PayloadError(f"payload of {len(blob)} bytes exceeds the {limit}-byte limit")
    message = pb.AdapterPayload()
    try:
        message.ParseFromString(bytes(blob))
    except DecodeError as err:
        raise PayloadError(f"not a valid AdapterPayload ({err})") from None
    if message.format_version != FORMAT_VERSION:
        raise PayloadError(f"unsupported format_version {message.format_version}")
    tensors: dict[str, np.ndarray] = {}
    for tensor in message.tensors:
        where = f"tensor {tensor.name!r}"
        if tensor.name not in expected:
            raise PayloadError(f"{where}: unexpected name")
        if tensor.name in tensors:
            raise PayloadError(f"{where}: sent twice")
        shape = tuple(int(d) for d in tensor.shape)
        if shape != tuple(expected[tensor.name]):
            raise PayloadError(f"{where}: shape {shape}, expected {tuple(expected[tensor.name])}")
        layout = tensor.WhichOneof("layout")
        if layout != "dense":
            raise PayloadError(f"{where}: layout {layout!r} is not supported")
        count = int(np.prod(shape))
        tensors[tensor.name] = _decode_values(tensor.dense, count, where).reshape(shape)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PayloadError(f"missing tensor {missing[0]!r} ({len(missing)} missing)")
    return tensors


def to_record(blob: bytes) -> ArrayRecord:
    """Wrap payload bytes for a Flower message."""
    array = Array(dtype="uint8", shape=(len(blob),), stype=PAYLOAD_STYPE, data=blob)
    return ArrayRecord({PAYLOAD_KEY: array})


def from_record(record: ArrayRecord) -> bytes:
    """The payload bytes inside a message's ArrayRecord."""
    array = record.get(PAYLOAD_KEY) if isinstance(record, ArrayRecord) else None
    if array is None:
        raise PayloadError(f"no '{PAYLOAD_KEY}' array in the reply")
    if array.stype != PAYLOAD_STYPE:
        raise PayloadError(f"array stype {array.stype!r}, expected {PAYLOAD_STYPE!r}")
    return bytes(array.data)
