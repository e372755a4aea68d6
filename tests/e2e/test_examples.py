"""examples/summarize.py, registered by configuration, run by a router through a remote
executor process: both load it the same way from the same TOML file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from tests.conftest import (
    ROOT,
    ServerProcess,
    final_task,
    spawn_executor,
    spawn_server,
    wait_terminal,
    watched_text,
)

pytestmark = pytest.mark.slow

TEXT = (
    "Consistent hashing maps keys to servers. "
    "The weather was pleasant that day. "
    "With consistent hashing, adding servers moves few keys. "
    "Lunch was served at noon."
)


def write_config(tmp_path: Path, executor: str = "") -> Path:
    schemas = ROOT / "examples"
    config = f"""
[task_types.summarize]
handler = "examples.summarize:Summarizer"
input_schema_file = "{schemas}/summarize.input.schema.json"
output_schema_file = "{schemas}/summarize.output.schema.json"
options = {{ max_sentences = 2 }}
"""
    if executor:
        config += f"""
[[backends]]
name = "executor-1"
kind = "remote"
address = "{executor}"
task_types = ["summarize", "chat"]
"""
    path = tmp_path / "taskring.toml"
    path.write_text(config)
    return path


def summarize_spec(**data: str | int) -> pb.TaskSpec:
    custom = struct_pb2.Struct()
    custom.update(data)
    return pb.TaskSpec(type="summarize", custom=custom)


async def test_summarize_runs_on_a_remote_executor(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    executor = spawn_executor(TASKRING_CONFIG=str(write_config(tmp_path)))
    server_processes.append(executor)
    router = spawn_server(
        tmp_path / "tasks.db", TASKRING_CONFIG=str(write_config(tmp_path, executor.address))
    )
    server_processes.append(router)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        task = (await stub.Submit(pb.SubmitRequest(task=summarize_spec(text=TEXT)))).task
        events = [e async for e in stub.Stream(pb.StreamRequest(task_id=task.id))]
        final = final_task(events)
        assert final.state == pb.TASK_STATE_SUCCEEDED, final.error
        assert final.backend == "executor-1"
        output = final.output.custom
        assert output["summary"] == (
            "Consistent hashing maps keys to servers. "
            "With consistent hashing, adding servers moves few keys."
        )
        assert json_format.MessageToDict(output)["sentences"] == [0, 2]
        assert "Consistent hashing maps keys to servers." in watched_text(events)

        # Input that breaks the schema never becomes a task: Submit names the field.
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await stub.Submit(pb.SubmitRequest(task=summarize_spec(text="", max_sentences=0)))
        assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(rejected.value)
        assert status is not None
        bad_request = error_details_pb2.BadRequest()
        status.details[0].Unpack(bad_request)
        fields = {v.field for v in bad_request.field_violations}
        assert fields == {"task.custom.text", "task.custom.max_sentences"}
        listed = await stub.List(pb.ListRequest())
        assert [t.id for t in listed.tasks] == [task.id]

        # The router's other types still run on the same executor.
        chat = pb.TaskSpec(
            chat=pb.ChatInput(
                model="local-echo", messages=[pb.ChatMessage(role="user", content="hi")]
            )
        )
        chat_task = (await stub.Submit(pb.SubmitRequest(task=chat))).task
        assert (await wait_terminal(stub, chat_task.id)).output.chat.text == "[local-echo] hi"


@pytest.mark.parametrize("module", ["server", "server.executor"])
def test_a_bad_handler_reference_stops_the_start(tmp_path: Path, module: str) -> None:
    """Router and executor refuse to start, exit 2, and say which setting to fix."""
    config = tmp_path / "taskring.toml"
    config.write_text('[task_types.broken]\nhandler = "examples.summarize:nothing_here"\n')
    env = {
        **os.environ,
        "TASKRING_CONFIG": str(config),
        "TASKRING_STORE": f"sqlite:///{tmp_path / 'tasks.db'}",
        "TASKRING_LISTEN": "127.0.0.1:0",
        "TASKRING_EXECUTOR_LISTEN": "127.0.0.1:0",
    }
    done = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "task_types.broken.handler" in done.stderr
    assert "nothing_here" in done.stderr
