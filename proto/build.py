"""Generate fedlora/v1/update_pb2.py from proto/fedlora/v1/update.proto.

Run from anywhere: ``python proto/build.py [OUT_DIR]`` (default: the repository
root, so the module lands at fedlora/v1/update_pb2.py). grpcio-tools is pinned
in pyproject.toml's dev extra so that the output is reproducible.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SCHEMA = PROTO_ROOT / "fedlora" / "v1" / "update.proto"


def build(out_dir: Path) -> Path:
    """Write the generated module under ``out_dir`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}",
                        f"--python_out={out_dir}", str(SCHEMA)])
    if code != 0:
        raise SystemExit(f"protoc failed on {SCHEMA} (exit {code})")
    return out_dir / "fedlora" / "v1" / "update_pb2.py"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    print(build(target))
