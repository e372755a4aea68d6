"""Builds ring members from configuration: the one place that knows every backend kind."""

from __future__ import annotations

from collections.abc import Mapping

from server.config import LocalExecutorSettings
from server.config_file import ANTHROPIC, LOCAL, OPENAI, REMOTE, BackendSpec, FileConfig
from server.observability import logs
from server.tls import ChannelTls

from .base import Backend
from .local import Handler, LocalBackend, LocalModelSettings, builtin_handlers
from .remote import RemoteBackend


class BackendConfigError(ValueError):
    """A configured member cannot be built (a missing key, a type without a handler)."""


def local_handlers(settings: LocalExecutorSettings) -> dict[str, Handler]:
    return builtin_handlers(LocalModelSettings(token_delay_s=settings.token_delay_s))


def default_backends(
    settings: LocalExecutorSettings, handlers: Mapping[str, Handler]
) -> dict[str, Backend]:
    """Without [[backends]] in a configuration file: `count` in-process executors named
    local-1, local-2, ..., each running every task type in `handlers`."""
    return {
        f"local-{i}": LocalBackend(f"local-{i}", handlers, settings.max_concurrency)
        for i in range(1, settings.count + 1)
    }


def build_backend(
    spec: BackendSpec,
    handlers: Mapping[str, Handler],
    environ: Mapping[str, str],
    file: FileConfig,
    remote_tls: ChannelTls | None = None,
) -> Backend:
    """One member from its spec. `handlers` are the task types in-process members run;
    `file` gives prices and the directory relative secret files are found in; `remote`
    members are dialled over TLS with `remote_tls`, in plaintext without. Raises
    ValueError (the message names the setting, never a secret) when it cannot be built."""
    if spec.kind == LOCAL:
        missing = spec.task_types - set(handlers)
        if missing:
            raise BackendConfigError(
                f"backend {spec.name}: no handler for task types {sorted(missing)}; "
                "add them under [task_types] or remove them from task_types"
            )
        served = {name: handlers[name] for name in spec.task_types}
        return LocalBackend(spec.name, served, spec.max_concurrency)
    if spec.kind == REMOTE:
        return RemoteBackend(
            spec.name,
            address=spec.address,
            max_concurrency=spec.max_concurrency,
            task_types=spec.task_types,
            credentials=None if remote_tls is None else remote_tls.credentials(),
        )
    if spec.kind in (OPENAI, ANTHROPIC):
        # Imported only when configured: the SDKs take ~1.5 s to import, which every
        # start of the embedded default (and every test server) would otherwise pay.
        from .anthropic_backend import AnthropicBackend
        from .openai_backend import OpenAIBackend
        from .providers import PriceTable

        api_key = _api_key(spec, environ, file)
        # Logging is process-wide: whoever logs the key (an SDK at DEBUG, an exception's
        # text), the line shows it redacted.
        logs.SECRETS.add(api_key)
        prices = PriceTable(file.prices)
        if spec.kind == OPENAI:
            return OpenAIBackend(
                spec.name,
                base_url=spec.base_url,
                api_key=api_key,
                max_concurrency=spec.max_concurrency,
                task_types=spec.task_types,
                timeout_s=spec.timeout_s,
                prices=prices,
            )
        return AnthropicBackend(
            spec.name,
            base_url=spec.base_url,
            api_key=api_key,
            max_concurrency=spec.max_concurrency,
            task_types=spec.task_types,
            timeout_s=spec.timeout_s,
            prices=prices,
            default_max_tokens=spec.default_max_tokens,
        )
    raise BackendConfigError(f"backend {spec.name}: unknown kind {spec.kind!r}")


async def close_backend(backend: Backend) -> None:
    """Closes what a backend holds open (channels, HTTP clients), if anything."""
    aclose = getattr(backend, "aclose", None)
    if aclose is not None:
        await aclose()


# Where a provider member's key is found when its configuration names no place.
DEFAULT_KEY_ENV = {OPENAI: "OPENAI_API_KEY", ANTHROPIC: "ANTHROPIC_API_KEY"}
# What an OpenAI-compatible server that checks no key (vLLM, Ollama, llama.cpp by
# default) is sent: the SDK insists on some key.
NO_KEY = "no-key"


def _api_key(spec: BackendSpec, environ: Mapping[str, str], file: FileConfig) -> str:
    env_var, key_file = spec.api_key_env, spec.api_key_file
    if not env_var and not key_file:
        if spec.kind == OPENAI and spec.base_url:
            return NO_KEY  # a self-hosted server; give api_key_env if yours wants a key
        env_var = DEFAULT_KEY_ENV[spec.kind]
    from .providers import read_api_key

    path = str(file.base_dir / key_file) if key_file else None
    try:
        return read_api_key(env_var, path, environ)
    except ValueError as exc:
        raise BackendConfigError(f"backend {spec.name}: {exc}") from None
