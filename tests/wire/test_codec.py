"""The wire codec: exact round trips, byte counting, and a decoder that rejects
every malformed payload with PayloadError (and nothing else)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.common import serde

from fedlora.v1 import update_pb2 as pb
from fedlora.wire import codec
from fedlora.wire.codec import PayloadError
from fedlora.wire.sparsity import top_k

SHAPES = {
    "base.layer.0.query.lora_A.weight": (4, 8),
    "base.layer.0.query.lora_B.weight": (8, 4),
    "base.classifier.modules_to_save.default.bias": (3,),
}


def _state(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in SHAPES.items()}


def _payload(tensors: list[pb.Tensor], version: int = codec.FORMAT_VERSION) -> bytes:
    return pb.AdapterPayload(format_version=version, tensors=tensors).SerializeToString()


def _dense(name: str, shape, data: bytes, encoding=pb.FLOAT32, scale: float = 0.0):
    return pb.Tensor(name=name, shape=list(shape),
                     dense=pb.Values(encoding=encoding, data=data, scale=scale))


def _good_tensors(state=None) -> list[pb.Tensor]:
    state = state if state is not None else _state()
    return [_dense(name, value.shape, value.astype("<f4").tobytes())
            for name, value in state.items()]


def _rejects(blob: bytes, expected=SHAPES) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        codec.decode(blob, expected)
    assert "\n" not in str(info.value)
    return info.value


# ----------------------------------------------------------------- round trips


def test_float32_round_trip_is_bit_exact():
    state = _state(1)
    state["base.layer.0.query.lora_A.weight"][0, :4] = [0.0, -0.0, 1e-45, 3.4e38]
    decoded = codec.decode(codec.encode(state), SHAPES)
    assert set(decoded) == set(state)
    for name, value in state.items():
        assert decoded[name].dtype == np.float32
        assert decoded[name].shape == value.shape
        assert decoded[name].tobytes() == value.tobytes()


def test_float16_round_trip_within_tolerance():
    state = _state(2)
    blob = codec.encode(state, "float16")
    decoded = codec.decode(blob, SHAPES)
    for name, value in state.items():
        assert decoded[name].dtype == np.float32 and decoded[name].shape == value.shape
        np.testing.assert_allclose(decoded[name], value, rtol=1e-3, atol=1e-4)
    assert len(blob) < len(codec.encode(state))


def test_int8_round_trip_within_tolerance():
    state = _state(3)
    blob = codec.encode(state, "int8")
    decoded = codec.decode(blob, SHAPES)
    for name, value in state.items():
        peak = float(np.abs(value).max())
        assert decoded[name].dtype == np.float32 and decoded[name].shape == value.shape
        # symmetric quantisation: error at most half a step of peak / 127
        assert np.max(np.abs(decoded[name] - value)) <= peak / 127 / 2 + 1e-6
    assert len(blob) < len(codec.encode(state, "float16"))


def test_int8_all_zero_tensor():
    state = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    decoded = codec.decode(codec.encode(state, "int8"), SHAPES)
    for name in SHAPES:
        assert not decoded[name].any()


def test_unknown_encoding_refused_by_encoder():
    with pytest.raises(ValueError):
        codec.encode(_state(), "bfloat7")


def test_record_carries_exactly_the_encoded_bytes():
    blob = codec.encode(_state(4))
    assert isinstance(blob, bytes)
    record = codec.to_record(blob)
    array = record[codec.PAYLOAD_KEY]
    assert array.stype == codec.PAYLOAD_STYPE
    assert tuple(array.shape) == (len(blob),)
    assert len(array.data) == len(blob)
    assert codec.from_record(record) == blob
    # the length is what the metrics count: the values plus a little framing
    values = sum(int(np.prod(s)) * 4 for s in SHAPES.values())
    assert values < len(blob) < values + 512
    # and it survives Flower's own wire serialisation of the record
    wire = serde.array_record_to_proto(record).SerializeToString()
    proto = serde.ProtoArrayRecord()
    proto.ParseFromString(wire)
    assert codec.from_record(serde.array_record_from_proto(proto)) == blob


def test_from_record_rejects_wrong_stype_and_missing_key():
    blob = codec.encode(_state())
    wrong = ArrayRecord({codec.PAYLOAD_KEY: Array(
        dtype="uint8", shape=(len(blob),), stype="numpy.ndarray", data=blob)})
    with pytest.raises(PayloadError, match="stype"):
        codec.from_record(wrong)
    other_key = ArrayRecord({"weights": Array(
        dtype="uint8", shape=(len(blob),), stype=codec.PAYLOAD_STYPE, data=blob)})
    with pytest.raises(PayloadError, match=codec.PAYLOAD_KEY):
        codec.from_record(other_key)
    with pytest.raises(PayloadError):
        codec.from_record(ArrayRecord())
    with pytest.raises(PayloadError):
        codec.from_record(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------- rejections


@pytest.mark.parametrize("cut", [1, 2, 5, 17, 40, 100, 200, -1, -2, -7])
def test_truncated_payload_rejected(cut):
    blob = codec.encode(_state())
    _rejects(blob[:cut])


def test_empty_payload_rejected():
    _rejects(b"")


@pytest.mark.parametrize("seed", range(8))
def test_random_garbage_rejected(seed):
    rng = np.random.default_rng(seed)
    _rejects(rng.integers(0, 256, int(rng.integers(1, 600)), dtype=np.uint8).tobytes())


def test_wrong_shape_rejected():
    state = _state()
    tensors = _good_tensors(state)
    tensors[0].ClearField("shape")
    tensors[0].shape.extend([8, 4])  # same element count, transposed
    error = _rejects(_payload(tensors))
    assert "shape" in str(error)
    tensors[0].ClearField("shape")
    tensors[0].shape.extend([32])
    _rejects(_payload(tensors))


def test_unknown_tensor_name_rejected():
    tensors = _good_tensors()
    tensors.append(_dense("evil.weight", (3,), np.zeros(3, "<f4").tobytes()))
    assert "evil.weight" in str(_rejects(_payload(tensors)))


def test_renamed_tensor_rejected():
    tensors = _good_tensors()
    tensors[1].name = "base.layer.0.value.lora_B.weight"
    _rejects(_payload(tensors))


def test_duplicate_tensor_rejected():
    tensors = _good_tensors()
    tensors.append(tensors[2])
    assert "twice" in str(_rejects(_payload(tensors)))


def test_missing_tensor_rejected():
    tensors = _good_tensors()[:-1]
    assert "missing" in str(_rejects(_payload(tensors)))
    _rejects(_payload([]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("encoding", ["float32", "float16"])
def test_non_finite_values_rejected(bad, encoding):
    state = _state()
    state["base.layer.0.query.lora_B.weight"][2, 1] = bad
    _rejects(codec.encode(state, encoding))


def test_float16_overflow_rejected():
    # finite in float32, infinite once narrowed to float16: the receiver must refuse
    state = _state()
    state["base.classifier.modules_to_save.default.bias"][0] = 1e6
    with np.errstate(over="ignore"):
        blob = codec.encode(state, "float16")
    _rejects(blob)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_bad_int8_scale_rejected(scale):
    tensors = [_dense(name, shape, np.ones(int(np.prod(shape)), np.int8).tobytes(),
                      encoding=pb.INT8, scale=scale)
               for name, shape in SHAPES.items()]
    _rejects(_payload(tensors))


@pytest.mark.parametrize("version", [0, 2, 99])
def test_wrong_format_version_rejected(version):
    assert "format_version" in str(_rejects(_payload(_good_tensors(), version)))


@pytest.mark.parametrize("delta", [-4, -1, 1, 4, 400])
def test_value_bytes_not_matching_shape_rejected(delta):
    tensors = _good_tensors()
    data = tensors[0].dense.data
    tensors[0].dense.data = data[:len(data) + delta] if delta < 0 else data + b"\0" * delta
    _rejects(_payload(tensors))


def test_float16_bytes_declared_as_float32_rejected():
    tensors = _good_tensors()
    tensors[0].dense.encoding = pb.FLOAT16  # twice as many values as the shape holds
    _rejects(_payload(tensors))


@pytest.mark.parametrize("encoding", [pb.VALUE_ENCODING_UNSPECIFIED, 7])
def test_unknown_value_encoding_rejected(encoding):
    tensors = _good_tensors()
    tensors[0].dense.encoding = encoding
    _rejects(_payload(tensors))


def test_missing_layout_rejected():
    tensors = _good_tensors()
    name, shape = tensors[0].name, list(tensors[0].shape)
    tensors[0] = pb.Tensor(name=name, shape=shape)
    _rejects(_payload(tensors))


def test_oversized_payload_rejected_before_parsing():
    good = codec.encode(_state())
    limit = codec.size_limit(SHAPES)
    assert limit >= 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    # a parseable payload padded with an unknown field up to just over the limit
    pad = limit + 1 - len(good) - 4
    field = b"\x7a" + _varint(pad) + b"\0" * pad  # field 15, length-delimited
    huge = good + field
    assert len(huge) > limit
    assert "limit" in str(_rejects(huge))
    _rejects(b"\0" * (10 * limit))
    # the same valid payload under the limit decodes
    assert set(codec.decode(good, SHAPES)) == set(SHAPES)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# ----------------------------------------------------------------- fuzz


def test_fuzzed_payloads_decode_cleanly_or_raise_payload_error():
    rng = np.random.default_rng(1234)
    good = codec.encode(_state(5))
    others = [codec.encode(_state(6), "int8"),
              codec.encode(top_k(_state(7), 0.3), "float16")]  # sparse layouts
    accepted = rejected = 0
    start = time.monotonic()
    for _ in range(300):
        blob = bytearray(good if rng.random() < 0.5 else others[int(rng.integers(0, 2))])
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 4))
            position = int(rng.integers(0, len(blob) + 1))
            if kind == 0 and blob:  # flip bits of a byte
                index = min(position, len(blob) - 1)
                blob[index] ^= int(rng.integers(1, 256))
            elif kind == 1:  # truncate
                del blob[position:]
            elif kind == 2:  # insert a whole valid payload somewhere
                blob[position:position] = good
            else:  # insert random bytes
                blob[position:position] = rng.integers(
                    0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        try:
            decoded = codec.decode(bytes(blob), SHAPES)
        except PayloadError:
            rejected += 1
            continue
        # anything else propagates and fails the test
        accepted += 1
        assert set(decoded) == set(SHAPES)
        for name, shape in SHAPES.items():
            assert decoded[name].shape == shape
            assert decoded[name].dtype == np.float32
            assert np.all(np.isfinite(decoded[name]))
    assert rejected > 0 and accepted > 0  # both outcomes were exercised
    assert accepted + rejected == 300
    assert time.monotonic() - start < 10.0


def test_sparse_round_trip_and_malformed_indices_rejected():
    shape = (6, 5)
    dense = np.zeros(shape, np.float32)
    dense.flat[[0, 7, 29]] = [1.5, -2.0, 3.25]
    sparse = codec.SparseTensor(shape, np.array([0, 7, 29], np.int64),
                                np.array([1.5, -2.0, 3.25], np.float32))
    np.testing.assert_array_equal(codec.decode(codec.encode({"t": sparse}), {"t": shape})["t"],
                                  dense)

    def payload(gaps: bytes, count: int, values: int) -> bytes:
        tensor = pb.Tensor(name="t", shape=list(shape), sparse=pb.Sparse(
            index_gaps=gaps, count=count,
            values=pb.Values(encoding=pb.FLOAT32, data=b"\0" * 4 * values)))
        return pb.AdapterPayload(format_version=1, tensors=[tensor]).SerializeToString()

    for blob in (payload(bytes([0, 7, 40]), 3, 3),   # position 47 >= 30
                 payload(bytes([3, 0]), 2, 2),       # repeated position
                 payload(bytes([0, 7]), 3, 3),       # fewer indices than count
                 payload(bytes([0x80, 0x80]), 1, 1),  # unterminated varint
                 payload(bytes([0, 1]), 2, 3),       # values do not match count
                 payload(b"", 31, 31)):              # more entries than the tensor
        with pytest.raises(PayloadError):
            codec.decode(blob, {"t": shape})
