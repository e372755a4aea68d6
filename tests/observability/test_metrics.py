"""Prometheus metrics: a real Prometheus scrapes a real router and answers PromQL; the
exposition itself (labels bounded, no secret, gauges read at scrape time); the endpoint;
the setting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from server.backends.base import BackendError, BackendEvent, Completed, OutputChunk
from server.backends.local import LocalBackend
from server.clock import ManualClock
from server.config import ConfigError, ExecutorSettings, Settings
from server.config_file import read_file_config
from server.dispatch.circuit import CircuitSettings
from server.dispatch.members import Members
from server.executor.app import ExecutorApp
from server.model.errors import StoreError
from server.model.task import (
    ChatInput,
    CustomOutput,
    Priority,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
    Usage,
)
from server.observability.metrics import (
    MAX_LABEL_VALUES,
    OTHER,
    UNKNOWN_TYPE,
    MetricsEndpoint,
    PrometheusMetrics,
    Sources,
)
from tests.api.test_dispatch import Gate, custom_spec
from tests.conftest import (
    FAST_RETRY,
    StartServer,
    chat_spec,
    local_backends,
    make_settings,
    submit,
    unused_port,
    wait_terminal,
)
from tests.fakes import Fail, FakeOpenAI

Samples = dict[tuple[tuple[str, str], ...], float]

# --------------------------------------------------------------------------- helpers


def samples(exposition: bytes | str, name: str) -> Samples:
    """The samples called `name` in a text exposition, by their sorted labels."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def labels(**pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs.items()))


def http_get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    """Blocking (run it in a thread): status, content type and body."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def scrape(port: int) -> str:
    status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


async def refuse(task: Task) -> AsyncIterator[BackendEvent]:
    """A custom type whose model always refuses: a non-retryable failure."""
    if task.attempt:  # always; the yield below makes this an async generator
        raise BackendError("MODEL_REFUSED", "the model refused the prompt", retryable=False)
    yield OutputChunk("never")


# --------------------------------------------------------------- a real Prometheus


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    async def query(self, promql: str) -> Samples:
        """An instant query through the HTTP API; labels without job and instance."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        status, _, body = await asyncio.to_thread(http_get, url)
        answer: dict[str, Any] = json.loads(body)
        assert status == 200, answer
        assert answer["status"] == "success", answer
        return {
            tuple(
                sorted(
                    (k, v)
                    for k, v in r["metric"].items()
                    if k not in {"job", "instance", "__name__"}
                )
            ): float(r["value"][1])
            for r in answer["data"]["result"]
        }


PROMETHEUS_CONFIG = """
global:
  scrape_interval: 250ms
  scrape_timeout: 200ms
scrape_configs:
  - job_name: taskring
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def spawn_prometheus(
    binary: str, config: Path, tsdb: Path, address: str, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tsdb}",
                f"--web.listen-address={address}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Callable[[int], Awaitable[Prometheus]]]:
    """`await prometheus(metrics_port)`: a Prometheus on a free loopback port scraping that
    port every 250 ms; stopped (SIGTERM, then SIGKILL) at the end."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the `prometheus` binary is not on PATH: install the Debian package "
            "(apt-get install prometheus), as .ci/run does; this test needs a real one"
        )
    started: list[Prometheus] = []

    async def start(metrics_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.format(port=metrics_port))
        log = tmp_path / "prometheus.log"
        address = f"127.0.0.1:{unused_port()}"
        process = spawn_prometheus(binary, config, tmp_path / "tsdb", address, log)
        server = Prometheus(f"http://{address}", process, log)
        started.append(server)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30.0
        while loop.time() < give_up:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError):
                status, _, _ = await asyncio.to_thread(http_get, f"{server.url}/-/ready")
                if status == 200:
                    return server
            await asyncio.sleep(0.1)
        pytest.fail(f"prometheus was not ready within 30s:\n{log.read_text()}")

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=10)


async def until_equal(
    prom: Prometheus, expected: dict[str, Samples], timeout_s: float = 30.0
) -> None:
    """Queries each PromQL expression until all give the expected samples."""
    seen: dict[str, Samples] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                seen = {promql: await prom.query(promql) for promql in expected}
                if seen == expected:
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(
            f"Prometheus did not report the expected values within {timeout_s}s:\n"
            f"  expected {expected}\n  last seen {seen}\n"
            f"prometheus log:\n{prom.log.read_text()}"
        )


@pytest.mark.slow
async def test_prometheus_scrapes_the_counters_of_a_few_tasks(
    start_server: StartServer, prometheus: Callable[[int], Awaitable[Prometheus]]
) -> None:
    """Three chat tasks succeed, one custom task fails, one Submit is refused: a real
    Prometheus scraping the metrics port answers PromQL with exactly those counts."""
    server = await start_server(local_backends(count=2, extra={"refuse": refuse}))
    assert server.app.metrics_port > 0
    prom = await prometheus(server.app.metrics_port)
    for i in range(3):
        task = await submit(server.stub, chat_spec(f"hello {i}"))
        assert (await wait_terminal(server.stub, task.id)).state == pb.TASK_STATE_SUCCEEDED
    refused = await submit(server.stub, custom_spec("refuse"))
    final = await wait_terminal(server.stub, refused.id)
    assert final.state == pb.TASK_STATE_FAILED
    assert final.error.code == "MODEL_REFUSED"
    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await submit(server.stub, pb.TaskSpec(chat=pb.ChatInput(model="")))  # no model
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    await until_equal(
        prom,
        {
            'up{job="taskring"}': {(): 1.0},
            # A (type, backend) that ran starts both outcomes' series (at 0): rates work.
            "sum by (task_type) (task_executions_success_total)": {
                labels(task_type="chat"): 3.0,
                labels(task_type="refuse"): 0.0,
            },
            "sum by (task_type, error) (task_executions_failure_total)": {
                labels(task_type="refuse", error="MODEL_REFUSED"): 1.0
            },
            "sum by (task_type) (task_execution_duration_seconds_count)": {
                labels(task_type="chat"): 3.0,
                labels(task_type="refuse"): 1.0,
            },
            "sum by (task_type) (taskring_submit_requests_total)": {
                labels(task_type="chat"): 4.0,  # the refused one asked for chat too
                labels(task_type="refuse"): 1.0,
            },
            "taskring_submit_rejections_total": {labels(reason="INVALID_ARGUMENT"): 1.0},
            "sum(task_executions_active)": {(): 0.0},
            "sum(taskring_queue_depth)": {(): 0.0},
            "taskring_stream_watchers": {(): 0.0},
            "taskring_ring_members": {
                labels(task_type=t): 2.0 for t in ("chat", "embed", "refuse")
            },
            "taskring_backend_healthy": {
                labels(backend="local-1"): 1.0,
                labels(backend="local-2"): 1.0,
            },
            "taskring_backend_circuit_state": {
                labels(backend="local-1"): 0.0,
                labels(backend="local-2"): 0.0,
            },
            # "[local-echo] hello N": three words each.
            'taskring_provider_tokens_total{direction="output"}': {
                labels(model="local-echo", direction="output"): 9.0
            },
        },
    )


# ------------------------------------------------- the exposition, through the endpoint


async def test_gauges_are_read_when_scraped(start_server: StartServer) -> None:
    """A busy slot, two queued tasks and a watcher show in the gauges of the next scrape."""
    gate = Gate()
    server = await start_server(local_backends(count=1, max_concurrency=1, extra={"gate": gate}))
    running = await submit(server.stub, custom_spec("gate"))
    await asyncio.wait_for(gate.started.wait(), 5)
    await submit(server.stub, custom_spec("gate", priority=pb.PRIORITY_HIGH))
    await submit(server.stub, custom_spec("gate", priority=pb.PRIORITY_LOW))
    watch = server.stub.Stream(pb.StreamRequest(task_id=running.id))
    await watch.read()  # the snapshot: the watch is open

    text = await scrape(server.app.metrics_port)
    assert (
        samples(text, "task_executions_active")[labels(task_type="gate", backend="local-1")] == 1.0
    )
    assert (
        samples(text, "task_executions_active")[labels(task_type="chat", backend="local-1")] == 0.0
    )
    assert samples(text, "taskring_queue_depth") == {
        labels(priority="low"): 1.0,
        labels(priority="normal"): 0.0,
        labels(priority="high"): 1.0,
        labels(priority="urgent"): 0.0,
    }
    assert samples(text, "taskring_stream_watchers") == {(): 1.0}
    watch.cancel()
    gate.opened.set()


async def test_usage_and_failures_of_providers_never_show_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenAI member with an API key: tokens and cost by model after a success, the
    error code after the provider rejected the key (echoing it), and the key nowhere."""
    secret = "sk-test-metrics-0123456789abcdefghijklmnopqrstuvwxyz"
    monkeypatch.setenv("TEST_METRICS_KEY", secret)
    async with FakeOpenAI() as fake:
        config = tmp_path / "taskring.toml"
        config.write_text(
            f'[[backends]]\nname = "vllm"\nkind = "openai"\nbase_url = "{fake.base_url}"\n'
            'api_key_env = "TEST_METRICS_KEY"\ntask_types = ["chat"]\n'
            '[prices."fake-model"]\ninput = 1.0\noutput = 2.0\n'
        )
        file, problems = read_file_config(config)
        assert problems == []
        base = make_settings(tmp_path / "tasks.db")
        app = App(
            Settings(base.server, base.store, base.local, base.tasks, file), dispatch=FAST_RETRY
        )
        await app.start()
        channel = grpc.aio.insecure_channel(app.address)
        try:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            spec = chat_spec("one two three")
            spec.chat.model = "fake-model"
            ok = await wait_terminal(stub, (await submit(stub, spec)).id)
            assert ok.state == pb.TASK_STATE_SUCCEEDED
            fake.default = Fail(401, "Incorrect API key provided: {api_key}")
            failed = await wait_terminal(stub, (await submit(stub, spec)).id)
            assert failed.error.code == "BACKEND_AUTH_FAILED"
            text = await scrape(app.metrics_port)
        finally:
            await channel.close()
            await app.stop()
    assert secret not in text
    assert secret[:16] not in text
    tokens = samples(text, "taskring_provider_tokens_total")
    assert tokens[labels(model="fake-model", direction="input")] == ok.usage.input_tokens
    assert tokens[labels(model="fake-model", direction="output")] == ok.usage.output_tokens
    cost = samples(text, "taskring_provider_cost_total")[labels(model="fake-model")]
    assert cost == pytest.approx(ok.usage.cost_usd)
    failures = samples(text, "task_executions_failure_total")
    assert failures == {labels(task_type="chat", backend="vllm", error="BACKEND_AUTH_FAILED"): 1.0}


async def test_the_executor_serves_its_executions() -> None:
    """An executor process exports the executions it ran (and no router-only gauges)."""

    async def hello(task: Task) -> AsyncIterator[BackendEvent]:
        yield Completed(CustomOutput({}))

    settings = ExecutorSettings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    async with ExecutorApp(settings, handlers={"hello": hello}) as executor:
        assert executor.metrics_port > 0
        text = await scrape(executor.metrics_port)
        active = samples(text, "task_executions_active")
        assert active == {labels(task_type="hello", backend="executor"): 0.0}
        assert "taskring_queue_depth" not in text
        assert "taskring_ring_members" not in text
    with pytest.raises(urllib.error.URLError, match="refused"):  # the port closed with the executor
        await asyncio.to_thread(http_get, f"http://127.0.0.1:{executor.metrics_port}/metrics")


# -------------------------------------------------------------- the registry, directly


def task_ended(
    state: TaskState, task_type: str = "chat", model: str = "m", error: str = ""
) -> Task:
    return Task(
        id="t-1",
        client_id="client-secret-id",
        spec=TaskSpec(type=task_type, input=ChatInput(model=model, messages=())),
        state=state,
        created_at=0.0,
        deadline=60.0,
        backend="local-1",
        usage=Usage(3, 5, 0.25) if state is TaskState.SUCCEEDED else None,
        error=TaskError(error, "boom") if error else None,
    )


def test_attempts_count_by_type_backend_and_error() -> None:
    metrics = PrometheusMetrics()
    metrics.attempt_ended(task_ended(TaskState.SUCCEEDED), 0.2)
    metrics.attempt_ended(task_ended(TaskState.SUCCEEDED), 0.3)
    metrics.attempt_ended(task_ended(TaskState.QUEUED, error="BACKEND_UNAVAILABLE"), 1.5)
    metrics.attempt_ended(task_ended(TaskState.CANCELLED, error="CANCELLED"), 0.01)
    text = generate_latest(metrics.registry)
    chat = labels(task_type="chat", backend="local-1")
    assert samples(text, "task_executions_success_total") == {chat: 2.0}
    assert samples(text, "task_executions_failure_total") == {
        labels(task_type="chat", backend="local-1", error="BACKEND_UNAVAILABLE"): 1.0,
        labels(task_type="chat", backend="local-1", error="CANCELLED"): 1.0,
    }
    assert samples(text, "task_execution_duration_seconds_count") == {chat: 4.0}
    assert samples(text, "task_execution_duration_seconds_sum")[chat] == pytest.approx(2.01)
    buckets = samples(text, "task_execution_duration_seconds_bucket")
    assert buckets[(("backend", "local-1"), ("le", "0.01"), ("task_type", "chat"))] == 1.0
    assert buckets[(("backend", "local-1"), ("le", "600.0"), ("task_type", "chat"))] == 4.0
    assert samples(text, "taskring_provider_tokens_total") == {
        labels(model="m", direction="input"): 6.0,
        labels(model="m", direction="output"): 10.0,
    }
    assert samples(text, "taskring_provider_cost_total") == {labels(model="m"): 0.5}
    assert b"t-1" not in text
    assert b"client-secret-id" not in text


def test_labels_chosen_by_clients_and_handlers_stay_bounded() -> None:
    """Thousands of distinct models, error codes and asked-for types make a bounded number
    of series: the first MAX_LABEL_VALUES, then "other" (and "unknown" for types)."""
    metrics = PrometheusMetrics(known_types=lambda: {"chat"})
    for i in range(1000):
        metrics.attempt_ended(task_ended(TaskState.SUCCEEDED, model=f"model-{i}"), 0.1)
        metrics.attempt_ended(task_ended(TaskState.FAILED, error=f"CODE_{i}"), 0.1)
        metrics.submit_rejected(f"type-{i}", "INVALID_ARGUMENT")
    metrics.attempt_ended(task_ended(TaskState.FAILED, error="bad label\n{}"), 0.1)
    metrics.submit_accepted("chat")
    text = generate_latest(metrics.registry)
    models = {dict(k)["model"] for k in samples(text, "taskring_provider_cost_total")}
    assert len(models) == MAX_LABEL_VALUES + 1
    assert OTHER in models
    errors = samples(text, "task_executions_failure_total")
    assert len(errors) == MAX_LABEL_VALUES + 1
    assert errors[labels(task_type="chat", backend="local-1", error=OTHER)] == 1000 - 50 + 1
    assert samples(text, "taskring_submit_requests_total") == {
        labels(task_type=UNKNOWN_TYPE): 1000.0,
        labels(task_type="chat"): 1.0,
    }
    assert samples(text, "taskring_submit_rejections_total") == {
        labels(reason="INVALID_ARGUMENT"): 1000.0
    }


async def test_member_gauges_follow_health_and_circuits() -> None:
    """Circuit states are encoded 0 closed, 1 half-open, 2 open; health is 1 or 0."""
    clock = ManualClock()

    async def noop(task: Task) -> AsyncIterator[BackendEvent]:
        yield Completed(CustomOutput({}))

    members = Members(
        [(LocalBackend(name, {"x": noop}, 4), 1) for name in ("a", "b", "c")],
        load_factor=None,
        clock=clock,
        circuit=CircuitSettings(failure_threshold=2, reset_timeout_s=30.0),
    )
    metrics = PrometheusMetrics()
    metrics.read_from(Sources(active=dict, members=members.views))
    for _ in range(2):
        members.failed("b", None)  # timeouts: the backend's fault
        members.failed("c", None)
    clock.advance(31.0)  # c's circuit half-opens
    members.failed("b", None)  # b's half-open trial fails: open again
    members._health_changed("a", False)  # as a health watch would
    text = generate_latest(metrics.registry)
    assert samples(text, "taskring_backend_circuit_state")[labels(backend="a")] == 0.0
    assert samples(text, "taskring_backend_circuit_state")[labels(backend="b")] == 2.0
    assert samples(text, "taskring_backend_circuit_state")[labels(backend="c")] == 1.0
    assert samples(text, "taskring_backend_healthy") == {
        labels(backend="a"): 0.0,
        labels(backend="b"): 1.0,
        labels(backend="c"): 1.0,
    }
    assert samples(text, "taskring_ring_members") == {labels(task_type="x"): 3.0}
    await members.close()


async def test_queue_depth_is_absent_while_the_store_fails() -> None:
    """A failed count leaves the gauge without samples rather than stale."""
    depth = {Priority.HIGH: 2}

    async def count() -> dict[Priority, int]:
        if not depth:
            raise StoreError("disk on fire")
        return depth

    metrics = PrometheusMetrics()
    metrics.read_from(Sources(active=dict, queue_depth=count))
    await metrics.refresh()
    assert (
        samples(generate_latest(metrics.registry), "taskring_queue_depth")[labels(priority="high")]
        == 2.0
    )
    depth.clear()
    await metrics.refresh()
    assert samples(generate_latest(metrics.registry), "taskring_queue_depth") == {}


# ------------------------------------------------------------------- the endpoint


async def test_endpoint_answers_get_only_at_its_path_and_closes_on_stop() -> None:
    endpoint = MetricsEndpoint(PrometheusMetrics(), "127.0.0.1:0")
    await endpoint.start()
    url = f"http://127.0.0.1:{endpoint.port}"
    try:
        status, content_type, body = await asyncio.to_thread(http_get, f"{url}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        assert b"# TYPE task_executions_success_total counter" in body
        assert (await asyncio.to_thread(http_get, f"{url}/metrics", "HEAD"))[2] == b""
        assert (await asyncio.to_thread(http_get, f"{url}/other"))[0] == 404
        assert (await asyncio.to_thread(http_get, f"{url}/metrics", "POST"))[0] == 405
        # Not HTTP at all: the connection is dropped, the endpoint keeps serving.
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"\x00" * 100_000)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert (await asyncio.to_thread(http_get, f"{url}/metrics"))[0] == 200
    finally:
        await endpoint.stop()
    with pytest.raises(urllib.error.URLError, match="refused"):
        await asyncio.to_thread(http_get, f"{url}/metrics")


async def test_a_busy_metrics_port_stops_the_start_with_a_clear_message() -> None:
    first = MetricsEndpoint(PrometheusMetrics(), "127.0.0.1:0")
    await first.start()
    try:
        second = MetricsEndpoint(PrometheusMetrics(), f"127.0.0.1:{first.port}")
        with pytest.raises(RuntimeError, match="TASKRING_METRICS_LISTEN"):
            await second.start()
    finally:
        await first.stop()


async def test_two_apps_in_one_process_keep_their_own_registries(tmp_path: Path) -> None:
    one = App(make_settings(tmp_path / "one.db"), backends=local_backends())
    two = App(make_settings(tmp_path / "two.db"), backends=local_backends())
    assert isinstance(one.metrics, PrometheusMetrics)
    assert isinstance(two.metrics, PrometheusMetrics)
    one.metrics.submit_accepted("chat")
    assert samples(generate_latest(two.metrics.registry), "taskring_submit_requests_total") == {}


# -------------------------------------------------------------------- the setting


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "127.0.0.1:9464"),
        ("0.0.0.0:9464", "0.0.0.0:9464"),
        ("[::1]:9100", "[::1]:9100"),
        ("off", ""),
        ("OFF", ""),
        ("", ""),
    ],
)
def test_metrics_listen_setting(value: str | None, expected: str) -> None:
    env = {} if value is None else {"TASKRING_METRICS_LISTEN": value}
    assert Settings.from_env(env).server.metrics_listen == expected
    if value is not None:
        assert ExecutorSettings.from_env(env).metrics_listen == expected


def test_an_executor_beside_the_router_does_not_take_its_metrics_port() -> None:
    """`make run` and a `taskring-executor` on one host both start with their defaults."""
    router = Settings.from_env({}).server.metrics_listen
    executor = ExecutorSettings.from_env({}).metrics_listen
    assert (router, executor) == ("127.0.0.1:9464", "127.0.0.1:9465")


def test_a_bad_metrics_listen_is_refused() -> None:
    with pytest.raises(ConfigError, match="TASKRING_METRICS_LISTEN='9464'"):
        Settings.from_env({"TASKRING_METRICS_LISTEN": "9464"})


async def test_metrics_off_records_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "tasks.db")
    off = Settings.from_env({"TASKRING_METRICS_LISTEN": "off"}).server.metrics_listen
    app = App(
        replace(settings, server=replace(settings.server, metrics_listen=off)),
        backends=local_backends(),
    )
    assert app.metrics_endpoint is None
    assert not isinstance(app.metrics, PrometheusMetrics)
