"""The Kubernetes manifests in deploy/k8s: parsed, and checked against what the processes
really serve (ports, health names, shutdown grace) and against each other."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.api.server import READINESS_SERVICE
from server.config import ExecutorSettings, Settings
from server.config_file import REMOTE
from server.executor.app import EXECUTOR_SERVICE
from tests.deploy.manifests import (
    EXECUTOR_READINESS,
    K8S,
    KUSTOMIZATION,
    ROUTER_READINESS,
    SECRET_TEMPLATE,
    Manifest,
    configmap_file,
    container_env,
    container_port,
    k8s_manifest_files,
    k8s_object,
    k8s_objects,
    load_yaml,
    only_container,
    port_of,
)

ROUTER = "taskring-router"
EXECUTOR = "taskring-executor"
# The image's USER (Dockerfile); the pods must run as the same id to own their volumes.
IMAGE_UID = 10001


@pytest.fixture(scope="module")
def objects() -> list[Manifest]:
    return k8s_objects()


@pytest.fixture(scope="module")
def router(objects: list[Manifest]) -> Manifest:
    return k8s_object(objects, "Deployment", ROUTER)


@pytest.fixture(scope="module")
def executors(objects: list[Manifest]) -> Manifest:
    return k8s_object(objects, "StatefulSet", EXECUTOR)


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
        "PersistentVolumeClaim",
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
    } <= kinds


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    """`kubectl apply -k` creates everything, yet never overwrites real keys with placeholders."""
    kustomization = load_yaml(KUSTOMIZATION)
    expected = {p.name for p in k8s_manifest_files()} - {SECRET_TEMPLATE.name}
    assert set(kustomization["resources"]) == expected


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


def test_probe_timeouts_fit_the_period(router: Manifest, executors: Manifest) -> None:
    """Dial plus call must fit in timeoutSeconds, and a probe must end before the next."""
    for workload in (router, executors):
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


def test_containers_have_requests_and_limits(router: Manifest, executors: Manifest) -> None:
    """Every container asks for CPU and memory and is capped in both."""
    for workload in (router, executors):
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


def test_router_store_is_on_its_persistent_volume(
    objects: list[Manifest], router: Manifest
) -> None:
    """The SQLite file lives on the claimed volume, not the container's (read-only) root."""
    container = only_container(router)
    store = container_env(container)["TASKRING_STORE"].removeprefix("sqlite:///")
    pod = router["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mount = next(
        m for m in container["volumeMounts"] if store.startswith(m["mountPath"].rstrip("/") + "/")
    )
    k8s_object(objects, "PersistentVolumeClaim", claims[mount["name"]])
    # One writer: a second router (or a rolling update's surge) must never share the file.
    assert router["spec"]["replicas"] == 1
    assert router["spec"]["strategy"]["type"] == "Recreate"


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
