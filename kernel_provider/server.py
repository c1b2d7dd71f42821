"""The grpc.aio server: bind (with QNTX's port retry), announce the port, serve until told to stop."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kernel_provider.config import Settings
from kernel_provider.plugin import DomainPluginServicer
from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc
from kernel_provider.provider import Provider
from kernel_provider.python_service import PythonServicer

log = logging.getLogger(__name__)

PORT_ATTEMPTS = 10
GRACE_SECONDS = 2.0
PORT_LINE_PREFIX = "QNTX_PLUGIN_PORT="


class BindError(OSError):
    pass


def bind(server: grpc.aio.Server, host: str, port: int, retry: bool = True) -> int:
    """Bind host:port, or with ``retry`` the next free port of the following nine, as QNTX plugins do.

    Port 0 asks the system for any free port (handy for tests and `kernel-provider run`).
    Without ``retry`` (an explicit --address) the address is used as given or refused.
    """
    attempts = PORT_ATTEMPTS if retry and port != 0 else 1
    for candidate in range(port, port + attempts):
        # Ask the system first: grpc would print its own error line for every taken port.
        if candidate and _taken(host, candidate):
            bound = 0
        else:
            address = f"[{host}]:{candidate}" if ":" in host else f"{host}:{candidate}"
            try:
                bound = server.add_insecure_port(address)
            except RuntimeError:
                bound = 0
        if bound:
            return bound
        if attempts > 1:
            log.info("port %d is taken, trying the next", candidate)
    if attempts == 1:
        hint = " (an explicit --address is used as given; --port tries the next nine)" if not retry else ""
        raise BindError(f"cannot listen on {host}:{port}: the address is taken or not this machine's{hint}")
    raise BindError(f"could not bind {host} on any port from {port} to {port + attempts - 1}")


def _taken(host: str, port: int) -> bool:
    """Whether binding host:port fails now (grpc binds with SO_REUSEADDR too, so we match it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # let grpc decide, and say why
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            # Any other failure (no IPv6 here, an address not ours) is grpc's to report.
    return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def announce(port: int) -> None:
    """The one line QNTX reads from our stdout; nothing else is ever printed there."""
    sys.stdout.write(f"{PORT_LINE_PREFIX}{port}\n")
    sys.stdout.flush()


async def serve(settings: Settings) -> int:
    provider = Provider(settings)
    # SO_REUSEPORT would let us bind a port another plugin already holds, and
    # QNTX's "port taken, try the next" protocol depends on that failing.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    domain_pb2_grpc.add_DomainPluginServiceServicer_to_server(DomainPluginServicer(provider), server)
    python_pb2_grpc.add_PythonServiceServicer_to_server(PythonServicer(provider), server)
    # The standard grpc.health.v1 service beside QNTX's own Health, and reflection so
    # that grpcurl-style tools can list and call our services.
    service_names = [
        domain_pb2.DESCRIPTOR.services_by_name["DomainPluginService"].full_name,
        python_pb2.DESCRIPTOR.services_by_name["PythonService"].full_name,
    ]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = bind(server, settings.host, settings.port, retry=settings.retry_port)
    if not is_loopback(settings.host):
        log.warning(
            "listening on %s, not loopback: anyone who can reach this machine on port %d can run code through "
            "Execute, with no authentication",
            settings.host,
            port,
        )
    await provider.sessions.start()
    provider.loop_lag.start()
    await server.start()
    # The kernelspec was checked before we got here, so kernels can start: we serve.
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, provider.request_stop)
    log.info("plugin %r serving on %s:%d with kernelspec %s", settings.name, settings.host, port, settings.kernel)
    announce(port)
    await provider.stopping.wait()
    # Refuse new runs, give the ones under way a moment to finish (then gRPC cancels
    # them), and only then stop the kernels, so that no run sees its kernel vanish.
    log.info("stopping: finishing runs under way, then shutting down every kernel")
    provider.sessions.close()
    await health_servicer.enter_graceful_shutdown()  # every service reports NOT_SERVING from now on
    await server.stop(GRACE_SECONDS)
    await provider.sessions.shutdown()
    provider.loop_lag.stop()
    log.info("stopped")
    return 0
