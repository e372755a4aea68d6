"""Builds ring members from configuration: the one place that knows every backend kind."""

from __future__ import annotations

from collections.abc import Mapping

from server.config import LocalExecutorSettings
from server.config_file import LOCAL, REMOTE, BackendSpec

from .base import Backend
from .local import Handler, LocalBackend, LocalModelSettings, builtin_handlers
from .remote import RemoteBackend


def local_handlers(settings: LocalExecutorSettings) -> dict[str, Handler]:
    return builtin_handlers(LocalModelSettings(token_delay_s=settings.token_delay_s))


def default_backends(settings: LocalExecutorSettings) -> dict[str, Backend]:
    """Without a configuration file: `count` in-process executors named local-1, local-2, ..."""
    handlers = local_handlers(settings)
    return {
        f"local-{i}": LocalBackend(f"local-{i}", handlers, settings.max_concurrency)
        for i in range(1, settings.count + 1)
    }


def build_backend(
    spec: BackendSpec, handlers: Mapping[str, Handler], environ: Mapping[str, str]
) -> Backend:
    """One member from its spec. `handlers` are the task types in-process members run."""
    if spec.kind == LOCAL:
        missing = spec.task_types - set(handlers)
        if missing:
            raise ValueError(
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
        )
    raise ValueError(f"backend {spec.name}: unknown kind {spec.kind!r}")


async def close_backend(backend: Backend) -> None:
    """Closes what a backend holds open (channels, HTTP clients), if anything."""
    aclose = getattr(backend, "aclose", None)
    if aclose is not None:
        await aclose()
