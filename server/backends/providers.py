"""What the provider backends (OpenAI, Anthropic) share: prices, API keys, and the one table
that turns a provider's failure into a BackendError.

How a failure reaches the router (code, whether another attempt may succeed, whether it
counts towards the backend's circuit breaker):

    HTTP 429                      RATE_LIMITED         retryable  no fault  retry_after_s from
                                                                            retry-after(-ms)
    HTTP 401, 403                 BACKEND_AUTH_FAILED  final      fault     its key is wrong
    HTTP 402                      BACKEND_UNAVAILABLE  retryable  fault     its account cannot pay
    HTTP 408, 409, 5xx, 529       BACKEND_UNAVAILABLE  retryable  fault
    refused, reset, cut stream    BACKEND_UNAVAILABLE  retryable  fault
    no answer within timeout_s    BACKEND_TIMEOUT      retryable  fault
    other 4xx (400, 404, 422...)  INVALID_REQUEST      final      no fault  says what to fix

A rejected key is final although another member might hold a good one: retrying would
hide a misconfiguration behind a slower success, and the breaker takes the member out.

Keys never leave this process in an error: providers sometimes echo a rejected key in
their error body, so every message built here goes through `Redactor` first, and the
SDK's own exception (whose message and request carry the key) is never chained.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import ClassVar, Protocol

import aiohttp
import httpx2

from server.clock import Clock, SystemClock
from server.model.task import Task, Usage

from .base import BackendBase, BackendError

# A provider asking for a longer pause than this is misbehaving; the router would otherwise
# leave a healthy member idle for hours on one bad header.
MAX_RETRY_AFTER_S = 600.0
# Provider messages can quote a whole prompt back; the task's error needs the gist.
MAX_MESSAGE_CHARS = 500
REDACTED = "[REDACTED]"


class ApiKeyError(ValueError):
    """An API key is not configured where the configuration says it is."""


def read_api_key(env_var: str | None, file: str | None, environ: Mapping[str, str]) -> str:
    """The key from the environment variable `env_var` or the file `file` (one of them).

    Errors name the variable or file, never the value: they end up in start-up logs."""
    if env_var and file:
        raise ApiKeyError("set an API key variable or an API key file, not both")
    if env_var:
        where = f"environment variable {env_var}"
        if env_var not in environ:
            raise ApiKeyError(f"{where} is not set")
        key = environ[env_var]
    elif file:
        where = f"API key file {file}"
        try:
            key = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ApiKeyError(f"cannot read {where}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ApiKeyError(f"{where} is not UTF-8 text") from None
    else:
        raise ApiKeyError("no API key configured: set an API key variable or file")
    # Files written by `echo` or secret managers end with a newline; keys never contain
    # whitespace, and one inside would be sent as a broken header.
    key = key.strip()
    if not key:
        raise ApiKeyError(f"{where} is empty")
    if any(c.isspace() for c in key):
        raise ApiKeyError(f"{where} holds more than one line or word; expected one key")
    return key


class Redactor:
    """Removes an API key, and truncated echoes of it, from text meant for people.

    Providers quote rejected keys whole ("Incorrect API key provided: sk-...") or cut
    ("sk-proj-abcd...wxyz"): any word that contains the key's first or last 12 characters
    goes too. Below 24 characters only the whole key goes, and below 8 (the "ollama" a
    local server ignores) only where it stands alone, or common words would vanish."""

    _AFFIX = 12

    def __init__(self, secret: str) -> None:
        # A "word" is a run of the characters keys are made of, plus the mask characters
        # providers put in the middle of a truncated one.
        word = r"[\w\-.~+/=*]*"
        if len(secret) >= 2 * self._AFFIX:
            affixes = (secret[: self._AFFIX], secret[-self._AFFIX :])
            pattern = f"{re.escape(secret)}|{word}(?:{'|'.join(map(re.escape, affixes))}){word}"
        elif len(secret) >= 8:
            pattern = re.escape(secret)
        else:
            pattern = rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])"
        self._pattern = re.compile(pattern) if secret else None

    def __repr__(self) -> str:
        return "Redactor(<hidden>)"

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern is not None else text


class Price(Protocol):
    """USD per million tokens of one model (server.config_file.ModelPrice is one)."""

    @property
    def input_usd_per_mtok(self) -> float: ...

    @property
    def output_usd_per_mtok(self) -> float: ...


class PriceTable:
    """What a model's tokens cost, for Usage.cost_usd. Unknown models cost 0.0: a price
    list that lags a provider's new model must not fail the tasks that use it."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices = {
            model: (price.input_usd_per_mtok, price.output_usd_per_mtok)
            for model, price in (prices or {}).items()
        }

    def __repr__(self) -> str:
        return f"PriceTable({sorted(self._prices)})"

    def cost(self, model: str, usage: Usage) -> float:
        per_input, per_output = self._prices.get(model, (0.0, 0.0))
        return (usage.input_tokens * per_input + usage.output_tokens * per_output) / 1e6

    def priced(self, models: Iterable[str], input_tokens: int, output_tokens: int) -> Usage:
        """Usage with its cost, from the first of `models` (asked, then answered) with a
        price: a provider may answer "gpt-4o-mini" with "gpt-4o-mini-2024-07-18"."""
        usage = Usage(input_tokens, output_tokens)
        model = next((m for m in models if m in self._prices), "")
        return Usage(input_tokens, output_tokens, self.cost(model, usage))


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` in seconds or as an HTTP
    date (RFC 9110 10.2.3); None when absent or unreadable. `headers` must look names up
    case-insensitively, as the SDKs' httpx2.Headers do."""
    delay = _number(headers.get("retry-after-ms"))
    if delay is not None:
        delay /= 1000
    else:
        raw = headers.get("retry-after")
        delay = _number(raw)
        if delay is None and raw is not None:
            date = email.utils.parsedate_tz(raw)
            delay = None if date is None else email.utils.mktime_tz(date) - now
    if delay is None:
        return None
    return min(max(delay, 0.0), MAX_RETRY_AFTER_S)


def _number(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return None if math.isnan(value) else value


def provider_message(body: object, fallback: str) -> str:
    """The human part of a provider's error body.

    OpenAI's SDK hands over {"message": ...}, Anthropic's {"error": {"message": ...}};
    anything else (an HTML page from a proxy) becomes its first line."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    if isinstance(body, str) and body.strip():
        return body.strip().splitlines()[0]
    return fallback


class ProviderErrors:
    """Builds the BackendErrors of one backend: its name in every message, its key out."""

    def __init__(self, backend: str, redact: Redactor, clock: Clock) -> None:
        self._backend = backend
        self._redact = redact
        self._clock = clock

    def _text(self, message: str) -> str:
        message = self._redact(message)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        return message

    def status(
        self, status: int, message: str, headers: Mapping[str, str], *, what: str = ""
    ) -> BackendError:
        """The provider answered with HTTP `status` and `message` (its words). `what` names
        the failure when it was not an HTTP status (an error event inside a stream)."""
        said = self._text(message)
        name = self._backend
        what = what or f"HTTP {status}"
        if status == 429:
            return BackendError(
                "RATE_LIMITED",
                f"backend {name} is rate limited ({what}): {said}",
                retryable=True,
                retry_after_s=parse_retry_after(headers, self._clock.now()),
            )
        if status in (401, 403):
            return BackendError(
                "BACKEND_AUTH_FAILED",
                f"backend {name}'s credentials were rejected ({what}); check its API key: {said}",
                retryable=False,
                backend_fault=True,
            )
        if status in (402, 408, 409) or status >= 500:
            return self.unavailable(f"{what}: {message}")
        return BackendError(
            "INVALID_REQUEST",
            f"the provider behind backend {name} rejected the request ({what}): {said}",
            retryable=False,
        )

    def unavailable(self, detail: str) -> BackendError:
        return BackendError(
            "BACKEND_UNAVAILABLE",
            f"backend {self._backend} failed: {self._text(detail)}",
            retryable=True,
            backend_fault=True,
        )

    def timeout(self, timeout_s: float) -> BackendError:
        return BackendError(
            "BACKEND_TIMEOUT",
            f"backend {self._backend} sent nothing for {timeout_s:g}s",
            retryable=True,
            backend_fault=True,
        )

    def connection(self, base_url: str, cause: BaseException | None) -> BackendError:
        """The connection failed, or broke while a response was read. `cause` is the
        HTTP client's error; only its class is shown (its text may quote the request)."""
        why = f" ({type(cause).__name__})" if cause is not None else ""
        return self.unavailable(f"the connection to {base_url} failed or broke{why}")

    def incomplete(self) -> BackendError:
        return self.unavailable("the stream ended before the reply was finished")


def transport_error(exc: BaseException) -> BaseException:
    """The HTTP library's own error under an SDK's (the last of its causes)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def timed_out(exc: BaseException) -> bool:
    """Whether a call that failed with one of the SDK's or httpx's timeout errors really ran
    out of time. The SDKs' aiohttp transport reports every aiohttp connection error as
    httpx's ConnectTimeout, a refused connection too; aiohttp's timeouts are TimeoutErrors."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientError):
            return isinstance(cause, TimeoutError)
        cause = cause.__cause__
    return True


def validate_task_types(kind: str, wanted: frozenset[str], supported: frozenset[str]) -> None:
    """Refuses a configuration that puts a provider on the ring for work it cannot do."""
    if not wanted:
        raise ValueError(f"a {kind} backend needs at least one task type")
    if extra := wanted - supported:
        raise ValueError(f"a {kind} backend runs {sorted(supported)}, not {sorted(extra)}")


class ProviderMember(BackendBase):
    """What the provider backends share: identity, limits, prices and error translation.
    A subclass names its `kind` and `supported` task types and builds its SDK client."""

    kind: ClassVar[str]
    supported: ClassVar[frozenset[str]]

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str,
        max_concurrency: int,
        task_types: frozenset[str],
        timeout_s: float,
        prices: PriceTable,
        clock: Clock | None,
    ) -> None:
        super().__init__(name, max_concurrency, task_types)
        if not timeout_s > 0:
            raise ValueError("timeout_s must be more than 0")
        if not api_key:
            raise ValueError(
                f"backend {name}: an API key is required (servers that ignore it take any)"
            )
        validate_task_types(self.kind, task_types, self.supported)
        self._timeout_s = timeout_s
        self._prices = prices
        self._errors = ProviderErrors(name, Redactor(api_key), clock or SystemClock())
        # Explicit (the subclass passes its provider's URL when none is configured), so
        # that OPENAI_BASE_URL or ANTHROPIC_BASE_URL in the server's environment cannot
        # redirect requests, and the key, somewhere the configuration does not say.
        self.base_url = base_url

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self._name!r}, base_url={self.base_url!r})"

    def _connection_limits(self) -> httpx2.Limits:
        # One pooled connection per attempt the dispatcher may run: the SDKs' default keeps
        # only 100 alive, and a busy member would reconnect for every request.
        return httpx2.Limits(
            max_connections=self._max_concurrency,
            max_keepalive_connections=self._max_concurrency,
        )

    def _unsupported(self, task: Task) -> BackendError | None:
        if task.spec.type in self._task_types:
            return None
        return BackendError(
            "UNSUPPORTED",
            f"backend {self._name} does not run tasks of type {task.spec.type!r}",
            retryable=True,
        )
