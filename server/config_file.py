"""The configuration file (TOML, named by TASKRING_CONFIG): ring members, routing, prices
and custom task types. Everything else is set through TASKRING_* environment variables.

    [routing]
    load_factor = 1.25            # bounded loads: no member above 1.25x its fair share

    [[backends]]
    name = "gpu-1"
    kind = "remote"               # local | remote | openai | anthropic
    address = "10.0.0.7:50061"    # remote: the executor's host:port
    weight = 1                    # share of the ring's keys, relative to the others
    max_concurrency = 32          # attempts it runs at once
    task_types = ["chat", "embed"]

    [[backends]]
    name = "openai"
    kind = "openai"               # any OpenAI-compatible server: vLLM, Ollama, llama.cpp
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"   # or api_key_file = "/run/secrets/openai"
    timeout_s = 120

    [prices."gpt-4o-mini"]        # USD per million tokens, for Usage.cost_usd
    input = 0.15
    output = 0.60

    [task_types.summarize]        # see examples/README.md
    handler = "examples.summarize:summarize"

Every problem in the file is reported at once, each with its place (`backends[2].address`).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL, REMOTE, OPENAI, ANTHROPIC = "local", "remote", "openai", "anthropic"
KINDS = (LOCAL, REMOTE, OPENAI, ANTHROPIC)
# Built-in task types each kind can run (custom types run on local and remote members).
PROVIDER_TYPES = {OPENAI: frozenset({"chat", "embed"}), ANTHROPIC: frozenset({"chat"})}
DEFAULT_LOAD_FACTOR = 1.25


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One ring member as configured. Holds where to find an API key, never the key."""

    name: str
    kind: str
    task_types: frozenset[str]
    weight: int = 1
    max_concurrency: int = 32
    address: str = ""
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    timeout_s: float = 600.0
    default_max_tokens: int = 1024


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_usd_per_mtok: float
    output_usd_per_mtok: float


@dataclass(frozen=True, slots=True)
class FileConfig:
    backends: tuple[BackendSpec, ...] = ()
    load_factor: float = DEFAULT_LOAD_FACTOR
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    # Raw [task_types.<name>] tables; server.tasktypes checks and loads them.
    task_types: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Relative paths in the file (schemas, secret files) are relative to its directory.
    base_dir: Path = field(default_factory=Path)


class _Problems(list[str]):
    def check(self, ok: bool, where: str, message: str) -> bool:
        if not ok:
            self.append(f"{where}: {message}")
        return ok


def read_file_config(path: str | Path) -> tuple[FileConfig, list[str]]:
    """The parsed file and the problems found in it (empty when it is valid)."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except OSError as exc:
        return FileConfig(), [f"{path}: cannot read: {exc.strerror}"]
    except tomllib.TOMLDecodeError as exc:
        return FileConfig(), [f"{path}: not valid TOML: {exc}"]
    problems = _Problems()
    problems.check(
        not (unknown := set(raw) - {"routing", "backends", "prices", "task_types"}),
        str(path),
        f"unknown sections {sorted(unknown)}; expected routing, backends, prices, task_types",
    )
    config = FileConfig(
        backends=_backends(raw.get("backends", []), problems),
        load_factor=_load_factor(raw.get("routing", {}), problems),
        prices=_prices(raw.get("prices", {}), problems),
        task_types=_tables(raw.get("task_types", {}), "task_types", problems),
        base_dir=path.resolve().parent,
    )
    return config, [f"{path}: {p}" for p in problems]


def _load_factor(routing: object, problems: _Problems) -> float:
    if not problems.check(isinstance(routing, dict), "routing", "must be a table"):
        return DEFAULT_LOAD_FACTOR
    assert isinstance(routing, dict)
    problems.check(
        not (unknown := set(routing) - {"load_factor"}),
        "routing",
        f"unknown keys {sorted(unknown)}",
    )
    value = routing.get("load_factor", DEFAULT_LOAD_FACTOR)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 1.0
    if not problems.check(ok, "routing.load_factor", "must be a number >= 1.0 (e.g. 1.25)"):
        return DEFAULT_LOAD_FACTOR
    return float(value)


_BACKEND_KEYS = frozenset(BackendSpec.__dataclass_fields__)


# Upper bounds that keep a typo from taking the router down: a ring has 2,000 points per
# unit of weight, built on the event loop.
_LIMITS = {"weight": 100, "max_concurrency": 100_000, "default_max_tokens": 1_000_000}


def _backends(raw: object, problems: _Problems) -> tuple[BackendSpec, ...]:
    if not problems.check(isinstance(raw, list), "backends", "must be an array of tables"):
        return ()
    assert isinstance(raw, list)
    specs: list[BackendSpec] = []
    seen: set[object] = set()
    for i, entry in enumerate(raw):
        where = f"backends[{i}]"
        if not problems.check(isinstance(entry, dict), where, "must be a table"):
            continue
        name = entry.get("name")
        unique = not isinstance(name, str) or problems.check(
            name not in seen, f"{where}.name", f"{name!r} used twice"
        )
        seen.add(str(name))
        spec = _backend(entry, where, problems)
        if spec is not None and unique:
            specs.append(spec)
    return tuple(specs)


def read_backend_table(entry: dict[str, Any], where: str) -> tuple[BackendSpec | None, list[str]]:
    """One [[backends]] table (as AdminService.AddBackend sends it) and its problems."""
    problems = _Problems()
    spec = _backend(entry, where, problems)
    return spec, list(problems)


def _backend(entry: dict[str, Any], where: str, problems: _Problems) -> BackendSpec | None:
    before = len(problems)
    problems.check(
        not (unknown := set(entry) - _BACKEND_KEYS),
        where,
        f"unknown keys {sorted(unknown)}; expected {', '.join(sorted(_BACKEND_KEYS))}",
    )
    name = entry.get("name")
    problems.check(
        isinstance(name, str) and bool(name) and "#" not in name,
        f"{where}.name",
        "required: a non-empty name without '#'",
    )
    kind = entry.get("kind")
    problems.check(kind in KINDS, f"{where}.kind", f"must be one of {', '.join(KINDS)}")
    types = entry.get("task_types", sorted(PROVIDER_TYPES.get(str(kind), {"chat", "embed"})))
    problems.check(
        isinstance(types, list) and bool(types) and all(isinstance(t, str) and t for t in types),
        f"{where}.task_types",
        "must be a non-empty list of non-empty task type names",
    )
    if kind in PROVIDER_TYPES and isinstance(types, list):
        extra = set(types) - PROVIDER_TYPES[str(kind)]
        problems.check(
            not extra,
            f"{where}.task_types",
            f"a {kind} backend runs {sorted(PROVIDER_TYPES[str(kind)])}, not {sorted(extra)}",
        )
    for key, most in _LIMITS.items():
        value = entry.get(key, 1)
        problems.check(
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most,
            f"{where}.{key}",
            f"must be a whole number from 1 to {most}",
        )
    timeout = entry.get("timeout_s", 600.0)
    problems.check(
        isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0,
        f"{where}.timeout_s",
        "must be a positive number of seconds",
    )
    for key in ("address", "base_url", "api_key_env", "api_key_file"):
        problems.check(isinstance(entry.get(key, ""), str), f"{where}.{key}", "must be a string")
    if kind == REMOTE:
        host, sep, port = str(entry.get("address", "")).rpartition(":")
        problems.check(
            bool(sep and host and port.isdigit()),
            f"{where}.address",
            "a remote backend needs its executor's host:port, e.g. 127.0.0.1:50061",
        )
    if kind in PROVIDER_TYPES:
        problems.check(
            not ("api_key_env" in entry and "api_key_file" in entry),
            where,
            "set api_key_env or api_key_file, not both",
        )
    if len(problems) > before:
        return None
    return BackendSpec(
        name=str(name),
        kind=str(kind),
        task_types=frozenset(types),
        weight=entry.get("weight", 1),
        max_concurrency=entry.get("max_concurrency", 32),
        address=entry.get("address", ""),
        base_url=entry.get("base_url"),
        api_key_env=entry.get("api_key_env"),
        api_key_file=entry.get("api_key_file"),
        timeout_s=float(timeout),
        default_max_tokens=entry.get("default_max_tokens", 1024),
    )


def _prices(raw: object, problems: _Problems) -> dict[str, ModelPrice]:
    prices: dict[str, ModelPrice] = {}
    for model, entry in _tables(raw, "prices", problems).items():
        where = f"prices.{model!r}"
        values = [entry.get("input"), entry.get("output")]
        ok = set(entry) <= {"input", "output"} and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in values
        )
        if problems.check(ok, where, "needs input and output: USD per million tokens, >= 0"):
            prices[model] = ModelPrice(float(entry["input"]), float(entry["output"]))
    return prices


def _tables(raw: object, where: str, problems: _Problems) -> dict[str, dict[str, Any]]:
    if not problems.check(isinstance(raw, dict), where, "must be a table of tables"):
        return {}
    assert isinstance(raw, dict)
    return {
        name: entry
        for name, entry in raw.items()
        if problems.check(isinstance(entry, dict), f"{where}.{name}", "must be a table")
    }
