"""docker-compose.yml and the Prometheus configuration it mounts: valid, and wired to what
the router, the executors and PostgreSQL really serve."""

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
    k8s_object,
    k8s_objects,
    load_compose,
    load_yaml,
    only_container,
    port_of,
    postgres_url,
    promtool,
)

EXECUTORS = ("executor-1", "executor-2", "executor-3")
TASKRING_SERVICES = ("router", *EXECUTORS)
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
METRICS_PORT = 9464
POSTGRES = "postgres"
POSTGRES_PORT = 5432
# Where the official image keeps its data, unless PGDATA says otherwise.
POSTGRES_DATA = "/var/lib/postgresql/data"


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


def test_stack_has_router_three_executors_postgres_prometheus_and_grafana(
    services: dict[str, Manifest],
) -> None:
    """The services the README's compose section promises, and no others."""
    assert set(services) == {*TASKRING_SERVICES, POSTGRES, "prometheus", "grafana"}
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
    """depends_on waits for a healthcheck that exists; the router waits for its store and
    all executors."""
    for service in services.values():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}
            assert "test" in services[dependency]["healthcheck"]
    assert set(services["router"]["depends_on"]) == {POSTGRES, *EXECUTORS}


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


def test_router_store_is_the_postgres_service(services: dict[str, Manifest]) -> None:
    """TASKRING_STORE names the postgres service on its port, with the account and database
    the image creates from its POSTGRES_* variables, and the router accepts it."""
    environment = services["router"]["environment"]
    url = postgres_url(environment["TASKRING_STORE"])
    assert (url.hostname, url.port) == (POSTGRES, POSTGRES_PORT)
    postgres = services[POSTGRES]["environment"]
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"]
    assert "ports" not in services[POSTGRES]  # only the router talks to it
    # The whole environment, TASKRING_CONFIG aside (a path inside the container).
    without_config = {k: v for k, v in environment.items() if k != "TASKRING_CONFIG"}
    assert Settings.from_env(without_config).store.is_postgresql


def test_router_keeps_nothing_on_a_volume(compose: Manifest, services: dict[str, Manifest]) -> None:
    """The store is PostgreSQL's: the router mounts its configuration alone, and no SQLite
    volume is left in the file."""
    router = services["router"]
    assert [v for v in router.get("volumes", []) if not v.startswith("./")] == []
    assert "sqlite" not in str(router["environment"]).lower()
    assert "router-data" not in compose.get("volumes", {})


def test_postgres_data_is_on_a_named_volume(
    compose: Manifest, services: dict[str, Manifest]
) -> None:
    """The database survives `docker compose down` (without -v) and image upgrades."""
    postgres = services[POSTGRES]
    data = postgres["environment"].get("PGDATA", POSTGRES_DATA)
    named = [v.split(":") for v in postgres["volumes"] if not v.startswith(".")]
    assert [source for source, target, *_ in named if data.startswith(target)] == ["postgres-data"]
    assert "postgres-data" in compose["volumes"]


def test_postgres_is_healthy_once_it_accepts_tcp_connections(
    services: dict[str, Manifest],
) -> None:
    """pg_isready over TCP for the router's account and database: the image's temporary
    server (while it initialises a new database) listens on the Unix socket alone, so a
    socket check would let the router start too early."""
    postgres = services[POSTGRES]
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"], test
    args = dict(zip(test[2::2], test[3::2], strict=True))
    environment = postgres["environment"]
    assert args == {
        "-h": "127.0.0.1",
        "-U": environment["POSTGRES_USER"],
        "-d": environment["POSTGRES_DB"],
    }


def test_postgres_is_the_image_kubernetes_runs(services: dict[str, Manifest]) -> None:
    """One PostgreSQL version for the local stack and the development cluster."""
    postgres = k8s_object(k8s_objects(), "StatefulSet", "taskring-postgres")
    assert services[POSTGRES]["image"] == only_container(postgres)["image"]


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


def test_published_host_ports_do_not_clash(services: dict[str, Manifest]) -> None:
    """Each host port is published once: by one service, and one replica of it (a scaled
    service could not bind its fixed host port twice)."""
    published: list[str] = []
    for service in services.values():
        replicas = service.get("deploy", {}).get("replicas", 1)
        for port in service.get("ports", []):
            host, _, _ = port.rpartition(":")
            published += [host] * replicas
    assert len(published) == len(set(published)), published


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
