"""docker-compose.yml and the Prometheus configuration it mounts: valid, and wired to what
the router and the executors really serve."""

from __future__ import annotations

import json
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from server.config import ExecutorSettings, Settings
from tests.conftest import ROOT
from tests.deploy.manifests import (
    DEPLOY,
    EXECUTOR_READINESS,
    ROUTER_READINESS,
    Manifest,
    duration_s,
    load_compose,
    load_yaml,
    port_of,
    promtool,
)

EXECUTORS = ("executor-1", "executor-2", "executor-3")
TASKRING_SERVICES = ("router", *EXECUTORS)
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
METRICS_PORT = 9464


@pytest.fixture(scope="module")
def compose() -> Manifest:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: Manifest) -> dict[str, Manifest]:
    services: dict[str, Manifest] = compose["services"]
    return services


def test_compose_file_follows_the_compose_specification(compose: Manifest) -> None:
    """The official Compose-spec JSON schema (the one `docker compose config` validates
    against, vendored by check-jsonschema) accepts the file: no engine or plugin needed."""
    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert problems == []


def test_stack_has_router_three_executors_prometheus_and_grafana(
    services: dict[str, Manifest],
) -> None:
    """The services the README's compose section promises, and no others."""
    assert set(services) == {*TASKRING_SERVICES, "prometheus", "grafana"}
    for name in TASKRING_SERVICES:
        assert services[name]["build"]["context"] == "."
        assert services[name]["image"] == services["router"]["image"]


def healthcheck_command(service: Manifest) -> tuple[str, str]:
    """(service name, target) of a healthcheck that runs `python -m client.healthcheck`."""
    test = service["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "client.healthcheck"], test
    args = test[4:]
    assert args[0] == "--service"
    return args[1], args[2]


def test_taskring_services_check_readiness_through_the_healthcheck_module(
    services: dict[str, Manifest],
) -> None:
    """Each healthcheck asks the readiness name of its process, on the port it listens on."""
    router = services["router"]
    name, target = healthcheck_command(router)
    assert name == ROUTER_READINESS
    assert port_of(target) == port_of(router["environment"]["TASKRING_LISTEN"])
    for executor in EXECUTORS:
        service = services[executor]
        assert service["command"] == ["taskring-executor"]
        name, target = healthcheck_command(service)
        assert name == EXECUTOR_READINESS
        assert port_of(target) == port_of(service["environment"]["TASKRING_EXECUTOR_LISTEN"])


def test_dependencies_wait_for_healthy_services(services: dict[str, Manifest]) -> None:
    """depends_on waits for a healthcheck that exists; the router waits for all executors."""
    for service in services.values():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}
            assert "test" in services[dependency]["healthcheck"]
    assert set(services["router"]["depends_on"]) == set(EXECUTORS)


def mounted_file(service: Manifest, target: str) -> Path:
    """The repository file a bind mount of `service` puts at `target`."""
    volume: str
    for volume in service["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            assert source.startswith("./"), volume
            return ROOT / source
    raise AssertionError(f"nothing is mounted at {target}")


def test_bind_mounted_files_exist(services: dict[str, Manifest]) -> None:
    """Every ./path a service mounts is in the repository."""
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.partition(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume


def test_router_ring_is_the_three_executors_on_their_grpc_port(
    services: dict[str, Manifest],
) -> None:
    """The router's TASKRING_CONFIG, the file mounted there, loads cleanly with the router's
    whole environment and lists each executor service at the port it listens on."""
    environment = services["router"]["environment"]
    config = mounted_file(services["router"], environment["TASKRING_CONFIG"])
    settings = Settings.from_env({**environment, "TASKRING_CONFIG": str(config)})
    expected = {
        f"{name}:{port_of(services[name]['environment']['TASKRING_EXECUTOR_LISTEN'])}"
        for name in EXECUTORS
    }
    assert {b.address for b in settings.file.backends} == expected


def test_executor_environment_is_accepted(services: dict[str, Manifest]) -> None:
    """Each executor's environment passes the executor's own settings check."""
    for name in EXECUTORS:
        settings = ExecutorSettings.from_env(services[name]["environment"])
        assert settings.listen.startswith("0.0.0.0:")


def test_router_store_is_on_a_named_volume(services: dict[str, Manifest]) -> None:
    """The SQLite file survives `docker compose down` (without -v) and image rebuilds."""
    router = services["router"]
    store = router["environment"]["TASKRING_STORE"].removeprefix("sqlite:///")
    named = [v.split(":") for v in router["volumes"] if not v.startswith(".")]
    assert any(store.startswith(target.rstrip("/") + "/") for _, target, *_ in named)


def test_stop_grace_outlasts_the_graceful_shutdown(services: dict[str, Manifest]) -> None:
    """Docker waits longer than the router's two grace periods (running work, then open
    calls) and the executor's one before it sends SIGKILL."""
    for name, waits in (("router", 2), *((e, 1) for e in EXECUTORS)):
        service = services[name]
        grace = float(service["environment"]["TASKRING_SHUTDOWN_GRACE_S"])
        assert duration_s(service["stop_grace_period"]) > waits * grace


def test_published_ports_stay_on_loopback(services: dict[str, Manifest]) -> None:
    """AdminService has no authentication yet: nothing is published beyond 127.0.0.1."""
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_prometheus_scrapes_the_router_and_executors_on_the_metrics_port(
    services: dict[str, Manifest],
) -> None:
    """Every taskring service is a target at the port its TASKRING_METRICS_LISTEN names,
    and Prometheus reads the file compose mounts."""
    prometheus = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert mounted_file(prometheus, "/etc/prometheus/prometheus.yml") == PROMETHEUS_CONFIG
    config = load_yaml(PROMETHEUS_CONFIG)
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = set()
    for name in TASKRING_SERVICES:
        port = port_of(services[name]["environment"]["TASKRING_METRICS_LISTEN"])
        assert port == METRICS_PORT
        expected.add(f"{name}:{port}")
    assert targets == expected


def test_prometheus_config_passes_promtool() -> None:
    """Prometheus's own checker accepts the configuration."""
    checker = promtool()
    result = subprocess.run(
        [checker, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
