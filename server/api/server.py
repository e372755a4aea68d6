"""Builds the grpc.aio server: TaskService, AdminService, health (liveness and readiness)
and reflection."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from client._proto.taskring.v1 import admin_pb2, tasks_pb2
from server.observability.tracing import ServerTracing, Tracing

from .admin import AdminServicer
from .servicer import ENCODED_REPLIES, TaskServicer

TASK_SERVICE = tasks_pb2.DESCRIPTOR.services_by_name["TaskService"]
# Readiness probes ask for this name; liveness asks for "" (the whole process).
READINESS_SERVICE = TASK_SERVICE.full_name
LIVENESS_SERVICE = ""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Imported so grpcurl can print google.rpc details (BadRequest, RetryInfo) as JSON.
from google.rpc import error_details_pb2  # noqa: E402, F401

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]


class _ClientWentAway(logging.Filter):
    """Demotes grpc's ERROR, with traceback, for a streaming call whose client went away
    while a message to it was being sent ("ExecuteBatchError raised in core by servicer
    method"): a watcher closing its Stream is not the server's error, and a hundred of them
    leaving at once would bury real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.getMessage().startswith(
            "ExecuteBatchError raised in core"
        ):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_CLIENT_WENT_AWAY = _ClientWentAway()


def new_server(tracing: Tracing | None = None) -> grpc.aio.Server:
    """A grpc.aio server with the options every taskring process (router, executor) uses;
    with `tracing`, a span per RPC it samples (without, no interceptor: nothing to pay per
    call)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if _CLIENT_WENT_AWAY not in grpc_log.filters:
        grpc_log.addFilter(_CLIENT_WENT_AWAY)
    return grpc.aio.server(
        interceptors=[ServerTracing(tracing)] if tracing is not None else None,
        options=[
            # gRPC sets SO_REUSEPORT by default: a second server on a busy port would
            # silently "succeed" and share it. Fail loudly instead.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )


def add_service(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    encoded_replies: frozenset[str] = frozenset(),
) -> None:
    """Serves `service`'s methods from `servicer`'s methods of the same names, as the
    generated add_<Service>Servicer_to_server would, with two differences:

    - the replies of the methods in `encoded_replies` are sent as the servicer encoded
      them (bytes);
    - the methods are added as a generic handler only, not also as "registered methods".
      grpcio's aio server keeps one pending request per registered method and, for every
      call it takes, waits on all of them again (asyncio.wait). With the router's 17 that
      is 19 futures instead of 2: 25-28 µs of event-loop time per call instead of 13-14
      (measured alone), ~5% of what a refused call costs the loop, paid by every call of
      a flooding client. A generic handler is one dict lookup. (Reflection, added by its
      own package, keeps its one registered method.)

    A method in the proto without its servicer method fails here, at start."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        if method.client_streaming:
            raise TypeError(f"{service.name}.{method.name}: no handler for client streaming")
        request = GetMessageClass(method.input_type)
        reply = GetMessageClass(method.output_type)
        handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = handler(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=None if method.name in encoded_replies else reply.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def build_server(
    servicer: TaskServicer,
    health_servicer: health.aio.HealthServicer,
    admin: AdminServicer,
    tracing: Tracing | None = None,
) -> grpc.aio.Server:
    server = new_server(tracing)
    add_service(server, TASK_SERVICE, servicer, ENCODED_REPLIES)
    add_service(server, HEALTH_SERVICE, health_servicer)
    add_service(server, ADMIN_SERVICE, admin)
    reflection.enable_server_reflection(
        (
            READINESS_SERVICE,
            ADMIN_SERVICE.full_name,
            HEALTH_SERVICE.full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server
