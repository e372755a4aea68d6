"""The real server process driven by the real grpcurl binary, through server reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess, spawn_server

pytestmark = pytest.mark.slow


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(ROOT / ".tools" / "bin" / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl is missing: run `make tools` (make test does it for you)")
    return found


def grpcurl(address: str, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [grpcurl_binary(), "-plaintext"]
    if data is not None:
        command += ["-d", data]
    return subprocess.run(
        [*command, address, *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture
def process(tmp_path: Path, server_processes: list[ServerProcess]) -> ServerProcess:
    proc = spawn_server(tmp_path / "grpcurl.db", TASKRING_LOCAL_TOKEN_DELAY_S="0.005")
    server_processes.append(proc)
    return proc


def test_grpcurl_lists_services_through_reflection(process: ServerProcess) -> None:
    """`grpcurl list` needs no proto files: TaskService and Health are there."""
    result = grpcurl(process.address, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "taskring.v1.TaskService" in services
    assert "grpc.health.v1.Health" in services
    described = grpcurl(process.address, "describe", "taskring.v1.TaskService")
    assert (
        "rpc Stream ( .taskring.v1.StreamRequest ) returns ( stream .taskring.v1.StreamResponse )"
        in described.stdout
    )


def test_grpcurl_submit_then_stream_ends_in_succeeded(process: ServerProcess) -> None:
    """Submit returns an id; Stream prints the events of that task ending in SUCCEEDED."""
    body = {
        "task": {
            "chat": {"model": "local-echo", "messages": [{"role": "user", "content": "hi grpcurl"}]}
        }
    }
    submitted = grpcurl(process.address, "taskring.v1.TaskService/Submit", data=json.dumps(body))
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["task"]["id"]
    assert task_id

    streamed = grpcurl(
        process.address, "taskring.v1.TaskService/Stream", data=json.dumps({"task_id": task_id})
    )
    assert streamed.returncode == 0, streamed.stderr
    events = [json.loads(chunk) for chunk in _json_objects(streamed.stdout)]
    last = events[-1]
    final = last.get("stateChanged", last.get("state_changed", {})).get("task") or last["snapshot"]
    assert final["state"] == "TASK_STATE_SUCCEEDED"
    assert final["output"]["chat"]["text"] == "[local-echo] hi grpcurl"


def test_grpcurl_health_check_is_serving(process: ServerProcess) -> None:
    """The Kubernetes-style probe: liveness ("") and readiness (TaskService) are SERVING."""
    for service in ("", "taskring.v1.TaskService"):
        result = grpcurl(
            process.address, "grpc.health.v1.Health/Check", data=json.dumps({"service": service})
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "SERVING"


def test_grpcurl_bad_request_exits_with_invalid_argument(process: ServerProcess) -> None:
    """grpcurl exits 64 + INVALID_ARGUMENT(3) and prints the BadRequest field violation."""
    body = {"task": {"chat": {"model": "local-echo"}}}
    result = grpcurl(process.address, "taskring.v1.TaskService/Submit", data=json.dumps(body))
    assert result.returncode == 64 + 3
    assert "task.chat.messages" in result.stdout + result.stderr
    assert "google.rpc.BadRequest" in result.stdout + result.stderr


def test_grpcurl_submit_batch_answers_each_task(process: ServerProcess) -> None:
    """The README's SubmitBatch: the call succeeds; the good task is stored, the bad one
    is refused naming its own field."""
    chat = {"model": "local-echo", "messages": [{"role": "user", "content": "hi"}]}
    body = {"tasks": [{"chat": chat}, {"chat": {"model": "local-echo"}}]}
    result = grpcurl(process.address, "taskring.v1.TaskService/SubmitBatch", data=json.dumps(body))
    assert result.returncode == 0, result.stderr
    good, bad = json.loads(result.stdout)["results"]
    assert good["task"]["id"]
    assert good["created"] is True
    assert bad["error"]["code"] == 3
    violations = bad["error"].get("fieldViolations", bad["error"].get("field_violations"))
    assert violations[0]["field"] == "tasks[1].chat.messages"


def _json_objects(text: str) -> list[str]:
    """grpcurl prints one pretty JSON object per message; split them."""
    decoder = json.JSONDecoder()
    objects, index = [], 0
    text = text.strip()
    while index < len(text):
        _, end = decoder.raw_decode(text, index)
        objects.append(text[index:end])
        index = end
        while index < len(text) and text[index].isspace():
            index += 1
    return objects
