"""Readers the deployment tests share: the compose file, the Kubernetes manifests and the
wiring between them (which file a container's TASKRING_CONFIG names, on which port it
listens)."""

from __future__ import annotations

import re
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Not a Kubernetes object.
KUSTOMIZATION = K8S / "kustomization.yaml"
# Applied by hand rather than by `kubectl apply -k`: the provider keys' template, and the
# development PostgreSQL with the Secret that holds the store's URL.
SECRET_TEMPLATE = K8S / "secret.yaml"
POSTGRES_MANIFEST = K8S / "postgres.yaml"
APPLIED_BY_HAND = (SECRET_TEMPLATE, POSTGRES_MANIFEST)
# The image the Dockerfile builds (kustomization.yaml sets its registry and tag).
TASKRING_IMAGE = "taskring"

# What the router and the executors serve health for (server/api/server.py,
# server/executor/app.py).
ROUTER_READINESS = "taskring.v1.TaskService"
EXECUTOR_READINESS = "taskring.v1.ExecutorService"

Manifest = dict[str, Any]


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


def load_compose() -> Manifest:
    """docker-compose.yml with its YAML anchors and merge keys resolved."""
    compose: Manifest = load_yaml(COMPOSE_FILE)
    return compose


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


def k8s_objects() -> list[Manifest]:
    """Every object in every manifest under deploy/k8s, the Secret template included."""
    objects: list[Manifest] = []
    for path in k8s_manifest_files():
        with path.open(encoding="utf-8") as file:
            objects += [doc for doc in yaml.safe_load_all(file) if doc is not None]
    return objects


def k8s_object(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def only_container(workload: Manifest) -> Manifest:
    containers: list[Manifest] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_env(container: Manifest) -> dict[str, str]:
    """The literal `value`s of a container's env (secretKeyRef entries are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def container_secret_refs(container: Manifest) -> dict[str, tuple[str, str]]:
    """(Secret, key) of each env variable a container reads through secretKeyRef."""
    refs: dict[str, tuple[str, str]] = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs[entry["name"]] = (ref["name"], ref["key"])
    return refs


def secret_data(objects: list[Manifest], name: str) -> dict[str, str]:
    """A Secret's values (the committed manifests write them as stringData)."""
    secret = k8s_object(objects, "Secret", name)
    assert "data" not in secret, f"{name}: stringData only, so the tests can read it"
    data: dict[str, str] = secret["stringData"]
    return data


def workloads(objects: list[Manifest]) -> list[Manifest]:
    return [o for o in objects if o["kind"] in {"Deployment", "StatefulSet"}]


def taskring_workloads(objects: list[Manifest]) -> list[Manifest]:
    """The Deployments and StatefulSets that run the taskring image (not PostgreSQL's)."""
    return [w for w in workloads(objects) if only_container(w)["image"] == TASKRING_IMAGE]


def container_port(container: Manifest, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port: int = ports[name]
    return port


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def postgres_url(url: str) -> urllib.parse.SplitResult:
    """A TASKRING_STORE that names PostgreSQL, split; fails on anything else."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme in {"postgresql", "postgres"}, f"not a PostgreSQL URL: {parts.scheme}"
    return parts


def configmap_file(objects: list[Manifest], workload: Manifest, path: str) -> str:
    """The text a container of `workload` reads at `path`, followed from its volume mount
    to the ConfigMap that backs it."""
    container = only_container(workload)
    pod = workload["spec"]["template"]["spec"]
    for mount in container["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(directory):
            continue
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "configMap" in volume, f"{path} is on volume {mount['name']}, not a ConfigMap"
        config_map = k8s_object(objects, "ConfigMap", volume["configMap"]["name"])
        text: str = config_map["data"][path.removeprefix(directory)]
        return text
    raise AssertionError(f"no volume of {workload['metadata']['name']} is mounted at {path}")


def duration_s(text: str) -> float:
    """A compose duration such as 30s, 1m30s or 500ms, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def promtool() -> str:
    """Prometheus's own checker, from the Debian package `prometheus` (.ci/run installs it)."""
    found = shutil.which("promtool")
    assert found is not None, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return found
