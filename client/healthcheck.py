"""`python -m client.healthcheck [--service NAME] [--timeout S] [host:port]`: one
`grpc.health.v1.Health/Check`, exit 0 when the service is SERVING and 1 otherwise.

Docker's HEALTHCHECK and compose run a command inside the container, and no
grpc_health_probe binary can be had offline, so the image probes itself with this module
and the grpcio-health-checking stubs it already ships. It asks what the kubelet's native
gRPC probe asks (Kubernetes needs no command): `""` is the process (liveness),
`taskring.v1.TaskService` the router's readiness, `taskring.v1.ExecutorService` an
executor's.

    python -m client.healthcheck                                   # router liveness
    python -m client.healthcheck --service taskring.v1.TaskService  # router readiness
    python -m client.healthcheck --service taskring.v1.ExecutorService 127.0.0.1:50061
    python -m client.healthcheck --cacert ca.pem localhost:50051      # a TLS router
    python -m client.healthcheck --cacert ca.pem --cert probe.pem --key probe.key ...  # mTLS

Exit codes follow Docker's HEALTHCHECK contract: 0 healthy, 1 unhealthy, and never 2
(which Docker reserves), not even for a bad command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._tls import Tls

DEFAULT_TARGET = "127.0.0.1:50051"
# Short, as a probe should be, but below Docker's and compose's usual 5 s HEALTHCHECK
# timeout: when the server is too slow, this command says so itself instead of being killed.
DEFAULT_TIMEOUT_S = 2.0
HEALTHY, UNHEALTHY = 0, 1


@dataclass(frozen=True, slots=True)
class HealthResult:
    """What one Check found."""

    # SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN when the server answered; the gRPC
    # status code (UNAVAILABLE, NOT_FOUND for an unregistered service, DEADLINE_EXCEEDED)
    # when the call failed.
    status: str
    detail: str = ""

    @property
    def is_serving(self) -> bool:
        return self.status == "SERVING"

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def check(
    target: str = DEFAULT_TARGET,
    service: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    tls: Tls | None = None,
) -> HealthResult:
    """Asks the health service at `target` (plaintext, or over `tls`) about `service`
    (`""`: the whole server). Blocking; the connection and the call together take at most
    `timeout_s`."""
    # A proxy named by http_proxy/grpc_proxy in the container's environment must not
    # stand between a probe and the server it probes.
    options = [("grpc.enable_http_proxy", 0)]
    channel = (
        grpc.insecure_channel(target, options=options)
        if tls is None
        else grpc.secure_channel(target, tls.channel_credentials(), options=options)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # Fail fast (no wait_for_ready): a refused connection is an answer, not a
            # reason to wait out the timeout.
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return HealthResult(exc.code().name, exc.details() or "")
    return HealthResult(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 on a usage error; Docker reserves 2, so report unhealthy.
        self.print_usage(sys.stderr)
        self.exit(UNHEALTHY, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one check; prints the result (Docker keeps it in `docker inspect`)."""
    parser = _Parser(
        prog="python -m client.healthcheck",
        description="Exit 0 when a taskring server's gRPC health service reports SERVING.",
    )
    parser.add_argument(
        "target",
        nargs="?",
        default=DEFAULT_TARGET,
        help=f"host:port of the server (default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--service",
        default="",
        help='health service name; "" (the default) asks about the whole process',
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"longest wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--cacert", metavar="FILE", help="PEM CA bundle: probe over TLS")
    parser.add_argument("--cert", metavar="FILE", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", metavar="FILE", help="PEM private key of --cert")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error("--timeout must be more than 0")
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together (mutual TLS): give both")
    tls = None
    if args.cacert or args.cert or args.key:
        try:
            tls = Tls.from_files(args.cacert, args.cert, args.key)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    result = check(args.target, args.service, args.timeout, tls)
    print(f"{args.target} service {args.service!r}: {result}")
    return HEALTHY if result.is_serving else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
