"""The checked-in generated module must be what proto/build.py makes of the schema."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED_IN = REPO / "fedlora" / "v1" / "update_pb2.py"


def _build_module():
    spec = importlib.util.spec_from_file_location("_fedlora_proto_build",
                                                  REPO / "proto" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_module_matches_schema(tmp_path):
    generated = _build_module().build(tmp_path / "gen")
    assert generated.is_file()
    assert generated.read_bytes() == CHECKED_IN.read_bytes(), (
        "fedlora/v1/update_pb2.py is out of date with proto/fedlora/v1/update.proto: "
        "run `python proto/build.py`")


def test_checked_in_module_is_the_schema_in_use():
    from fedlora.v1 import update_pb2

    assert Path(update_pb2.__file__).resolve() == CHECKED_IN.resolve()
    names = set(update_pb2.DESCRIPTOR.message_types_by_name)
    assert {"AdapterPayload", "Tensor", "Values", "Sparse"} <= names
    assert update_pb2.DESCRIPTOR.package == "fedlora.v1"
