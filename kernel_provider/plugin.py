"""DomainPluginService: the lifecycle every QNTX plugin speaks (Metadata, Initialize, Health, ...)."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing

import grpc

from kernel_provider import glyph, http
from kernel_provider.config import CONFIG_FIELDS, ConfigError
from kernel_provider.jobs import execute_job, handler_names
from kernel_provider.live import serve_websocket
from kernel_provider.proto import domain_pb2, domain_pb2_grpc
from kernel_provider.provider import Provider

log = logging.getLogger(__name__)

QNTX_VERSION_RANGE = ">=0.1.0"


class DomainPluginServicer(domain_pb2_grpc.DomainPluginServiceServicer):
    def __init__(self, provider: Provider):
        self.provider = provider

    async def Metadata(self, request, context):
        return domain_pb2.MetadataResponse(
            name=self.provider.settings.name,
            version=self.provider.version,
            qntx_version=QNTX_VERSION_RANGE,
            description=(
                "Runs py glyphs on persistent Jupyter kernels, one per glyph, "
                f"from the kernelspec {self.provider.settings.kernel!r}."
            ),
            author="kernel_provider developers",
            license="MIT",
        )

    async def Initialize(self, request, context):
        if not self.provider.may_set_store_credentials(request.ats_store_endpoint, request.auth_token):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "this plugin is already initialized: changing ats_store_endpoint or auth_token "
                "needs the auth_token of the first Initialize.",
            )
        try:
            await self.provider.apply_config(dict(request.config))
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.provider.set_store_credentials(request.ats_store_endpoint, request.auth_token)
        settings = self.provider.settings
        log.info(
            "initialized: kernelspec %s, execute timeout %gs, output limit %d bytes",
            settings.kernel,
            settings.execute_timeout,
            settings.max_output_bytes,
        )
        return domain_pb2.InitializeResponse(
            python_provider=True,
            handler_names=handler_names(self.provider),
            http_routes=[
                domain_pb2.RouteInfo(method=route.method, path=route.path, description=route.description)
                for route in http.ROUTES
            ],
        )

    async def Shutdown(self, request, context):
        await self.provider.sessions.shutdown()
        # Answer first; the server stops right after (QNTX kills us 5 s later anyway).
        asyncio.get_running_loop().call_soon(self.provider.request_stop)
        return domain_pb2.Empty()

    async def Health(self, request, context):
        live, busy = self.provider.sessions.counts()
        stopping = self.provider.stopping.is_set()
        return domain_pb2.HealthResponse(
            healthy=not stopping,
            message="shutting down" if stopping else "ok",
            details={
                "kernelspec": self.provider.settings.kernel,
                "kernelspecs": ",".join(self.provider.settings.served_kernels),
                # Which environment each glyph runs on, as JSON: {"glyph id": "kernelspec"}.
                "glyph_kernelspecs": json.dumps(
                    {g: s.kernel_name for g, s in self.provider.sessions.sessions.items()}, sort_keys=True
                ),
                "live_kernels": str(live),
                "busy_kernels": str(busy),
                "pooled_kernels": str(self.provider.sessions.supply.pooled),
                "pool_size": str(self.provider.settings.pool_size),
                # Every kernel process started since the provider began (pool and glyphs).
                "kernels_started": str(self.provider.sessions.supply.started),
                # Runs without a glyph (watcher actions): mode, runners, busy, queued, queue_limit,
                # runs, and whether they are paced beside active glyphs (watchers.GlyphsFirst).
                **{f"watcher_{k}": _detail(v) for k, v in self.provider.sessions.watchers.status().items()},
                **self.provider.loop_lag.details(),
                "max_kernels": str(self.provider.settings.max_kernels),
                "version": self.provider.version,
            },
        )

    async def ConfigSchema(self, request, context):
        return domain_pb2.ConfigSchemaResponse(
            fields={
                key: domain_pb2.ConfigFieldSchema(
                    type=field.type,
                    description=field.description,
                    default_value=field.default,
                    min_value=field.min_value,
                    max_value=field.max_value,
                )
                for key, field in CONFIG_FIELDS.items()
            }
        )

    async def RegisterGlyphs(self, request, context):
        return domain_pb2.GlyphDefResponse(glyphs=glyph.glyph_defs())

    async def ParseAxQuery(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this plugin does not parse Ax queries.")

    async def HandleHTTP(self, request, context):
        headers = {header.name: ", ".join(header.values) for header in request.headers}
        answer = await http.dispatch(self.provider, request.method, request.path, request.body, headers)
        return domain_pb2.HTTPResponse(
            status_code=answer.status,
            headers=[domain_pb2.HTTPHeader(name=name, values=[value]) for name, value in answer.headers.items()],
            body=answer.body,
        )

    async def ExecuteJob(self, request, context):
        return await execute_job(self.provider, request)

    async def HandleWebSocket(self, request_iterator, context):
        # PING/PONG, CLOSE, and live runs of the code in DATA messages: see kernel_provider/live.py.
        async with aclosing(serve_websocket(self.provider, request_iterator, context)) as replies:
            async for reply in replies:
                yield reply


def _detail(value: object) -> str:
    """A Health detail as text; booleans as JSON writes them."""
    return json.dumps(value) if isinstance(value, bool) else str(value)
