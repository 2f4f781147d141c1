"""The checked-in generated modules must be what proto/build.py makes of the schemas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "fedlora" / "v1"


def _build_module():
    spec = importlib.util.spec_from_file_location("_fedlora_proto_build",
                                                  REPO / "proto" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_match_schemas(tmp_path):
    generated = _build_module().build(tmp_path / "gen")
    names = sorted(path.name for path in generated)
    assert names == ["trainer_pb2.py", "trainer_pb2_grpc.py", "update_pb2.py"]
    assert names == sorted(path.name for path in GENERATED.glob("*_pb2*.py"))
    for path in generated:
        assert path.read_bytes() == (GENERATED / path.name).read_bytes(), (
            f"fedlora/v1/{path.name} is out of date with proto/fedlora/v1/: "
            "run `python proto/build.py`")


def test_checked_in_modules_are_the_schemas_in_use():
    from fedlora.v1 import trainer_pb2, trainer_pb2_grpc, update_pb2

    assert Path(update_pb2.__file__).resolve() == (GENERATED / "update_pb2.py").resolve()
    names = set(update_pb2.DESCRIPTOR.message_types_by_name)
    assert {"AdapterPayload", "Tensor", "Values", "Sparse"} <= names
    assert update_pb2.DESCRIPTOR.package == "fedlora.v1"
    service = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]
    assert service.full_name == "fedlora.v1.Trainer"
    assert sorted(m.name for m in service.methods) == ["Evaluate", "Train"]
    download = trainer_pb2.TaskRequest.DESCRIPTOR.fields_by_name["download"]
    assert download.message_type is update_pb2.AdapterPayload.DESCRIPTOR  # the same schema
    assert hasattr(trainer_pb2_grpc, "TrainerStub")
