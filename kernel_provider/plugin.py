"""DomainPluginService: the lifecycle every QNTX plugin speaks (Metadata, Initialize, Health, ...)."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from kernel_provider.config import CONFIG_FIELDS, ConfigError
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
        try:
            await self.provider.apply_config(dict(request.config))
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.provider.ats_store_endpoint = request.ats_store_endpoint
        self.provider.auth_token = request.auth_token
        settings = self.provider.settings
        log.info(
            "initialized: kernelspec %s, execute timeout %gs, output limit %d bytes",
            settings.kernel,
            settings.execute_timeout,
            settings.max_output_bytes,
        )
        return domain_pb2.InitializeResponse(python_provider=True)

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
                "live_kernels": str(live),
                "busy_kernels": str(busy),
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
        return domain_pb2.GlyphDefResponse()

    async def ParseAxQuery(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this plugin does not parse Ax queries.")

    async def HandleHTTP(self, request, context):
        body = json.dumps({"error": f"no route {request.method} {request.path.split('?', 1)[0]}"}).encode()
        return domain_pb2.HTTPResponse(
            status_code=404,
            headers=[domain_pb2.HTTPHeader(name="Content-Type", values=["application/json"])],
            body=body,
        )

    async def ExecuteJob(self, request, context):
        return domain_pb2.ExecuteJobResponse(
            success=False,
            error=f"unknown job handler {request.handler_name!r}: this plugin registers no job handlers.",
            plugin_version=self.provider.version,
        )

    async def HandleWebSocket(self, request_iterator, context):
        Type = domain_pb2.WebSocketMessage.Type
        async for message in request_iterator:
            if message.type == Type.PING:
                yield domain_pb2.WebSocketMessage(type=Type.PONG, timestamp=message.timestamp)
            elif message.type == Type.CLOSE:
                return
