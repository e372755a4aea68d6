"""A Node.js client (@grpc/grpc-js, protos loaded by @grpc/proto-loader) against the real
server process: tests/node/stream_task.js submits a chat task and follows its Stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client import TaskringClient, TaskState
from tests.conftest import ServerProcess, spawn_server
from tests.e2e.nodejs import NODE_PROJECT, run_node

pytestmark = pytest.mark.slow

STREAM_TASK = NODE_PROJECT / "stream_task.js"


def test_node_client_streams_a_chat_task_to_succeeded(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """Node submits, streams the reply to SUCCEEDED and prints what Python's Get returns."""
    # Small but nonzero: the reply streams as deltas, and the test stays well under a second.
    server = spawn_server(tmp_path / "node.db", TASKRING_LOCAL_TOKEN_DELAY_S="0.005")
    server_processes.append(server)
    message = "hello from node, one word at a time"

    result = run_node(STREAM_TASK, server.address, message)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    with TaskringClient(server.address, timeout_s=10) as taskring:
        task = taskring.get(printed["task_id"])
    assert printed["state"] == TaskState.Name(task.state) == "TASK_STATE_SUCCEEDED"
    assert printed["text"] == task.output.chat.text == f"[local-echo] {message}"
    assert printed["events"] >= 1


def test_node_client_exits_nonzero_naming_a_failed_task(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """A task that FAILS makes the Node client exit 1 with the state and the error code."""
    # The reply takes ~0.5 s but every task's deadline is 50 ms after submission: the server
    # fails it with DEADLINE_EXCEEDED, whatever the machine's speed.
    server = spawn_server(
        tmp_path / "node.db",
        TASKRING_LOCAL_TOKEN_DELAY_S="0.05",
        TASKRING_DEFAULT_TIMEOUT_S="0.05",
    )
    server_processes.append(server)

    result = run_node(STREAM_TASK, server.address, "one two three four five six seven")

    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    assert "TASK_STATE_FAILED" in result.stderr
    assert "DEADLINE_EXCEEDED" in result.stderr
