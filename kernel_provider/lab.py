"""Inspecting glyph kernels: `kernel-provider kernels` lists them, `kernel-provider lab` opens JupyterLab on them.

Both go through the standard connection files the provider keeps in its connection
folder (one per live glyph kernel, labelled `kernel_provider: {plugin, glyph_id}`),
so they work whatever transport the kernels use. JupyterLab sees the files as
jupyter_server's *external kernels*: it can run code on them, and a kernel manager
of ours refuses to shut them down or restart them, since the provider owns them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from kernel_provider.config import Settings
from kernel_provider.connection_dir import ConnectionDirError, claim_connection_dir

DEFAULT_LAB_PORT = 8888
INSTALL_HINT = (
    "JupyterLab is not installed here: run ./dev kernel-provider lab from the clone, or pip install '.[lab]' "
    "there, and run again."
)
CONSOLE_HINT = (
    "jupyter_console is not installed here, so the attach lines need it first: pip install '.[lab]' "
    "from the clone (./dev kernel-provider lab installs it too)."
)
LABEL = "kernel_provider"


def default_connection_dir(name: str) -> Path:
    """The folder a provider named ``name`` uses when not given --connection-dir."""
    return Settings(name=name).resolved_connection_dir()


def jupyter_program() -> str:
    """`jupyter`, or its full path when the one next to our Python is not the one on PATH (a ./dev venv)."""
    ours = Path(sys.executable).parent / "jupyter"
    on_path = shutil.which("jupyter")
    if ours.is_file() and (on_path is None or Path(on_path).resolve() != ours.resolve()):
        return shlex.quote(str(ours))
    return "jupyter"


def console_installed() -> bool:
    return importlib.util.find_spec("jupyter_console") is not None


def attach_command(connection_file: str | None) -> str:
    """Jupyter's own way to attach a terminal console to a running kernel."""
    if not connection_file:
        return ""
    return f"{jupyter_program()} console --existing {shlex.quote(connection_file)}"


# ---------------------------------------------------------------------------- kernels


def kernels_from_files(connection_dir: Path) -> list[dict[str, Any]]:
    """The glyph kernels whose labelled connection files are in ``connection_dir``."""
    found = []
    for path in sorted(connection_dir.glob("*.json")) if connection_dir.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file being replaced, or not ours
        label = info.get(LABEL) if isinstance(info, dict) else None
        if not isinstance(label, dict) or not label.get("glyph_id"):
            continue  # not a glyph kernel (a run without a glyph, or another program's file)
        found.append(
            {
                "glyph_id": label["glyph_id"],
                "kernel_name": info.get("kernel_name", ""),
                "execution_state": "unknown",
                "connection_file": str(path),
            }
        )
    return found


def kernels_from_provider(target: str) -> list[dict[str, Any]]:
    """The glyph kernels a running provider reports on `GET /kernels` (through HandleHTTP)."""
    import grpc

    from kernel_provider.proto import domain_pb2, domain_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = domain_pb2_grpc.DomainPluginServiceStub(channel)
        response = stub.HandleHTTP(domain_pb2.HTTPRequest(method="GET", path="/kernels"), timeout=30)
    body = json.loads(response.body or b"{}")
    if response.status_code != 200:
        raise RuntimeError(f"GET /kernels answered {response.status_code}: {body.get('error', body)}")
    return [
        {key: kernel.get(key) for key in ("glyph_id", "kernel_name", "execution_state", "connection_file")}
        for kernel in body.get("kernels", [])
    ]


def print_kernels(kernels: list[dict[str, Any]], as_json: bool) -> None:
    for kernel in kernels:
        kernel["attach"] = attach_command(kernel.get("connection_file"))
    if as_json:
        print(json.dumps(kernels, indent=2))
        return
    rows = [("GLYPH", "KERNELSPEC", "STATE", "ATTACH")]
    rows += [(k["glyph_id"], k["kernel_name"] or "", k["execution_state"] or "", k["attach"] or "-") for k in kernels]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])


def kernels_command(args: argparse.Namespace) -> int:
    if args.target is not None:
        import grpc

        target = f"{args.target[0]}:{args.target[1]}"
        try:
            kernels = kernels_from_provider(target)
        except grpc.RpcError as exc:
            print(
                f"kernel-provider: no provider answered at {target}: {exc.code().name}: {exc.details()}",
                file=sys.stderr,
            )
            return 2
        except (RuntimeError, ValueError) as exc:
            print(f"kernel-provider: {exc}", file=sys.stderr)
            return 2
    else:
        connection_dir = args.connection_dir or default_connection_dir(args.name)
        if not connection_dir.is_dir():
            print(f"kernel-provider: no connection folder {connection_dir}: is the provider running?", file=sys.stderr)
        kernels = kernels_from_files(connection_dir)
    print_kernels(kernels, args.json)
    if kernels and not console_installed():
        print(f"kernel-provider: {CONSOLE_HINT}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- lab


def glyph_kernel_manager_class():
    """jupyter_server's kernel manager, except that it never stops or restarts a provider's kernel.

    jupyter_client already makes shutting down an external kernel a no-op, but
    jupyter_server then forgets the kernel while its file stays, and lists fail once
    the file goes. Refusing keeps JupyterLab's list true; kernels JupyterLab starts
    itself (a notebook's) are its own and behave as usual.
    """
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
    from tornado import web

    class GlyphKernelManager(AsyncMappingKernelManager):
        def _is_glyph_kernel(self, kernel_id: str) -> bool:
            return kernel_id in getattr(self, "kernel_id_to_connection_file", {})

        def _is_spare(self, kernel_id: str) -> bool:
            # A kernel the provider started ahead of need, not yet any glyph's: code run on it
            # now would greet the glyph that gets it, so JupyterLab is not shown it.
            path = getattr(self, "kernel_id_to_connection_file", {}).get(kernel_id)
            try:
                label = json.loads(path.read_text()).get(LABEL) if path is not None else None
            except (OSError, ValueError, AttributeError):
                return False
            return isinstance(label, dict) and not label.get("glyph_id")

        def list_kernel_ids(self):
            return [kid for kid in super().list_kernel_ids() if not self._is_spare(kid)]

        def list_kernels(self):
            return [model for model in super().list_kernels() if not self._is_spare(model["id"])]

        def _refuse(self, kernel_id: str, what: str) -> None:
            path = self.kernel_id_to_connection_file[kernel_id]
            raise web.HTTPError(
                403,
                f"kernel {kernel_id} ({path.name}) belongs to kernel_provider, which alone may {what} it: "
                f"use the provider's POST /kernels/{{glyph_id}}/restart or DELETE /kernels/{{glyph_id}}",
            )

        async def _async_shutdown_kernel(self, kernel_id, now=False, restart=False):
            if self._is_glyph_kernel(kernel_id):
                self._refuse(kernel_id, "stop")
            return await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)

        shutdown_kernel = _async_shutdown_kernel

        async def _async_restart_kernel(self, kernel_id, now=False):
            if self._is_glyph_kernel(kernel_id):
                self._refuse(kernel_id, "restart")
            return await super()._async_restart_kernel(kernel_id, now=now)

        restart_kernel = _async_restart_kernel

        async def _async_shutdown_all(self, now=False):
            # On exit, stop only the kernels JupyterLab started; glyph kernels are the provider's.
            owned = [kid for kid in self.list_kernel_ids() if not self._is_glyph_kernel(kid)]
            for kernel_id in owned:
                await self._async_shutdown_kernel(kernel_id, now=now)

        shutdown_all = _async_shutdown_all

    return GlyphKernelManager


def refuse_glyph_restarts(server) -> None:
    """Answer JupyterLab's restart of a glyph kernel with the same clear 403 as its shut down.

    jupyter_server turns any failure of restart_kernel into a bare 500 "Exception restarting
    kernel"; a handler of ours for that one route, matched before jupyter_server's, says why.
    """
    from jupyter_server.auth.decorator import authorized
    from jupyter_server.services.kernels.handlers import KernelActionHandler, _kernel_id_regex
    from jupyter_server.utils import url_path_join
    from tornado import web

    class GlyphKernelActionHandler(KernelActionHandler):
        @web.authenticated
        @authorized
        async def post(self, kernel_id, action):
            manager = self.kernel_manager
            if action == "restart" and kernel_id in getattr(manager, "kernel_id_to_connection_file", {}):
                manager._refuse(kernel_id, "restart")
            return await super().post(kernel_id, action)

    route = url_path_join(server.base_url, rf"/api/kernels/{_kernel_id_regex}/(?P<action>restart)")
    # Tornado matches rules added later before its catch-all host rule, that is before the defaults.
    server.web_app.add_handlers(".*$", [(route, GlyphKernelActionHandler)])


def lab_argv(connection_dir: Path, port: int, token: str, open_browser: bool) -> list[str]:
    """ServerApp settings that show the glyph kernels as running kernels and never stop them."""
    argv = [
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.open_browser={open_browser}",
        "--ServerApp.allow_external_kernels=True",
        f"--ServerApp.external_connection_dir={connection_dir}",
        # Neither idle culling nor an idle server shutdown: the kernels are the provider's.
        "--MappingKernelManager.cull_idle_timeout=0",
        "--ServerApp.shutdown_no_activity_timeout=0",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # jupyter_server refuses root unless told; this server listens on loopback with a token.
        argv.append("--ServerApp.allow_root=True")
    return argv


def lab_command(args: argparse.Namespace) -> int:
    try:
        from jupyterlab.labapp import LabApp
    except ImportError:
        print(f"kernel-provider: {INSTALL_HINT}", file=sys.stderr)
        return 2

    if args.gateway_url:
        return lab_on_gateway(LabApp, args)
    try:
        connection_dir = claim_connection_dir(
            (args.connection_dir or default_connection_dir(args.name)).resolve(), default=args.connection_dir is None
        )
    except ConnectionDirError as exc:
        print(f"kernel-provider: {exc}", file=sys.stderr)
        return 2
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_urlsafe(32)
    argv = lab_argv(connection_dir, args.port, token, open_browser=not args.no_browser)
    server = LabApp.initialize_server(argv=argv, kernel_manager_class=glyph_kernel_manager_class())
    refuse_glyph_restarts(server)
    print(f"kernel-provider: glyph kernels of {connection_dir}", file=sys.stderr)
    print(f"JupyterLab: http://127.0.0.1:{server.port}/lab?token={token}", flush=True)
    server.start()
    return 0


def gateway_kernel_manager_class() -> type:
    """jupyter_server's gateway kernel manager, showing every kernel on the gateway (the glyphs' too).

    Its own lists only the kernels this server started; a kernel it does not know yet is taken
    up by id, which attaches to the running kernel rather than starting one.
    """
    from jupyter_server.gateway.managers import GatewayMappingKernelManager, gateway_request
    from tornado.escape import json_decode

    class GlyphGatewayKernelManager(GatewayMappingKernelManager):
        async def list_kernels(self, **kwargs):
            response = await gateway_request(self.kernels_url, method="GET")
            for model in json_decode(response.body):
                if model["id"] not in self._kernels:
                    await self.start_kernel(kernel_id=model["id"])
            return await super().list_kernels(**kwargs)

        async def shutdown_all(self, now: bool = False) -> None:
            """Stopping JupyterLab leaves every gateway kernel running: they are the glyphs'."""

    return GlyphGatewayKernelManager


def lab_on_gateway(lab_app, args: argparse.Namespace) -> int:
    """JupyterLab on the provider's gateway: jupyter_server's own gateway client lists its kernels.

    The glyph kernels are the gateway's, so JupyterLab sees them as running kernels with no
    connection files; unlike the local case, its shutdown button stops one on the gateway.
    """
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_urlsafe(32)
    argv = [
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={args.port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.open_browser={not args.no_browser}",
        f"--GatewayClient.url={args.gateway_url}",
        *([f"--GatewayClient.auth_token={args.gateway_token}"] if args.gateway_token else []),
        "--ServerApp.shutdown_no_activity_timeout=0",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--ServerApp.allow_root=True")
    server = lab_app.initialize_server(argv=argv, kernel_manager_class=gateway_kernel_manager_class())
    print(f"kernel-provider: glyph kernels on the gateway {args.gateway_url}", file=sys.stderr)
    print(f"JupyterLab: http://127.0.0.1:{server.port}/lab?token={token}", flush=True)
    server.start()
    return 0


def add_inspect_parsers(commands) -> None:
    """Register `kernels` and `lab` on `kernel-provider`'s subcommands."""
    name_help = "plugin name, for the default connection folder <jupyter runtime dir>/kernel_provider/NAME"

    kernels_parser = commands.add_parser("kernels", help="list a provider's live glyph kernels and how to attach")
    source = kernels_parser.add_mutually_exclusive_group()
    source.add_argument("--target", type=_host_port, help="HOST:PORT of a running provider (asks its GET /kernels)")
    source.add_argument("--connection-dir", type=Path, help="read the connection files in this folder instead")
    kernels_parser.add_argument("--name", default="python", help=name_help)
    kernels_parser.add_argument("--json", action="store_true", help="print JSON")
    kernels_parser.set_defaults(handler=kernels_command)

    lab_parser = commands.add_parser("lab", help="JupyterLab on 127.0.0.1 with the glyph kernels as running kernels")
    lab_parser.add_argument("--connection-dir", type=Path, help="the provider's connection folder")
    lab_parser.add_argument("--port", type=int, default=DEFAULT_LAB_PORT, help="port (taken: the next ones are tried)")
    lab_parser.add_argument("--name", default="python", help=name_help)
    lab_parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    lab_parser.add_argument(
        "--gateway-url",
        default=os.environ.get("JUPYTER_GATEWAY_URL", ""),
        help="the provider's Jupyter gateway: show the kernels there (default: $JUPYTER_GATEWAY_URL)",
    )
    lab_parser.add_argument(
        "--gateway-token", default=os.environ.get("JUPYTER_GATEWAY_AUTH_TOKEN", ""), help="the gateway's auth token"
    )
    lab_parser.set_defaults(handler=lab_command)


def _host_port(raw: str) -> tuple[str, int]:
    from kernel_provider.cli import _host_port as parse

    return parse(raw)
