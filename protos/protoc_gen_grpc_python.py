"""A protoc plugin that writes gRPC Python stubs (`*_pb2_grpc.py`) for `buf generate`.

gRPC's own generator exists only inside grpcio-tools' bundled protoc (`--grpc_python_out`);
no `protoc-gen-grpc_python` binary ships on PyPI, and buf runs as builtins only the
generators of protoc itself (python, pyi, ...). So this plugin takes buf's
CodeGeneratorRequest, hands its descriptors to that bundled protoc
(`--descriptor_set_in`, nothing is parsed twice) and returns what it wrote.
buf.gen.yaml runs it as `local: [.venv/bin/python, protos/protoc_gen_grpc_python.py]`;
a buf `opt` is passed on as the generator's parameter (e.g. `grpc_2_0`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    """Runs `--grpc_python_out` on the request's files; errors go into the response."""
    response = plugin_pb2.CodeGeneratorResponse(
        # Without this flag buf refuses to run a plugin on files with proto3 `optional`.
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL,
    )
    with tempfile.TemporaryDirectory(prefix="protoc-gen-grpc_python-") as tmp:
        descriptors = Path(tmp) / "descriptors.binpb"
        # proto_file holds every file the ones to generate import, as protoc needs them.
        descriptors.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        out = Path(tmp) / "out"
        out.mkdir()
        target = f"{request.parameter}:{out}" if request.parameter else str(out)
        # protoc prints its own diagnostics on stderr, which buf shows with the error.
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--descriptor_set_in={descriptors}",
                f"--grpc_python_out={target}",
                *request.file_to_generate,
            ]
        )
        if status != 0:
            response.error = f"grpc_tools.protoc --grpc_python_out exited {status}"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text())
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
