"""Regenerate the Python stubs from proto/ (python proto/generate.py [OUT_DIR]).

The stubs, and a copy of the .proto files they came from, are committed into the client
distribution (pyclient/loraserve/v1/), so an installed wheel needs no protoc;
tests/test_stubs.py regenerates into a temp dir and fails on drift. Only loraserve's own
protos are compiled: the vendored google/rpc ones are for other languages, Python has them
from googleapis-common-protos (a dependency of grpcio-status).
"""

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
OUT = REPO_ROOT / "pyclient"


def sources() -> list[Path]:
    return sorted((PROTO_ROOT / "loraserve").rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(s) for s in sources()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    for source in sources():
        shutil.copyfile(source, out_dir / source.relative_to(PROTO_ROOT))
    return sorted(p for p in (out_dir / "loraserve").rglob("*") if p.suffix in (".py", ".pyi", ".proto"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
