"""`kernel-provider run`: talk to a provider as QNTX does, for people trying the project by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc
from kernel_provider.server import PORT_LINE_PREFIX

LAUNCH_TIMEOUT_SECONDS = 60


class LaunchError(RuntimeError):
    pass


@contextmanager
def launched_provider(kernel: str) -> Iterator[str]:
    """Start a provider the way QNTX does (its port from the stdout line), yield HOST:PORT, stop it."""
    command = [
        sys.executable,
        "-m",
        "kernel_provider",
        "serve",
        "--port",
        "0",
        "--kernel",
        kernel,
        "--log-level",
        "warn",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith(PORT_LINE_PREFIX):
            process.wait(timeout=LAUNCH_TIMEOUT_SECONDS)
            raise LaunchError(f"the provider did not start (exit status {process.returncode})")
        target = f"127.0.0.1:{int(line[len(PORT_LINE_PREFIX) :])}"
        with grpc.insecure_channel(target) as channel:
            plugin = domain_pb2_grpc.DomainPluginServiceStub(channel)
            plugin.Metadata(domain_pb2.Empty(), timeout=LAUNCH_TIMEOUT_SECONDS)
            plugin.Initialize(domain_pb2.InitializeRequest(), timeout=LAUNCH_TIMEOUT_SECONDS)
            yield target
            plugin.Shutdown(domain_pb2.Empty(), timeout=LAUNCH_TIMEOUT_SECONDS)
        process.wait(timeout=LAUNCH_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=LAUNCH_TIMEOUT_SECONDS)


def execute(target: str, code: str, glyph_id: str, upstream: bytes) -> python_pb2.PythonExecuteResponse:
    with grpc.insecure_channel(target) as channel:
        return python_pb2_grpc.PythonServiceStub(channel).Execute(
            python_pb2.PythonExecuteRequest(code=code, glyph_id=glyph_id, upstream_attestation=upstream)
        )


def run_command(
    code: str, *, glyph_id: str, target: tuple[str, int] | None, kernel: str, upstream: bytes, as_json: bool
) -> int:
    from kernel_provider.cli import print_result

    try:
        if target is not None:
            response = execute(f"{target[0]}:{target[1]}", code, glyph_id, upstream)
        else:
            with launched_provider(kernel) as address:
                response = execute(address, code, glyph_id, upstream)
    except grpc.RpcError as exc:
        print(f"kernel-provider: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"kernel-provider: {exc}", file=sys.stderr)
        return 2
    print_result(json.loads(response.result), as_json)
    return 0 if response.success else 1
