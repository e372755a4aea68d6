"""buf.gen.yaml cannot rot: `buf generate` with it, offline, gives Python stubs that import
and a TypeScript @grpc/grpc-js client that compiles and talks to the real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess, spawn_server
from tests.e2e.nodejs import NODE_MODULES, NODE_PROJECT, node_binary, run_node

pytestmark = pytest.mark.slow

PROTOS = ("admin", "executor", "tasks")
PYTHON_FILES = {
    f"taskring/v1/{proto}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
}
# ts-proto writes the well-known types the protos use beside them.
TS_FILES = {f"taskring/v1/{proto}.ts" for proto in PROTOS} | {
    f"google/protobuf/{wkt}.ts" for wkt in ("duration", "struct", "timestamp")
}
TS_PROTO_PLUGIN = ROOT / ".tools" / "node_modules" / ".bin" / "protoc-gen-ts_proto"


def buf_binary() -> str:
    found = shutil.which("buf") or str(ROOT / ".tools" / "node_modules" / ".bin" / "buf")
    if not Path(found).exists() or not TS_PROTO_PLUGIN.exists():
        pytest.fail("buf or ts-proto is missing: run `make tools` (make test does it for you)")
    return found


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of `buf generate` with the repository's buf.gen.yaml, in a temporary dir."""
    out = tmp_path_factory.mktemp("buf-generate")
    # From the root: buf.gen.yaml names its plugins relative to it (.venv, .tools, protos/).
    result = subprocess.run(
        [buf_binary(), "generate", "--template", "buf.gen.yaml", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out / "gen"


def files_under(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_buf_generate_writes_python_and_typescript_clients(generated: Path) -> None:
    """Every proto gets messages, gRPC stubs and type stubs in Python, and a TS module."""
    assert files_under(generated / "python") == PYTHON_FILES
    assert files_under(generated / "ts") == TS_FILES
    tasks_ts = (generated / "ts" / "taskring" / "v1" / "tasks.ts").read_text()
    assert 'from "@grpc/grpc-js"' in tasks_ts
    assert "export const TaskServiceClient = makeGenericClientConstructor(" in tasks_ts


def test_generated_python_stubs_import_and_serve_every_rpc(generated: Path) -> None:
    """The Python output imports as the `taskring.v1` package, with a stub for each RPC."""
    probe = (
        "import json, grpc\n"
        "from taskring.v1 import tasks_pb2, tasks_pb2_grpc\n"
        "stub = tasks_pb2_grpc.TaskServiceStub(grpc.insecure_channel('127.0.0.1:1'))\n"
        "service = tasks_pb2.DESCRIPTOR.services_by_name['TaskService']\n"
        "request = tasks_pb2.StreamRequest(task_id='t', after_sequence=3)\n"
        "print(json.dumps({'methods': [m.name for m in service.methods],\n"
        "  'stubs': [m.name for m in service.methods if callable(getattr(stub, m.name))],\n"
        "  'wire': request.SerializeToString().hex()}))\n"
    )
    # A fresh interpreter in the output dir: the generated modules, not client/_proto.
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=generated / "python",
        env={**os.environ, "PYTHONPATH": str(generated / "python")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    rpcs = ["Submit", "Get", "Cancel", "Stream", "SubmitAndStream", "SubmitBatch", "List", "Stats"]
    assert found["methods"] == found["stubs"] == rpcs
    assert found["wire"] == "0a01741003"  # field 1 "t", field 2 = 3


def test_generated_typescript_client_compiles_and_streams_a_task(
    generated: Path, tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """tests/node/generated_client.ts, compiled strictly with the generated TS, runs a task."""
    node = node_binary()
    project = tmp_path / "ts-client"
    shutil.copytree(generated / "ts", project / "src")
    shutil.copy(NODE_PROJECT / "generated_client.ts", project / "src")
    # The generated code imports @grpc/grpc-js and @bufbuild/protobuf: tests/node has both.
    (project / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    sources = sorted(str(p) for p in (project / "src").rglob("*.ts"))
    compiled = subprocess.run(
        [
            node, str(NODE_MODULES / "typescript" / "bin" / "tsc"),
            "--strict", "--target", "es2022", "--module", "commonjs", "--esModuleInterop",
            # Only the packages' own .d.ts are skipped; every generated file is checked.
            "--skipLibCheck", "--types", "node",
            "--rootDir", str(project / "src"), "--outDir", str(project / "js"),
            *sources,
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr

    server = spawn_server(tmp_path / "ts.db", TASKRING_LOCAL_TOKEN_DELAY_S="0.005")
    server_processes.append(server)
    message = "hello from generated TypeScript"
    result = run_node(project / "js" / "generated_client.js", server.address, message)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["state"] == "TASK_STATE_SUCCEEDED"
    assert printed["text"] == f"[local-echo] {message}"
