"""AdminService: shows the ring's members and changes them while the router runs."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from client._proto.taskring.v1 import admin_pb2 as apb
from client._proto.taskring.v1 import admin_pb2_grpc
from server.admission.auth import require_admin
from server.admission.gate import Gate
from server.admission.validate import clip, reportable, shown
from server.api.convert import timestamp_to_pb
from server.api.status import to_status
from server.backends.base import Backend
from server.backends.factory import close_backend
from server.backends.remote import RemoteBackend
from server.config_file import ANTHROPIC, OPENAI, BackendSpec, read_backend_table
from server.dispatch.circuit import CircuitState
from server.dispatch.members import Members, MembershipError, MemberView
from server.model.errors import FieldViolation, InvalidArgumentError, TaskringError

BuildBackend = Callable[[BackendSpec], Backend]
KEYED_KINDS = frozenset({OPENAI, ANTHROPIC})

_CIRCUIT_TO_PB = {
    CircuitState.CLOSED: apb.CIRCUIT_STATE_CLOSED,
    CircuitState.OPEN: apb.CIRCUIT_STATE_OPEN,
    CircuitState.HALF_OPEN: apb.CIRCUIT_STATE_HALF_OPEN,
}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Every call needs an admin's API key (when keys are configured)."""

    def __init__(self, members: Members, build: BuildBackend, gate: Gate) -> None:
        self._members = members
        self._build = build
        self._gate = gate
        # Specs of members this router knows how to describe (configured or added here).
        self.specs: dict[str, BackendSpec] = {}

    async def _admitted(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        try:
            require_admin(self._gate.identify(context))
        except TaskringError as exc:
            await context.abort_with_status(to_status(exc))

    async def ListBackends(  # noqa: N802 - the proto's method names
        self, request: apb.ListBackendsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> apb.ListBackendsResponse:
        await self._admitted(context)
        return apb.ListBackendsResponse(
            backends=[self._status(view) for view in self._members.views()]
        )

    async def AddBackend(  # noqa: N802
        self, request: apb.AddBackendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> apb.AddBackendResponse:
        await self._admitted(context)
        config = request.backend
        table: dict[str, object] = {"name": config.name, "kind": config.kind}
        for key in ("address", "base_url", "api_key_env"):
            if value := getattr(config, key):
                table[key] = value
        if config.weight:
            table["weight"] = config.weight
        if config.max_concurrency:
            table["max_concurrency"] = config.max_concurrency
        if config.task_types:
            table["task_types"] = list(config.task_types)
        spec, problems = read_backend_table(table, "backend")
        if spec is None:
            # Each problem reads "backend.field: what to fix": sent as BadRequest field
            # violations, as TaskService's INVALID_ARGUMENT are (same message text).
            violations = [FieldViolation(*problem.split(": ", 1)) for problem in problems]
            await context.abort_with_status(
                to_status(InvalidArgumentError(reportable(violations, "backend")))
            )
        if spec.kind in KEYED_KINDS:
            # Without authentication (issue 4) anyone who reaches this port could point one
            # of the router's API keys at an address of their choosing.
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{spec.kind} members hold API keys: add them in the configuration file "
                "(TASKRING_CONFIG) and restart; AdminService adds local and remote members",
            )
        if spec.name in self._members.backends:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"a backend named {shown(spec.name)} is on the ring"
            )
        try:
            backend = self._build(spec)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, _message(exc))
        try:
            self._members.add(backend, spec.weight)
        except MembershipError as exc:
            await close_backend(backend)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, _message(exc))
        self.specs[spec.name] = spec
        return apb.AddBackendResponse(backend=self._status(self._members.view(spec.name)))

    async def DrainBackend(  # noqa: N802
        self, request: apb.DrainBackendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> apb.DrainBackendResponse:
        await self._admitted(context)
        try:
            self._members.drain(request.name)
            view = self._members.view(request.name)
        except MembershipError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, _message(exc))
        return apb.DrainBackendResponse(backend=self._status(view))

    async def ResumeBackend(  # noqa: N802
        self, request: apb.ResumeBackendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> apb.ResumeBackendResponse:
        await self._admitted(context)
        try:
            self._members.resume(request.name)
            view = self._members.view(request.name)
        except MembershipError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, _message(exc))
        return apb.ResumeBackendResponse(backend=self._status(view))

    async def RemoveBackend(  # noqa: N802
        self, request: apb.RemoveBackendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> apb.RemoveBackendResponse:
        await self._admitted(context)
        try:
            view = await self._members.remove(request.name)
        except MembershipError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, _message(exc))
        self.specs.pop(request.name, None)
        return apb.RemoveBackendResponse(backend=self._status(view))

    def _status(self, view: MemberView) -> apb.BackendStatus:
        status = view.status
        spec = self.specs.get(status.name)
        message = apb.BackendStatus(
            config=apb.BackendConfig(
                name=status.name,
                kind=spec.kind if spec else _kind(view.backend),
                address=spec.address if spec else "",
                base_url=(spec.base_url or "") if spec else "",
                weight=status.weight,
                max_concurrency=status.max_concurrency,
                task_types=sorted(status.task_types),
                api_key_env=(spec.api_key_env or "") if spec else "",
            ),
            health=apb.HEALTH_STATE_HEALTHY if view.health_ok else apb.HEALTH_STATE_UNHEALTHY,
            circuit=_CIRCUIT_TO_PB[view.circuit],
            consecutive_failures=view.consecutive_failures,
            draining=status.draining,
            in_flight=status.load,
            available=status.available,
        )
        if status.held_until is not None:
            message.held_until.CopyFrom(timestamp_to_pb(status.held_until))
        return message


def _message(error: Exception) -> str:
    """The error's message, which may quote a name the client sent (of any length): kept
    short enough for the trailers, which grpc clients drop past 8 KiB."""
    return clip(str(error), 300)


def _kind(backend: Backend) -> str:
    """The kind of a member built without a spec (the default local executors, tests)."""
    return "remote" if isinstance(backend, RemoteBackend) else "local"
