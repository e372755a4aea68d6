"""The Dockerfile and .dockerignore, read as text (no Docker engine here to build them):
multi-stage, non-root, healthy through client.healthcheck, and a build context with
nothing in it but the package sources."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

import pytest

from client.healthcheck import DEFAULT_TIMEOUT_S
from server.config import ConfigError, ExecutorSettings, Settings
from tests.conftest import ROOT
from tests.deploy.manifests import (
    ROUTER_READINESS,
    duration_s,
    k8s_objects,
    only_container,
    port_of,
    taskring_workloads,
)

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped (as
    Docker drops them, inside continuations too)."""
    found: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, args = logical.partition(" ")
            found.append(Instruction(keyword.upper(), args.strip()))
    return found


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    """Instructions by stage; stages[0] is what comes before the first FROM (global ARGs)."""
    split: list[list[Instruction]] = [[]]
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            split.append([])
        split[-1].append(instruction)
    return split


@pytest.fixture(scope="module")
def runtime(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


def args_of(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def image_env(runtime: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(runtime, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_builds_in_a_builder_stage_and_ships_python_slim(stages: list[list[Instruction]]) -> None:
    """Two stages from python:3.11-slim: a builder, then the runtime that ships."""
    (base_arg,) = args_of(stages[0], "ARG")
    name, _, default = base_arg.partition("=")
    assert default == "python:3.11-slim"
    froms = [stage[0].args for stage in stages[1:]]
    assert froms == [f"${{{name}}} AS builder", f"${{{name}}} AS runtime"]


def test_runtime_copies_only_the_virtual_environment(runtime: list[Instruction]) -> None:
    """No source tree, build tool or pip cache reaches the runtime: just the builder's venv."""
    assert args_of(runtime, "COPY") == ["--from=builder /opt/taskring /opt/taskring"]
    assert args_of(runtime, "ADD") == []


def test_runs_as_the_numeric_non_root_user_the_pods_expect(runtime: list[Instruction]) -> None:
    """USER is numeric (runAsNonRoot can only verify a number), not root, and the uid the
    Kubernetes manifests run the image as."""
    user = args_of(runtime, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    run_as = {
        o["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        for o in taskring_workloads(k8s_objects())
    }
    assert run_as == {int(uid)}


def test_healthcheck_asks_client_healthcheck_for_router_readiness(
    runtime: list[Instruction],
) -> None:
    """HEALTHCHECK runs `python -m client.healthcheck` for TaskService on the router's port,
    and the module's own timeout ends before Docker's."""
    (healthcheck,) = args_of(runtime, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    argv = json.loads(command)  # exec form: no shell needed in the image
    assert argv[:3] == ["python", "-m", "client.healthcheck"]
    assert argv[3:5] == ["--service", ROUTER_READINESS]
    assert port_of(argv[5]) == port_of(image_env(runtime)["TASKRING_LISTEN"])
    timeout = re.search(r"--timeout=(\S+)", options)
    assert timeout is not None
    assert duration_s(timeout.group(1)) > DEFAULT_TIMEOUT_S


def test_default_command_is_the_router_serving_every_interface(
    runtime: list[Instruction],
) -> None:
    """CMD starts the router on 0.0.0.0:50051, its store on the /data volume, and the
    image's environment passes the router's and the executor's settings checks, once the
    router is told how callers are let in: secure by default, the image alone does not
    serve every interface without API keys."""
    assert json.loads(args_of(runtime, "CMD")[-1]) == ["taskring-server"]
    env = image_env(runtime)
    with pytest.raises(ConfigError, match="TASKRING_INSECURE"):
        Settings.from_env(env)
    settings = Settings.from_env({**env, "TASKRING_INSECURE": "true"})
    assert settings.server.listen == "0.0.0.0:50051"
    (volume,) = json.loads(args_of(runtime, "VOLUME")[-1])
    assert settings.store.sqlite_path.startswith(volume.rstrip("/") + "/")
    assert ExecutorSettings.from_env(env).listen == "0.0.0.0:50061"
    exposed = {int(p) for args in args_of(runtime, "EXPOSE") for p in args.split()}
    assert {50051, 9464, port_of(env["TASKRING_METRICS_LISTEN"])} <= exposed


def test_kubernetes_runs_the_commands_the_image_installs() -> None:
    """The manifests' commands are console scripts of the package the image installs."""
    commands = {only_container(o)["command"][0] for o in taskring_workloads(k8s_objects())}
    assert commands == {"taskring-server", "taskring-executor"}
    scripts = (ROOT / "pyproject.toml").read_text()
    assert all(f"\n{command} = " in scripts for command in commands)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that matches
    it or one of its parent directories decides, `!` re-includes. (`*` stays within one
    directory level, `**` spans any number.)"""
    excluded = False
    parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", r"[\1]", regex)
        if any(re.fullmatch(regex, candidate) for candidate in parents):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_sends_what_the_build_copies(
    stages: list[list[Instruction]], ignore_patterns: list[str]
) -> None:
    """Every file the builder COPYs from the context is in it."""
    builder = stages[1]
    for args in args_of(builder, "COPY"):
        for source in args.split()[:-1]:
            root = ROOT / source
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            assert files, source
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if "__pycache__" not in relative:
                    assert not dockerignore_excludes(ignore_patterns, relative), relative


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".tools/bin/grpcurl",
        "taskring.db",
        "data/taskring.db-wal",
        "server/__pycache__/app.cpython-311.pyc",
        "tests/conftest.py",
        "deploy/k8s/secret.yaml",
        "docker-compose.yml",
    ],
)
def test_dockerignore_keeps_everything_else_out(ignore_patterns: list[str], path: str) -> None:
    """Databases, environments, tools, tests and secrets never reach the build context."""
    assert dockerignore_excludes(ignore_patterns, path)
