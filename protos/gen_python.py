"""Generates the Python stubs of protos/ into client/_proto (run through `make proto`).

protoc names generated modules after the proto package (`from taskring.v1 import
tasks_pb2`), which would need a top-level `taskring` package. The stubs ship inside the
client package instead, so the module references are rewritten to
`client._proto.taskring.v1`; the descriptors (and so the wire names such as
`/taskring.v1.TaskService/Submit`) are left untouched.

    python protos/gen_python.py [OUT_DIR]    # default: client/_proto
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
BIN = Path(sys.executable).parent
PACKAGE_PREFIX = "client._proto."
# A module reference `taskring.v1.xxx_pb2` (or `from taskring.v1 import`), but not the
# service paths inside strings such as '/taskring.v1.TaskService/Submit'.
MODULE_REF = re.compile(r"(?<![\w./'\"])taskring\.v1(?=\.\w+_pb2\b| import )")


def generate(out_dir: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py(i) for every proto under protos/."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            # The mypy-protobuf plugins live beside the running interpreter, on PATH or not.
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out_dir.exists():
            shutil.rmtree(out_dir / "taskring", ignore_errors=True)
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            dest = out_dir / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(MODULE_REF.sub(PACKAGE_PREFIX + "taskring.v1", src.read_text()))
            written.append(dest)
    for package in {p.parent for p in written} | {out_dir, out_dir / "taskring"}:
        init = package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/ by protos/gen_python.py; do not edit."""\n')
            written.append(init)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client" / "_proto"
    for path in generate(target):
        print(path.relative_to(target.parent) if target.parent in path.parents else path)
