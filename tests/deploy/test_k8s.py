"""The Kubernetes manifests in deploy/k8s: parsed, and checked against what the processes
really serve (ports, health names, shutdown grace) and against each other."""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml

from server.api.server import READINESS_SERVICE
from server.config import ExecutorSettings, Settings
from server.config_file import REMOTE
from server.executor.app import EXECUTOR_SERVICE
from tests.deploy.manifests import (
    APPLIED_BY_HAND,
    EXECUTOR_READINESS,
    K8S,
    KUSTOMIZATION,
    POSTGRES_MANIFEST,
    ROUTER_READINESS,
    Manifest,
    configmap_file,
    container_env,
    container_port,
    container_secret_refs,
    k8s_manifest_files,
    k8s_object,
    k8s_objects,
    load_yaml,
    only_container,
    port_of,
    postgres_url,
    secret_data,
    workloads,
)

ROUTER = "taskring-router"
EXECUTOR = "taskring-executor"
POSTGRES = "taskring-postgres"
# The Secret whose `url` is the router's TASKRING_STORE (postgres.yaml for a development
# cluster; in production, the one thing replaced).
STORE_SECRET = "taskring-store"
# The image's USER (Dockerfile); the pods must run as the same id to own their volumes.
IMAGE_UID = 10001
# PostgreSQL's defaults, which the development server keeps: max_connections, of which
# superuser_reserved_connections are not for the router.
POSTGRES_MAX_CONNECTIONS = 100
POSTGRES_RESERVED_CONNECTIONS = 3


@pytest.fixture(scope="module")
def objects() -> list[Manifest]:
    return k8s_objects()


@pytest.fixture(scope="module")
def router(objects: list[Manifest]) -> Manifest:
    return k8s_object(objects, "Deployment", ROUTER)


@pytest.fixture(scope="module")
def executors(objects: list[Manifest]) -> Manifest:
    return k8s_object(objects, "StatefulSet", EXECUTOR)


@pytest.fixture(scope="module")
def postgres(objects: list[Manifest]) -> Manifest:
    return k8s_object(objects, "StatefulSet", POSTGRES)


@pytest.fixture(scope="module")
def store_secret(objects: list[Manifest]) -> dict[str, str]:
    return secret_data(objects, STORE_SECRET)


def test_every_manifest_parses_into_named_objects(objects: list[Manifest]) -> None:
    """Each YAML document is a Kubernetes object with an apiVersion, a kind and a name."""
    kinds = set()
    for manifest in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(manifest), manifest
        assert manifest["metadata"]["name"]
        kinds.add(manifest["kind"])
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
    } <= kinds


def test_kustomization_applies_every_manifest_but_the_hand_applied_ones() -> None:
    """`kubectl apply -k` creates everything, yet never overwrites real keys or the real
    database's URL with placeholders: the Secrets' files (and the development PostgreSQL
    that shares one) are applied by hand."""
    kustomization = load_yaml(KUSTOMIZATION)
    expected = {p.name for p in k8s_manifest_files()} - {p.name for p in APPLIED_BY_HAND}
    assert set(kustomization["resources"]) == expected


def test_hand_applied_manifests_name_the_namespace() -> None:
    """`kubectl apply -f` puts them where kustomization.yaml puts everything else."""
    namespace = load_yaml(KUSTOMIZATION)["namespace"]
    for path in APPLIED_BY_HAND:
        with path.open(encoding="utf-8") as file:
            docs = [d for d in yaml.safe_load_all(file) if d is not None]
        assert docs, path.name
        assert {d["metadata"].get("namespace") for d in docs} == {namespace}, path.name


def test_kubectl_kustomize_builds_the_directory() -> None:
    """kubectl's own kustomize accepts the directory and puts everything in one namespace."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is missing: .ci/run installs it (kubernetes-client)"
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=30, check=False
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d is not None]
    namespace = load_yaml(KUSTOMIZATION)["namespace"]
    assert all(
        d["metadata"].get("namespace") == namespace for d in docs if d["kind"] != "Namespace"
    )


def test_kubectl_kustomize_builds_the_hand_applied_manifests_too(tmp_path: Path) -> None:
    """The files kept out of kustomization.yaml are well-formed for kubectl as well: a
    kustomization of every manifest builds, each object once."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is missing: .ci/run installs it (kubernetes-client)"
    files = k8s_manifest_files()
    for path in files:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [p.name for p in files],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d is not None]
    assert len(docs) == len(k8s_objects())


def test_readiness_names_are_the_ones_the_servers_register() -> None:
    """The probes below ask for names the router and executor really set SERVING."""
    assert READINESS_SERVICE == ROUTER_READINESS
    assert EXECUTOR_SERVICE == EXECUTOR_READINESS


def test_router_probes_are_grpc_on_its_grpc_port(router: Manifest) -> None:
    """Liveness asks about the process, readiness about TaskService, both on the gRPC port."""
    container = only_container(router)
    port = container_port(container, "grpc")
    assert port_of(container_env(container)["TASKRING_LISTEN"]) == port
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["grpc"] == {"port": port}
    assert readiness["grpc"] == {"port": port, "service": ROUTER_READINESS}
    assert container["startupProbe"]["grpc"] == {"port": port}


def test_executor_probes_are_grpc_on_its_grpc_port(executors: Manifest) -> None:
    """An executor is live while it serves, ready while ExecutorService is SERVING."""
    container = only_container(executors)
    port = container_port(container, "grpc")
    assert port_of(container_env(container)["TASKRING_EXECUTOR_LISTEN"]) == port
    assert container["livenessProbe"]["grpc"] == {"port": port}
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": EXECUTOR_READINESS}


def test_probe_timeouts_fit_the_period(objects: list[Manifest]) -> None:
    """Dial plus call must fit in timeoutSeconds, and a probe must end before the next."""
    for workload in workloads(objects):
        container = only_container(workload)
        for key in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(key)
            if probe is not None:
                assert 1 <= probe["timeoutSeconds"] <= probe["periodSeconds"]


def test_pods_run_as_the_images_non_root_user(router: Manifest, executors: Manifest) -> None:
    """Non-root, no privilege escalation, read-only root, no capabilities, as the image's uid."""
    for workload in (router, executors):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        assert pod["automountServiceAccountToken"] is False
        container = only_container(workload)
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        # A read-only root still needs a writable /tmp (tempfile, SQLite's temp files).
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_postgres_runs_as_the_images_postgres_user(postgres: Manifest) -> None:
    """The development database is as locked down as the rest: non-root (the image's own
    postgres user, which owns the volume), read-only root with writable socket and /tmp
    directories."""
    pod = postgres["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["fsGroup"] != 0
    assert pod["automountServiceAccountToken"] is False
    container = only_container(postgres)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/var/run/postgresql"} <= mounts


def test_containers_have_requests_and_limits(objects: list[Manifest]) -> None:
    """Every container asks for CPU and memory and is capped in both."""
    for workload in workloads(objects):
        resources = only_container(workload)["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}
        assert set(resources["limits"]) == {"cpu", "memory"}


def test_termination_grace_outlasts_the_graceful_shutdown(
    router: Manifest, executors: Manifest
) -> None:
    """SIGKILL never cuts a graceful shutdown short. The router waits for running work and
    then for open calls, each up to TASKRING_SHUTDOWN_GRACE_S; an executor waits once."""
    for workload, waits in ((router, 2), (executors, 1)):
        grace = float(container_env(only_container(workload))["TASKRING_SHUTDOWN_GRACE_S"])
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
            waits * grace
        )


def test_router_ring_names_each_executor_pod_by_its_stable_dns_name(
    objects: list[Manifest], router: Manifest, executors: Manifest, tmp_path: Path
) -> None:
    """The ConfigMap the router reads loads cleanly and lists <pod>.<headless service>:port
    for every replica of the StatefulSet."""
    env = container_env(only_container(router))
    config = tmp_path / "router.toml"
    config.write_text(configmap_file(objects, router, env["TASKRING_CONFIG"]))
    settings = Settings.from_env({**env, "TASKRING_CONFIG": str(config)})
    spec = executors["spec"]
    service = k8s_object(objects, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    port = container_port(only_container(executors), "grpc")
    expected = {
        f"{executors['metadata']['name']}-{i}.{spec['serviceName']}:{port}"
        for i in range(spec["replicas"])
    }
    assert all(b.kind == REMOTE for b in settings.file.backends)
    assert {b.address for b in settings.file.backends} == expected


def test_executor_environment_is_accepted(executors: Manifest) -> None:
    """The executor's environment passes the executor's own settings check."""
    settings = ExecutorSettings.from_env(container_env(only_container(executors)))
    assert settings.listen == "0.0.0.0:50061"


def test_router_reads_its_store_url_from_a_secret(
    router: Manifest, store_secret: dict[str, str]
) -> None:
    """TASKRING_STORE comes from the Secret's url (a secretKeyRef), never as a literal, and
    the router's environment with that URL passes its settings check."""
    container = only_container(router)
    assert container_secret_refs(container)["TASKRING_STORE"] == (STORE_SECRET, "url")
    env = container_env(container)
    assert "TASKRING_STORE" not in env
    settings = Settings.from_env(
        {**env, "TASKRING_STORE": store_secret["url"], "TASKRING_CONFIG": ""}
    )
    assert settings.store.is_postgresql
    assert settings.store.pool_size == int(env["TASKRING_STORE_POOL_SIZE"])
    assert settings.store.lease_s == float(env["TASKRING_LEASE_S"])


def test_no_password_is_written_into_a_workload(
    objects: list[Manifest], store_secret: dict[str, str]
) -> None:
    """No literal env value of any pod holds the database's password or a URL with one, and
    the files the router is made of do not contain it: Secrets alone carry it."""
    password = store_secret["password"]
    for workload in workloads(objects):
        for name, value in container_env(only_container(workload)).items():
            assert password not in value, name
            assert urllib.parse.urlsplit(value).password is None, name
    for path in k8s_manifest_files():
        if path != POSTGRES_MANIFEST:
            assert password not in path.read_text(), path.name
    postgres = k8s_object(objects, "StatefulSet", POSTGRES)
    assert container_secret_refs(only_container(postgres))["POSTGRES_PASSWORD"] == (
        STORE_SECRET,
        "password",
    )


def test_store_secret_names_the_postgres_service_and_its_account(
    objects: list[Manifest], postgres: Manifest, store_secret: dict[str, str]
) -> None:
    """The URL's host and port are the Service in front of the development PostgreSQL, and
    its user, password and database are the ones that server creates from the Secret."""
    url = postgres_url(store_secret["url"])
    service = k8s_object(objects, "Service", POSTGRES)
    assert url.hostname == service["metadata"]["name"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    container = only_container(postgres)
    assert container_port(container, port["targetPort"]) == 5432
    assert postgres["spec"]["serviceName"] == service["metadata"]["name"]
    refs = container_secret_refs(container)
    created = {
        variable: store_secret[key]
        for variable, (secret, key) in refs.items()
        if secret == STORE_SECRET
    }
    assert created == {
        "POSTGRES_USER": url.username,
        "POSTGRES_PASSWORD": url.password,
        "POSTGRES_DB": url.path.removeprefix("/"),
    }


def test_router_scales_out(objects: list[Manifest], router: Manifest) -> None:
    """At least two replicas share the store; rolling updates start a new pod before an old
    one stops, and drains take one router at a time."""
    spec = router["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = k8s_object(objects, "PodDisruptionBudget", ROUTER)
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert 1 <= budget["spec"]["maxUnavailable"] < spec["replicas"]


def test_router_keeps_nothing_on_a_volume(objects: list[Manifest], router: Manifest) -> None:
    """No SQLite file, no claim: the router's volumes are its configuration, the provider
    keys and /tmp."""
    pod = router["spec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    assert "volumeClaimTemplates" not in router["spec"]
    assert [o for o in objects if o["kind"] == "PersistentVolumeClaim"] == []
    mounts = {m["mountPath"] for m in only_container(router)["volumeMounts"]}
    assert "/data" not in mounts
    assert all("sqlite" not in value for value in container_env(only_container(router)).values())


def test_database_connections_fit_every_router(router: Manifest) -> None:
    """Each replica, a rollout's surge pod included, opens TASKRING_STORE_POOL_SIZE
    connections plus one for the change feed, within PostgreSQL's max_connections."""
    spec = router["spec"]
    pods = spec["replicas"] + spec["strategy"]["rollingUpdate"]["maxSurge"]
    pool = int(container_env(only_container(router))["TASKRING_STORE_POOL_SIZE"])
    assert pods * (pool + 1) <= POSTGRES_MAX_CONNECTIONS - POSTGRES_RESERVED_CONNECTIONS


def test_postgres_keeps_its_data_on_a_claim(postgres: Manifest) -> None:
    """One server with its data directory on the StatefulSet's claim: below the mount point
    (initdb refuses a volume's root with lost+found in it), and with PostgreSQL's own
    settings (no max_connections of its own)."""
    spec = postgres["spec"]
    assert spec["replicas"] == 1
    (claim,) = spec["volumeClaimTemplates"]
    container = only_container(postgres)
    assert "command" not in container
    assert "args" not in container
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    data = container_env(container)["PGDATA"]
    assert data.startswith(mount["mountPath"].rstrip("/") + "/")


def test_postgres_is_ready_once_it_accepts_tcp_connections(postgres: Manifest) -> None:
    """pg_isready over TCP: while the image initialises a new database, its temporary
    server listens on the Unix socket alone."""
    container = only_container(postgres)
    command = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "pg_isready -h 127.0.0.1 " in command
    assert container["startupProbe"]["tcpSocket"]["port"] == "postgres"


def test_services_and_budgets_select_their_pods(objects: list[Manifest]) -> None:
    """Every Service and PodDisruptionBudget selects exactly one workload's pods, and each
    Service's target ports are ports its pods declare."""
    workloads = [o for o in objects if o["kind"] in {"Deployment", "StatefulSet"}]
    for manifest in objects:
        if manifest["kind"] == "Service":
            selector = manifest["spec"]["selector"]
        elif manifest["kind"] == "PodDisruptionBudget":
            selector = manifest["spec"]["selector"]["matchLabels"]
        else:
            continue
        selected = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, manifest["metadata"]["name"]
        if manifest["kind"] == "Service":
            names = {p["name"] for p in only_container(selected[0])["ports"]}
            assert {p["targetPort"] for p in manifest["spec"]["ports"]} <= names


def test_executors_have_a_disruption_budget(objects: list[Manifest], executors: Manifest) -> None:
    """Node drains take at most one executor at a time."""
    labels = executors["spec"]["template"]["metadata"]["labels"]
    budgets = [
        o
        for o in objects
        if o["kind"] == "PodDisruptionBudget"
        and o["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert [b["spec"].get("maxUnavailable") for b in budgets] == [1]


def test_provider_keys_secret_holds_placeholders_mounted_read_only(
    objects: list[Manifest], router: Manifest
) -> None:
    """The committed Secret carries no real key, and the router mounts it read-only."""
    secret = k8s_object(objects, "Secret", "taskring-provider-keys")
    assert set(secret["stringData"].values()) == {"replace-me"}
    pod = router["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    # Readable by the pod's group (fsGroup), by nobody else.
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == IMAGE_UID
    mount = next(m for m in only_container(router)["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
