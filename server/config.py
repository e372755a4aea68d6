"""Settings: one frozen section per component, read from an environment mapping.

Every default is the embedded default `make run` uses. `Settings.from_env` checks every
variable and raises one ConfigError that names each bad variable and value.

    TASKRING_LISTEN                 host:port to serve gRPC on       127.0.0.1:50051
    TASKRING_SHUTDOWN_GRACE_S       seconds in-flight work may take   10
    TASKRING_STORE                  sqlite:///relative or sqlite:////absolute path,
                                    or postgresql://user:pass@host:port/database
                                    (?search_path=schema picks a schema)
                                                                      sqlite:///taskring.db
    TASKRING_SQLITE_SYNCHRONOUS     OFF | NORMAL | FULL | EXTRA       FULL
    TASKRING_STORE_POOL_SIZE        PostgreSQL connections per replica 10
    TASKRING_LEASE_S                PostgreSQL: seconds a dead replica's 10
                                    RUNNING tasks wait before another
                                    replica re-queues them
    TASKRING_OUTPUT_STORE_INTERVAL_S  seconds between stores of a       0.25
                                    running task's output (watchers get
                                    each token at once either way)
    TASKRING_LOCAL_EXECUTORS        in-process executors on the ring   3
    TASKRING_LOCAL_MAX_CONCURRENCY  attempts each runs at once         32
    TASKRING_LOCAL_TOKEN_DELAY_S    local-echo delay per token         0.02
    TASKRING_DEFAULT_TIMEOUT_S      deadline of a task that sets none  600
    TASKRING_MAX_TIMEOUT_S          longest timeout a task may ask     86400
    TASKRING_DEFAULT_MAX_ATTEMPTS   attempts of a task that sets none  3
    TASKRING_RETENTION_S            finished tasks older than this    604800 (7 days)
                                    are deleted; 0 keeps them for ever
    TASKRING_LOG_LEVEL              DEBUG | INFO | WARNING | ERROR     INFO
    TASKRING_LOG_FORMAT             json (one object per line) | text  json
    OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, ...             off
                                    traces: the standard variables, read at start-up
                                    (server/observability/tracing.py); router and executor
    TASKRING_CONFIG                 TOML file: ring members, routing,  (none)
                                    prices, custom task types (server/config_file.py)
    TASKRING_METRICS_LISTEN         host:port of the Prometheus        127.0.0.1:9464
                                    endpoint (/metrics); empty or
                                    `off` turns metrics off
    TASKRING_TLS_CERT               PEM certificate chain: serve TLS   (none: plaintext)
    TASKRING_TLS_KEY                PEM private key of that chain      (none)
                                    (both or neither; server/tls.py)
    TASKRING_TLS_CLIENT_CA          PEM CA bundle: mutual TLS, every   (none)
                                    client must present a certificate
                                    it signed (needs the two above)
    TASKRING_REMOTE_TLS_CA          PEM CA bundle: dial `remote`       (none: plaintext)
                                    executors over TLS, verifying
                                    their certificates against it
    TASKRING_REMOTE_TLS_CERT        PEM client certificate chain and   (none)
    TASKRING_REMOTE_TLS_KEY         its key, for executors serving
                                    mutual TLS (need the CA above)

The executor process (`taskring-executor`) reads TASKRING_LOCAL_TOKEN_DELAY_S,
TASKRING_SHUTDOWN_GRACE_S, TASKRING_LOG_LEVEL, TASKRING_LOG_FORMAT, TASKRING_CONFIG (for its
task types), TASKRING_METRICS_LISTEN (default 127.0.0.1:9465, beside a router on the same
host; containers set 0.0.0.0:9464), TASKRING_TLS_CERT, TASKRING_TLS_KEY and
TASKRING_TLS_CLIENT_CA (as the router's: routers dial it with TASKRING_REMOTE_TLS_*) and:

    TASKRING_EXECUTOR_LISTEN        host:port to serve on             127.0.0.1:50061
    TASKRING_EXECUTOR_MAX_CONCURRENCY  attempts it runs at once        64
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from .config_file import FileConfig, default_retry, read_file_config
from .dispatch.retry import MAX_ATTEMPTS
from .tls import ChannelTls, ServerTls, read_remote_tls, read_server_tls

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """Lists every invalid setting; the server refuses to start with any."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"
    # How often readiness re-checks that the store answers.
    store_check_interval_s: float = 2.0
    # host:port of the Prometheus endpoint; "" when metrics are off. Off unless asked for
    # (from_env asks for 127.0.0.1:9464): servers built in code, as tests build them, must
    # not contend for one fixed port.
    metrics_listen: str = ""
    # Serve without API keys on an address other machines can reach (TASKRING_INSECURE).
    insecure: bool = False
    # TLS (mutual with a client CA) from TASKRING_TLS_*; None serves plaintext. It does not
    # stand in for API keys: certificates say who may connect, keys whose tasks are whose.
    tls: ServerTls | None = None


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = "sqlite:///taskring.db"
    sqlite_synchronous: str = "FULL"
    # Finished tasks older than this (by their end) are deleted; 0 keeps every task.
    retention_s: float = 7 * 86400.0
    # PostgreSQL only: connections this replica opens, and its lease on the tasks it runs.
    pool_size: int = 10
    lease_s: float = 10.0
    # How often a running task's output is stored (see DispatchSettings).
    output_store_interval_s: float = 0.25

    @property
    def is_postgresql(self) -> bool:
        return self.url.startswith(POSTGRESQL_SCHEMES)

    @property
    def sqlite_path(self) -> str:
        return self.url.removeprefix("sqlite:///")

    @property
    def display_url(self) -> str:
        """The URL without its password: for logs and errors."""
        return mask_password(self.url)


POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def mask_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class LocalExecutorSettings:
    count: int = 3
    max_concurrency: int = 32
    token_delay_s: float = 0.02


@dataclass(frozen=True, slots=True)
class TaskLimits:
    default_timeout_s: float = 600.0
    max_timeout_s: float = 86400.0
    default_max_attempts: int = 3
    max_attempts: int = MAX_ATTEMPTS


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    local: LocalExecutorSettings = field(default_factory=LocalExecutorSettings)
    tasks: TaskLimits = field(default_factory=TaskLimits)
    # From TASKRING_CONFIG; without it, the ring is TASKRING_LOCAL_EXECUTORS local members.
    file: FileConfig = field(default_factory=FileConfig)
    # How `remote` members are dialled (TASKRING_REMOTE_TLS_*); None: plaintext.
    remote_tls: ChannelTls | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        reader = _Reader(env)
        tls, tls_problems = read_server_tls(env)
        reader.problems.extend(tls_problems)
        remote_tls, remote_tls_problems = read_remote_tls(env)
        reader.problems.extend(remote_tls_problems)
        settings = cls(
            server=ServerSettings(
                listen=reader.get("TASKRING_LISTEN", "127.0.0.1:50051", _host_port),
                shutdown_grace_s=reader.get("TASKRING_SHUTDOWN_GRACE_S", 10.0, _non_negative),
                log_level=reader.get("TASKRING_LOG_LEVEL", "INFO", _one_of(LOG_LEVELS)),
                log_format=reader.get("TASKRING_LOG_FORMAT", "json", _log_format),
                metrics_listen=_metrics_listen(env, reader),
                insecure=reader.get("TASKRING_INSECURE", False, _bool),
                tls=tls,
            ),
            store=StoreSettings(
                url=reader.get(
                    "TASKRING_STORE", "sqlite:///taskring.db", _store_url, shown=mask_password
                ),
                sqlite_synchronous=reader.get(
                    "TASKRING_SQLITE_SYNCHRONOUS",
                    "FULL",
                    _one_of(("OFF", "NORMAL", "FULL", "EXTRA")),
                ),
                retention_s=reader.get("TASKRING_RETENTION_S", 7 * 86400.0, _non_negative),
                pool_size=reader.get("TASKRING_STORE_POOL_SIZE", 10, _positive_int),
                lease_s=reader.get("TASKRING_LEASE_S", 10.0, _positive),
                output_store_interval_s=reader.get(
                    "TASKRING_OUTPUT_STORE_INTERVAL_S", 0.25, _non_negative
                ),
            ),
            local=LocalExecutorSettings(
                count=reader.get("TASKRING_LOCAL_EXECUTORS", 3, _positive_int),
                max_concurrency=reader.get("TASKRING_LOCAL_MAX_CONCURRENCY", 32, _positive_int),
                token_delay_s=reader.get("TASKRING_LOCAL_TOKEN_DELAY_S", 0.02, _non_negative),
            ),
            tasks=TaskLimits(
                default_timeout_s=reader.get("TASKRING_DEFAULT_TIMEOUT_S", 600.0, _positive),
                max_timeout_s=reader.get("TASKRING_MAX_TIMEOUT_S", 86400.0, _positive),
                default_max_attempts=reader.get("TASKRING_DEFAULT_MAX_ATTEMPTS", 3, _positive_int),
            ),
            remote_tls=remote_tls,
        )
        config_path = env.get("TASKRING_CONFIG", "")
        if config_path:
            file, problems = read_file_config(config_path, settings.tasks.default_max_attempts)
            reader.problems.extend(problems)
        else:
            file = FileConfig(retry=default_retry(settings.tasks.default_max_attempts))
        settings = replace(settings, file=file)
        if settings.tasks.default_max_attempts > settings.tasks.max_attempts:
            reader.problems.append(
                f"TASKRING_DEFAULT_MAX_ATTEMPTS must not exceed {settings.tasks.max_attempts}"
            )
        if settings.tasks.default_timeout_s > settings.tasks.max_timeout_s:
            reader.problems.append(
                "TASKRING_DEFAULT_TIMEOUT_S must not exceed TASKRING_MAX_TIMEOUT_S"
            )
        open_to_others = not is_loopback(settings.server.listen)
        if open_to_others and not settings.file.api_keys and not settings.server.insecure:
            reader.problems.append(
                f"TASKRING_LISTEN={settings.server.listen} is reachable from other machines"
                " but no API keys are configured: add [[api_keys]] to TASKRING_CONFIG"
                " (`taskring keygen CLIENT` prints one), listen on 127.0.0.1, or set"
                " TASKRING_INSECURE=true to let anyone in"
            )
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """A standalone executor process: serves ExecutorService to routers."""

    listen: str = "127.0.0.1:50061"
    max_concurrency: int = 64
    token_delay_s: float = 0.02
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"
    # As ServerSettings.metrics_listen: from_env's default is 127.0.0.1:9465.
    metrics_listen: str = ""
    file: FileConfig = field(default_factory=FileConfig)
    # As the router's ServerSettings.tls (TASKRING_TLS_*); None serves plaintext.
    tls: ServerTls | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ExecutorSettings:
        reader = _Reader(env)
        tls, tls_problems = read_server_tls(env)
        reader.problems.extend(tls_problems)
        settings = cls(
            listen=reader.get("TASKRING_EXECUTOR_LISTEN", "127.0.0.1:50061", _host_port),
            max_concurrency=reader.get("TASKRING_EXECUTOR_MAX_CONCURRENCY", 64, _positive_int),
            token_delay_s=reader.get("TASKRING_LOCAL_TOKEN_DELAY_S", 0.02, _non_negative),
            shutdown_grace_s=reader.get("TASKRING_SHUTDOWN_GRACE_S", 10.0, _non_negative),
            log_level=reader.get("TASKRING_LOG_LEVEL", "INFO", _one_of(LOG_LEVELS)),
            log_format=reader.get("TASKRING_LOG_FORMAT", "json", _log_format),
            metrics_listen=_metrics_listen(env, reader, EXECUTOR_METRICS_LISTEN),
            tls=tls,
        )
        config_path = env.get("TASKRING_CONFIG", "")
        if config_path:
            file, problems = read_file_config(config_path)
            reader.problems.extend(problems)
            settings = replace(settings, file=file)
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.problems: list[str] = []

    def get(
        self,
        name: str,
        default: T,
        parse: Callable[[str], T],
        shown: Callable[[str], str] = str,
    ) -> T:
        """`shown` is how a bad value appears in the error (a URL without its password)."""
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            self.problems.append(f"{name}={shown(raw)!r}: {exc}")
            return default


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value >= 0:
        raise ValueError("must not be negative")
    return value


def _positive(raw: str) -> float:
    value = _non_negative(raw)
    if value == 0:
        raise ValueError("must be more than 0")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.upper() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw.upper()

    return parse


def _log_format(raw: str) -> str:
    if raw.lower() not in ("json", "text"):
        raise ValueError("expected json or text")
    return raw.lower()


def _host_port(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:50051 or [::1]:50051")
    return raw


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError("expected true or false")
    return value in {"true", "1", "yes"}


def is_loopback(listen: str) -> bool:
    """Whether host:port is reachable from this machine only."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or 0.0.0.0 / [::]: other machines may reach it


ROUTER_METRICS_LISTEN = "127.0.0.1:9464"
# Not the router's: `make run` and an executor started beside it must not clash.
EXECUTOR_METRICS_LISTEN = "127.0.0.1:9465"


def _metrics_listen(
    env: Mapping[str, str], reader: _Reader, default: str = ROUTER_METRICS_LISTEN
) -> str:
    """TASKRING_METRICS_LISTEN: host:port, or "" for off. Unlike other variables an empty
    value is not the default: `TASKRING_METRICS_LISTEN=` is how a shell says "none"."""
    if env.get("TASKRING_METRICS_LISTEN") == "":
        return ""
    return reader.get("TASKRING_METRICS_LISTEN", default, _host_port_or_off)


def _host_port_or_off(raw: str) -> str:
    return "" if raw.lower() == "off" else _host_port(raw)


def _store_url(raw: str) -> str:
    if raw.startswith(POSTGRESQL_SCHEMES):
        if not urllib.parse.urlsplit(raw).path.strip("/"):
            raise ValueError("name the database: postgresql://user@host:5432/database")
        return raw
    if raw == "sqlite:///:memory:":
        raise ValueError("an in-memory database is not durable; give a file path")
    if not raw.startswith("sqlite:///") or raw == "sqlite:///":
        raise ValueError(
            "expected sqlite:///relative/path.db, sqlite:////absolute/path.db"
            " or postgresql://user@host:5432/database"
        )
    return raw
