"""The one codec for every byte on the wire: named tensors ↔ protobuf bytes.

Schema: ``proto/fedlora/v1/update.proto`` (generated module
``fedlora.v1.update_pb2``). Payloads travel as the bytes of a Flower ``Array``
with ``stype = PAYLOAD_STYPE``; ``uplink_bytes``/``downlink_bytes`` in the
metrics are the lengths of these serialized payloads.

Decoding trusts nothing: it checks the size before parsing, then names,
shapes, encodings, byte lengths and finiteness against what the receiver
expects, and raises ``PayloadError`` (one line) on the first problem.

Values travel as float32, float16 or int8 (symmetric, one float32 scale per
tensor): the run-config keys ``payload-dtype-down`` and ``payload-dtype-up``
choose, and a receiver refuses a payload in any other encoding. Quantising
is lossy, so a sender that must agree with its receiver on what was sent
(the server's start state, a client's error-feedback residual) keeps what
``round_trip`` decodes, never its own unquantised values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
ENCODINGS = tuple(_ENCODINGS)  # the values of payload-dtype-down / payload-dtype-up
_INT8_PEAK = 127  # int8 codes are -127..127: value = code * scale
_TINIEST = float(np.finfo(np.float32).smallest_subnormal)


class PayloadError(ValueError):
    """A payload that does not decode to what the receiver expects."""


@dataclass(frozen=True)
class SparseTensor:
    """The kept entries of a tensor: strictly increasing row-major flat
    positions and their values; every other entry is zero."""

    shape: tuple[int, ...]
    indices: np.ndarray  # int64
    values: np.ndarray  # float32

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        dense[self.indices] = self.values
        return dense.reshape(self.shape)


_MAX_VARINT_BYTES = 10


def _varints(numbers: np.ndarray) -> bytes:
    """Unsigned LEB128 encoding of non-negative integers, vectorised."""
    numbers = numbers.astype(np.uint64)
    sizes = np.ones(len(numbers), dtype=np.int64)
    for shift in range(7, 64, 7):
        sizes += numbers >= (np.uint64(1) << np.uint64(shift))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    for k in range(int(sizes.max()) if len(sizes) else 0):
        present = sizes > k
        chunk = (numbers[present] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (sizes[present] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[present] + k] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _unvarints(data: bytes, count: int, where: str) -> np.ndarray:
    """Decode exactly ``count`` LEB128 varints that fill ``data``."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if len(ends) != count or (count and ends[-1] != len(raw) - 1) or (not count and len(raw)):
        raise PayloadError(f"{where}: index bytes do not hold {count} varints")
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if np.max(ends - starts) >= _MAX_VARINT_BYTES:
        raise PayloadError(f"{where}: index varint longer than {_MAX_VARINT_BYTES} bytes")
    position = np.arange(len(raw)) - np.repeat(starts, ends - starts + 1)
    parts = (raw & 0x7F).astype(np.uint64) << (np.uint64(7) * position.astype(np.uint64))
    return np.add.reduceat(parts, starts)


def _encode_values(values: np.ndarray, encoding: str) -> pb.Values:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if encoding == "int8":
        peak = float(np.max(np.abs(flat))) if flat.size else 0.0
        # a peak below 127 float32 subnormals would give scale 0, which decodes as missing
        scale = max(peak / _INT8_PEAK, _TINIEST) if peak > 0 else 1.0
        quantised = np.clip(np.rint(flat / scale), -_INT8_PEAK, _INT8_PEAK).astype(np.int8)
        return pb.Values(encoding=pb.INT8, data=quantised.tobytes(), scale=scale)
    code = _ENCODINGS[encoding]
    return pb.Values(encoding=code, data=flat.astype(_DTYPES[code]).tobytes())


def encode(tensors: Mapping[str, np.ndarray | SparseTensor],
           encoding: str = "float32") -> bytes:
    """Serialize named tensors, dense arrays or ``SparseTensor``s, with values
    in ``encoding`` (float32, float16 or int8)."""
    if encoding not in _ENCODINGS:
        raise ValueError(f"unknown value encoding {encoding!r}")
    message = pb.AdapterPayload(format_version=FORMAT_VERSION)
    for name, tensor in tensors.items():
        if isinstance(tensor, SparseTensor):
            gaps = np.diff(tensor.indices, prepend=0)
            layout = {"sparse": pb.Sparse(
                index_gaps=_varints(gaps), count=len(tensor.indices),
                values=_encode_values(tensor.values, encoding))}
            shape = tensor.shape
        else:
            layout = {"dense": _encode_values(np.asarray(tensor), encoding)}
            shape = np.shape(tensor)
        message.tensors.append(pb.Tensor(name=name, shape=list(shape), **layout))
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
        _check_scale(values.scale, where)
        with np.errstate(over="ignore"):  # overflow to Inf is rejected just below
            array = array * np.float32(values.scale)
    if not np.all(np.isfinite(array)):
        raise PayloadError(f"{where}: non-finite values (NaN or Inf)")
    return array


def _check_scale(scale: float, where: str) -> None:
    """Refuse an int8 scale the encoder never writes: it is peak / 127 of a
    finite float32 peak (1 for an all-zero tensor), so positive, finite, and
    every code times it finite in float32. A zero scale is a missing one."""
    with np.errstate(over="ignore"):
        top = np.float32(_INT8_PEAK) * np.float32(scale)
    if not (scale > 0 and np.isfinite(top)):
        raise PayloadError(f"{where}: bad int8 scale {scale}")


def size_limit(expected: Mapping[str, tuple[int, ...]], encoding: str = "float32") -> int:
    """The largest payload accepted for ``expected`` in ``encoding``: the
    values plus, for sparse layouts, up to 2 bytes of index per entry, plus
    framing."""
    per_entry = _DTYPES[_ENCODINGS[encoding]].itemsize + 2
    values = sum(int(np.prod(shape)) * per_entry for shape in expected.values())
    return values + _FRAMING_ALLOWANCE + 64 * len(expected)


def _decode_sparse(sparse: pb.Sparse, shape: tuple[int, ...], where: str) -> SparseTensor:
    size = int(np.prod(shape))
    if sparse.count > size:
        raise PayloadError(f"{where}: {sparse.count} kept entries in a tensor of {size}")
    count = int(sparse.count)
    gaps = _unvarints(sparse.index_gaps, count, where)
    if count and np.any(gaps[1:] == 0):
        raise PayloadError(f"{where}: sparse positions not strictly increasing")
    if count and int(gaps.max()) >= size:
        raise PayloadError(f"{where}: sparse position out of range")
    positions = np.cumsum(gaps, dtype=np.uint64)
    if count and int(positions[-1]) >= size:
        raise PayloadError(f"{where}: sparse position out of range")
    values = _decode_values(sparse.values, count, where)
    return SparseTensor(shape, positions.astype(np.int64), values)


def _parse(blob: bytes) -> pb.AdapterPayload:
    message = pb.AdapterPayload()
    try:
        message.ParseFromString(bytes(blob))
    except DecodeError as err:
        raise PayloadError(f"not a valid AdapterPayload ({err})") from None
    if message.format_version != FORMAT_VERSION:
        raise PayloadError(f"unsupported format_version {message.format_version}")
    return message


def _values(tensor: pb.Tensor, shape: tuple[int, ...], where: str) -> np.ndarray:
    size = int(np.prod(shape))
    layout = tensor.WhichOneof("layout")
    if layout == "dense":
        return _decode_values(tensor.dense, size, where).reshape(shape)
    if layout == "sparse":
        return _decode_sparse(tensor.sparse, shape, where).to_dense()
    raise PayloadError(f"{where}: no values")


def _check_encoding(tensor: pb.Tensor, encoding: str, where: str) -> None:
    """Refuse values in another encoding than the run's: a sender that
    ignores ``payload-dtype-*`` would spend bytes the run did not plan for."""
    layout = tensor.WhichOneof("layout")
    values = tensor.sparse.values if layout == "sparse" else tensor.dense
    if layout is not None and values.encoding != _ENCODINGS[encoding]:
        name = pb.ValueEncoding.Name(values.encoding) if values.encoding in _DTYPES else "?"
        raise PayloadError(f"{where}: {name.lower()} values, the run sends {encoding}")


def decode(blob: bytes, expected: Mapping[str, tuple[int, ...]],
           encoding: str | None = None) -> dict[str, np.ndarray]:
    """Parse and validate a payload that must hold exactly the ``expected``
    tensors (name → shape), with values in ``encoding`` when it is given
    (then the size limit is that encoding's too); returns float32 arrays."""
    limit = size_limit(expected, encoding or "float32")
    if len(blob) > limit:
        raise PayloadError(f"payload of {len(blob)} bytes exceeds the {limit}-byte limit")
    tensors: dict[str, np.ndarray] = {}
    for tensor in _parse(blob).tensors:
        where = f"tensor {tensor.name!r}"
        if tensor.name not in expected:
            raise PayloadError(f"{where}: unexpected name")
        if tensor.name in tensors:
            raise PayloadError(f"{where}: sent twice")
        shape = tuple(int(d) for d in tensor.shape)
        if shape != tuple(expected[tensor.name]):
            raise PayloadError(f"{where}: shape {shape}, expected {tuple(expected[tensor.name])}")
        if encoding is not None:
            _check_encoding(tensor, encoding, where)
        tensors[tensor.name] = _values(tensor, shape, where)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PayloadError(f"missing tensor {missing[0]!r} ({len(missing)} missing)")
    return tensors


def round_trip(tensors: Mapping[str, np.ndarray | SparseTensor],
               encoding: str) -> tuple[dict[str, np.ndarray], bytes]:
    """(the dense float32 arrays the receiver decodes, the bytes sent) for
    ``tensors`` in ``encoding``: the receiver's own ``decode`` of the very
    bytes, so sender and receiver agree bit for bit. A ValueError when
    ``encoding`` cannot carry them (beyond float16's range, not finite)."""
    blob = encode(tensors, encoding)
    shapes = {name: tensor.shape if isinstance(tensor, SparseTensor) else np.shape(tensor)
              for name, tensor in tensors.items()}
    try:
        return decode(blob, shapes, encoding), blob
    except PayloadError as err:
        raise ValueError(f"{encoding} cannot carry these values ({err})") from None


def decode_any(blob: bytes) -> dict[str, np.ndarray]:
    """Parse a payload whose names and shapes the caller checks afterwards (a
    server's base-weight update: ``fedlora.wire.basedelta``); values are still
    checked for size and finiteness."""
    tensors: dict[str, np.ndarray] = {}
    for tensor in _parse(blob).tensors:
        where = f"tensor {tensor.name!r}"
        shape = tuple(int(d) for d in tensor.shape)
        if tensor.name in tensors or any(d < 0 for d in shape):
            raise PayloadError(f"{where}: sent twice or a negative dimension")
        tensors[tensor.name] = _values(tensor, shape, where)
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
