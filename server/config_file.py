"""The configuration file (TOML, named by TASKRING_CONFIG): ring members, routing, prices,
custom task types, API keys, limits, task type quotas and priorities. Everything else is
set through TASKRING_* environment variables.

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

    [[api_keys]]                  # `taskring keygen CLIENT` prints a new key and its entry
    client = "team-a"             # the client id the key stands for
    sha256 = "3b1f...64 hex"      # of the key: the key itself is never stored
    admin = false                 # admins may use AdminService and see every client's Stats

    [limits]                      # per client: every TaskService call takes one token
    rate = 50                     # tokens added per second
    burst = 100                   # the bucket's size
    max_priority = "URGENT"       # the highest priority a task gets; above it is lowered
    tokens_per_minute = 100000    # model tokens: a budget charged at Submit (admission/budget.py)
    max_queued = 1000             # unfinished (QUEUED or RUNNING) tasks at most
    default_max_tokens = 1024     # charged for a chat task that sets no max_tokens
    [limits.clients."team-a"]     # a client's own rate and burst, cap, budget instead; what
    rate = 200                    #   it leaves out comes from [limits]
    burst = 400
    max_priority = "HIGH"
    tokens_per_minute = 1000000

    [priorities]
    aging_s = 60                  # a queued task rises one priority level per 60 s; 0: never

    [retry]                       # every task type: retryable failures only
    max_attempts = 3              # of a task that asks for none (TASKRING_DEFAULT_MAX_ATTEMPTS)
    initial_backoff_s = 0.2       # the wait after attempt n: uniform in
    max_backoff_s = 10            #   [0, min(max_backoff_s, initial * factor^(n-1))]
    factor = 2
    [retry.types.chat]            # a type's own; keys it leaves out come from [retry]
    max_attempts = 5

    [quotas.types."chat"]         # per task type, across all clients
    rate = 20                     # Submits of the type: a token bucket of `burst` at `rate`/s
    burst = 40
    max_running = 8               # its attempts running at once in this router

Every problem in the file is reported at once, each with its place (`backends[2].address`).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from server.dispatch.retry import DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS, RetryPolicies, RetryPolicy
from server.model.aging import DEFAULT_AGING_S
from server.model.task import Priority

LOCAL, REMOTE, OPENAI, ANTHROPIC = "local", "remote", "openai", "anthropic"
KINDS = (LOCAL, REMOTE, OPENAI, ANTHROPIC)
# Built-in task types each kind can run (custom types run on local and remote members).
PROVIDER_TYPES = {OPENAI: frozenset({"chat", "embed"}), ANTHROPIC: frozenset({"chat"})}
DEFAULT_LOAD_FACTOR = 1.25
# What Anthropic members send as max_tokens for a task that sets none, and what the token
# budget charges such a task for its output.
DEFAULT_MAX_TOKENS = 1024


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
    default_max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_usd_per_mtok: float
    output_usd_per_mtok: float


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured API key: its SHA-256 (hex), never the key, and whom it identifies."""

    client_id: str
    sha256: str
    admin: bool = False


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `rate` tokens a second into a bucket of `burst`."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class TaskQuota:
    """What a client's unfinished tasks may hold at once: model tokens per minute (a budget
    each task is charged at admission, corrected when it ends) and how many tasks. None:
    no such limit."""

    tokens_per_minute: int | None = None
    max_queued: int | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Admission limits per client: `default` for every client (None: unlimited) unless
    `clients` names the client; the same for `quota` and `client_quotas`, and for the
    priority cap, `max_priority` unless `client_max_priority` names the client."""

    default: RateLimit | None = None
    clients: Mapping[str, RateLimit] = field(default_factory=dict)
    quota: TaskQuota = field(default_factory=TaskQuota)
    # A client's table sets some keys of [limits]' quota; the rest are [limits]' own.
    client_quotas: Mapping[str, TaskQuota] = field(default_factory=dict)
    # The output tokens a chat task that sets no max_tokens is charged for.
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_priority: Priority = Priority.URGENT
    client_max_priority: Mapping[str, Priority] = field(default_factory=dict)

    def quota_for(self, client_id: str) -> TaskQuota:
        return self.client_quotas.get(client_id, self.quota)

    @property
    def caps_queued(self) -> bool:
        """Whether some client's unfinished tasks are capped (and so must be counted)."""
        quotas = (self.quota, *self.client_quotas.values())
        return any(quota.max_queued is not None for quota in quotas)

    def max_priority_of(self, client_id: str) -> Priority:
        """The highest priority `client_id`'s tasks may have."""
        return self.client_max_priority.get(client_id, self.max_priority)


@dataclass(frozen=True, slots=True)
class TypeQuota:
    """One task type's limits across all clients: its Submits (a token bucket) and its
    attempts running at once in this router. None: no such limit."""

    rate: RateLimit | None = None
    max_running: int | None = None


@dataclass(frozen=True, slots=True)
class TypeQuotas:
    """[quotas.types."<type>"] tables by task type; a type not named has no limits."""

    types: Mapping[str, TypeQuota] = field(default_factory=dict)

    def rates(self) -> dict[str, RateLimit]:
        return {name: q.rate for name, q in self.types.items() if q.rate is not None}

    def max_running(self) -> dict[str, int]:
        return {name: q.max_running for name, q in self.types.items() if q.max_running is not None}


@dataclass(frozen=True, slots=True)
class FileConfig:
    backends: tuple[BackendSpec, ...] = ()
    load_factor: float = DEFAULT_LOAD_FACTOR
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    api_keys: tuple[ApiKey, ...] = ()
    limits: Limits = field(default_factory=Limits)
    # [priorities] aging_s: seconds of waiting per priority level gained (0: no aging).
    aging_s: float = DEFAULT_AGING_S
    # Raw [task_types.<name>] tables; server.tasktypes checks and loads them.
    task_types: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    retry: RetryPolicies = field(default_factory=RetryPolicies)
    quotas: TypeQuotas = field(default_factory=TypeQuotas)
    # Relative paths in the file (schemas, secret files) are relative to its directory.
    base_dir: Path = field(default_factory=Path)


class _Problems(list[str]):
    def check(self, ok: bool, where: str, message: str) -> bool:
        if not ok:
            self.append(f"{where}: {message}")
        return ok


def read_file_config(
    path: str | Path, default_max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> tuple[FileConfig, list[str]]:
    """The parsed file and the problems found in it (empty when it is valid).
    `default_max_attempts` is [retry] max_attempts when the file sets none."""
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
        not (unknown := set(raw) - _SECTIONS),
        str(path),
        f"unknown sections {sorted(unknown)}; expected {', '.join(sorted(_SECTIONS))}",
    )
    backends = _backends(raw.get("backends", []), problems)
    task_types = _tables(raw.get("task_types", {}), "task_types", problems)
    served = {"chat", "embed", *task_types, *(t for spec in backends for t in spec.task_types)}
    config = FileConfig(
        backends=backends,
        load_factor=_load_factor(raw.get("routing", {}), problems),
        prices=_prices(raw.get("prices", {}), problems),
        api_keys=_api_keys(raw.get("api_keys", []), problems),
        limits=_limits(raw.get("limits", {}), problems),
        aging_s=_aging_s(raw.get("priorities", {}), problems),
        task_types=task_types,
        retry=_retry(raw.get("retry", {}), default_max_attempts, served, problems),
        quotas=_type_quotas(raw.get("quotas", {}), served, problems),
        base_dir=path.resolve().parent,
    )
    return config, [f"{path}: {p}" for p in problems]


_SECTIONS = frozenset(
    {
        "routing",
        "backends",
        "prices",
        "task_types",
        "api_keys",
        "limits",
        "retry",
        "priorities",
        "quotas",
    }
)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _api_keys(raw: object, problems: _Problems) -> tuple[ApiKey, ...]:
    if not problems.check(isinstance(raw, list), "api_keys", "must be an array of tables"):
        return ()
    assert isinstance(raw, list)
    keys: dict[str, ApiKey] = {}
    for i, entry in enumerate(raw):
        where = f"api_keys[{i}]"
        if not problems.check(isinstance(entry, dict), where, "must be a table"):
            continue
        problems.check(
            not (unknown := set(entry) - {"client", "sha256", "admin"}),
            where,
            f"unknown keys {sorted(unknown)}; expected client, sha256, admin",
        )
        client, digest, admin = entry.get("client"), entry.get("sha256"), entry.get("admin", False)
        ok = problems.check(
            isinstance(client, str) and 0 < len(client) <= 128 and client.isprintable(),
            f"{where}.client",
            "required: the client id, 1 to 128 printable characters",
        )
        ok &= problems.check(
            isinstance(digest, str) and bool(_SHA256_HEX.fullmatch(digest)),
            f"{where}.sha256",
            "required: the key's SHA-256 as 64 lowercase hex digits (`taskring keygen`)",
        )
        ok &= problems.check(isinstance(admin, bool), f"{where}.admin", "must be true or false")
        if ok and problems.check(
            digest not in keys, f"{where}.sha256", "the same key is configured twice"
        ):
            keys[str(digest)] = ApiKey(str(client), str(digest), bool(admin))
    return tuple(keys.values())


# Keys of a [limits.clients."x"] table, and of [limits] itself (which adds the budget's
# default_max_tokens): each group read by its own function.
_RATE_KEYS = ("rate", "burst")
_QUOTA_KEYS = {  # key: its largest value, what it counts
    "tokens_per_minute": (10**12, "model tokens per minute"),
    "max_queued": (10**7, "unfinished tasks at once"),
}
_CLIENT_LIMIT_KEYS = (*_RATE_KEYS, *_QUOTA_KEYS, "max_priority")


def _limits(raw: object, problems: _Problems) -> Limits:
    if not problems.check(isinstance(raw, dict), "limits", "must be a table"):
        return Limits()
    assert isinstance(raw, dict)
    shared = {k: v for k, v in raw.items() if k != "clients"}
    _check_keys(shared, "limits", (*_CLIENT_LIMIT_KEYS, "default_max_tokens"), problems)
    default = _rate_limit(shared, "limits", problems)
    quota = _task_quota(shared, "limits", TaskQuota(), problems)
    max_tokens = shared.get("default_max_tokens", DEFAULT_MAX_TOKENS)
    if not problems.check(
        isinstance(max_tokens, int)
        and not isinstance(max_tokens, bool)
        and 1 <= max_tokens <= _LIMITS["default_max_tokens"],
        "limits.default_max_tokens",
        f"must be a whole number from 1 to {_LIMITS['default_max_tokens']}: the output tokens"
        " a chat task that sets no max_tokens is charged for",
    ):
        max_tokens = DEFAULT_MAX_TOKENS
    max_priority = _max_priority(shared, "limits", problems)
    clients: dict[str, RateLimit] = {}
    client_quotas: dict[str, TaskQuota] = {}
    client_max_priority: dict[str, Priority] = {}
    for client, entry in _tables(raw.get("clients", {}), "limits.clients", problems).items():
        where = f"limits.clients.{client!r}"
        _check_keys(entry, where, _CLIENT_LIMIT_KEYS, problems)
        limit = _rate_limit(entry, where, problems)
        if limit is not None:
            clients[client] = limit
        if entry.keys() & _QUOTA_KEYS.keys():
            client_quotas[client] = _task_quota(entry, where, quota, problems)
        # What a client's table leaves out is the [limits] value: a table that only caps
        # the priority keeps the common rate.
        cap = _max_priority(entry, where, problems)
        if cap is not None:
            client_max_priority[client] = cap
    return Limits(
        default,
        clients,
        quota,
        client_quotas,
        int(max_tokens),
        max_priority or Priority.URGENT,
        client_max_priority,
    )


def _check_keys(
    entry: Mapping[str, Any], where: str, expected: tuple[str, ...], problems: _Problems
) -> None:
    problems.check(
        not (unknown := set(entry) - set(expected)),
        where,
        f"unknown keys {sorted(unknown)}; expected {', '.join(expected)}",
    )


_PRIORITY_NAMES = ", ".join(p.name for p in Priority)


def _max_priority(entry: Mapping[str, Any], where: str, problems: _Problems) -> Priority | None:
    value = entry.get("max_priority")
    if value is None:
        return None
    name = value.upper() if isinstance(value, str) else None
    if not problems.check(
        name in Priority.__members__,
        f"{where}.max_priority",
        f"{value!r} is not a priority; expected one of {_PRIORITY_NAMES}",
    ):
        return None
    return Priority[str(name)]


def _rate_limit(entry: Mapping[str, Any], where: str, problems: _Problems) -> RateLimit | None:
    """The table's rate and burst; None when it sets neither (no limit of its own)."""
    if not entry.keys() & set(_RATE_KEYS):
        return None
    rate, burst = entry.get("rate"), entry.get("burst")
    ok = problems.check(
        isinstance(rate, int | float) and not isinstance(rate, bool) and 0 < rate <= 1e6,
        f"{where}.rate",
        "required: tokens per second, above 0 and at most 1000000",
    )
    ok &= problems.check(
        isinstance(burst, int) and not isinstance(burst, bool) and 1 <= burst <= 1_000_000,
        f"{where}.burst",
        "required: the bucket's size, a whole number from 1 to 1000000",
    )
    return RateLimit(float(rate), int(burst)) if ok else None  # type: ignore[arg-type]


def _task_quota(
    entry: Mapping[str, Any], where: str, inherited: TaskQuota, problems: _Problems
) -> TaskQuota:
    """`inherited` with the token budget and queued cap `entry` sets."""
    changes: dict[str, int] = {}
    for key, (most, what) in _QUOTA_KEYS.items():
        value = entry.get(key)
        if value is not None and problems.check(
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most,
            f"{where}.{key}",
            f"must be a whole number from 1 to {most}: {what}",
        ):
            changes[key] = value
    return replace(inherited, **changes)


# Bounds max_running like a member's max_concurrency: a typo must not pass as "no cap".
_MAX_RUNNING = 100_000


def _type_quotas(raw: object, served: set[str], problems: _Problems) -> TypeQuotas:
    if not problems.check(isinstance(raw, dict), "quotas", "must be a table"):
        return TypeQuotas()
    assert isinstance(raw, dict)
    _check_keys(raw, "quotas", ("types",), problems)
    quotas: dict[str, TypeQuota] = {}
    for name, entry in _tables(raw.get("types", {}), "quotas.types", problems).items():
        where = f"quotas.types.{name}"
        # As in [retry.types]: a typo would otherwise leave the type unlimited without a word.
        problems.check(
            name in served, where, f"no such task type; known: {', '.join(sorted(served))}"
        )
        _check_keys(entry, where, (*_RATE_KEYS, "max_running"), problems)
        rate = _rate_limit(entry, where, problems)
        max_running = entry.get("max_running")
        if max_running is not None and not problems.check(
            isinstance(max_running, int)
            and not isinstance(max_running, bool)
            and 1 <= max_running <= _MAX_RUNNING,
            f"{where}.max_running",
            f"must be a whole number from 1 to {_MAX_RUNNING}: the type's attempts running"
            " at once in this router",
        ):
            max_running = None
        quotas[name] = TypeQuota(rate, max_running)
    return TypeQuotas(quotas)


_BACKOFF_KEYS = ("initial_backoff_s", "max_backoff_s", "factor")


def default_retry(default_max_attempts: int) -> RetryPolicies:
    """The policies of a file without [retry] (or of no file)."""
    # An out-of-range TASKRING_DEFAULT_MAX_ATTEMPTS is reported by config.py.
    return RetryPolicies(RetryPolicy(max_attempts=max(1, min(default_max_attempts, MAX_ATTEMPTS))))


def _retry(
    raw: object, default_max_attempts: int, served: set[str], problems: _Problems
) -> RetryPolicies:
    base = default_retry(default_max_attempts).default
    if not problems.check(isinstance(raw, dict), "retry", "must be a table"):
        return RetryPolicies(base)
    assert isinstance(raw, dict)
    base = _retry_policy({k: v for k, v in raw.items() if k != "types"}, "retry", base, problems)
    by_type: dict[str, RetryPolicy] = {}
    for name, entry in _tables(raw.get("types", {}), "retry.types", problems).items():
        # A typo would otherwise leave the type on the default policy without a word.
        problems.check(
            name in served,
            f"retry.types.{name}",
            f"no such task type; known: {', '.join(sorted(served))}",
        )
        by_type[name] = _retry_policy(entry, f"retry.types.{name}", base, problems)
    return RetryPolicies(base, by_type)


def _retry_policy(
    entry: Mapping[str, Any], where: str, inherited: RetryPolicy, problems: _Problems
) -> RetryPolicy:
    """`inherited` with the keys `entry` sets."""
    problems.check(
        not (unknown := set(entry) - {"max_attempts", *_BACKOFF_KEYS}),
        where,
        f"unknown keys {sorted(unknown)}; expected max_attempts, {', '.join(_BACKOFF_KEYS)}",
    )
    changes: dict[str, Any] = {}
    attempts = entry.get("max_attempts", inherited.max_attempts)
    if problems.check(
        isinstance(attempts, int)
        and not isinstance(attempts, bool)
        and 1 <= attempts <= MAX_ATTEMPTS,
        f"{where}.max_attempts",
        f"must be a whole number from 1 to {MAX_ATTEMPTS} (attempts, the first included)",
    ):
        changes["max_attempts"] = attempts
    for key in _BACKOFF_KEYS:
        value = entry.get(key, getattr(inherited, key))
        if problems.check(
            isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 3600,
            f"{where}.{key}",
            "must be a number from 0 to 3600",
        ):
            changes[key] = float(value)
    try:
        return replace(inherited, **changes)
    except ValueError as exc:  # the keys disagree: max_backoff_s below initial_backoff_s, say
        problems.append(f"{where}: {exc}")
        return inherited


def _aging_s(raw: object, problems: _Problems) -> float:
    if not problems.check(isinstance(raw, dict), "priorities", "must be a table"):
        return DEFAULT_AGING_S
    assert isinstance(raw, dict)
    problems.check(
        not (unknown := set(raw) - {"aging_s"}),
        "priorities",
        f"unknown keys {sorted(unknown)}; expected aging_s",
    )
    value = raw.get("aging_s", DEFAULT_AGING_S)
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
    if not problems.check(
        ok,
        "priorities.aging_s",
        f"{value!r} is not a number of seconds >= 0 (60: a LOW task competes as URGENT"
        " after 3 minutes; 0 turns aging off)",
    ):
        return DEFAULT_AGING_S
    return float(value)


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
        default_max_tokens=entry.get("default_max_tokens", DEFAULT_MAX_TOKENS),
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
