"""Generate fedlora/v1/*_pb2.py (and the gRPC stubs of trainer.proto) from
proto/fedlora/v1/*.proto.

Run from anywhere: ``python proto/build.py [OUT_DIR]`` (default: the repository
root, so the modules land in fedlora/v1/). grpcio-tools is pinned in
pyproject.toml's dev extra so that the output is reproducible.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SCHEMAS = sorted((PROTO_ROOT / "fedlora" / "v1").glob("*.proto"))
SERVICES = [PROTO_ROOT / "fedlora" / "v1" / "trainer.proto"]  # also get *_pb2_grpc.py


def build(out_dir: Path) -> list[Path]:
    """Write the generated modules under ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for schema in SCHEMAS:
        grpc = [f"--grpc_python_out={out_dir}"] if schema in SERVICES else []
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}",
                            f"--python_out={out_dir}", *grpc, str(schema)])
        if code != 0:
            raise SystemExit(f"protoc failed on {schema} (exit {code})")
    return sorted((out_dir / "fedlora" / "v1").glob("*_pb2*.py"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    for path in build(target):
        print(path)
