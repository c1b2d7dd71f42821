"""attest() and last() for glyph kernels: a loopback callback service, and the ATS store client.

A glyph kernel may be any Python that has ipykernel, so it cannot be asked to speak gRPC. Its
``attest`` and ``last`` (defined by kernel_provider/prelude.py) instead send one JSON line to a TCP
server the provider runs on 127.0.0.1; the provider calls QNTX's ATSStoreService for them.

Wire, one JSON object per line each way:
``{"token": ..., "method": "attest" | "last", "params": {...}}`` is answered with
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "a sentence"}``.

Every kernel gets its own random token, which names its glyph: a kernel cannot attest as another
glyph, and nothing else on the machine can use the channel. A malformed request gets an error
answer; nothing a kernel sends can stop the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from kernel_provider.proto import atsstore_pb2, atsstore_pb2_grpc

if TYPE_CHECKING:
    from kernel_provider.provider import Provider

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1_000_000
ATS_TIMEOUT = 10.0
# last() pages forward in time, PAGE_SIZE at a time, because a store may cap its answer and
# need not return the newest attestations first.
PAGE_SIZE = 100
MAX_PAGES = 1000
# Struct numbers are doubles: integers beyond this would not come back as they went in.
MAX_EXACT_INT = 2**53
FILTER_FIELDS = ("subjects", "predicates", "contexts", "actors")


class AttestationError(Exception):
    """A request the glyph should hear about; the message is one sentence for a person."""


class CallbackServer:
    """The loopback server kernels call, and the ATS client it calls for them. One per Provider."""

    def __init__(self, provider: Provider):
        self.provider = provider
        self.port = 0
        self._tokens: dict[str, str] = {}  # token -> glyph id
        self._server: asyncio.Server | None = None
        self._start_lock = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None
        self._channel_target = ""

    async def start(self) -> int:
        """Start listening (once; later calls return at once) and return the port."""
        async with self._start_lock:
            if self._server is None:
                self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", 0, limit=MAX_LINE_BYTES)
                self.port = self._server.sockets[0].getsockname()[1]
                log.info("attestation callbacks for kernels on 127.0.0.1:%d", self.port)
        return self.port

    def register(self, glyph_id: str) -> str:
        """A new secret for one kernel of ``glyph_id``; forget it when that kernel stops."""
        token = secrets.token_urlsafe(32)
        self._tokens[token] = glyph_id
        return token

    def forget(self, token: str | None) -> None:
        if token is not None:
            self._tokens.pop(token, None)

    async def close(self) -> None:
        self._tokens.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE_BYTES; the stream cannot be resynchronised
                    await self._send(writer, _failure(f"request larger than {MAX_LINE_BYTES} bytes"))
                    return
                if not line:
                    return
                await self._send(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the kernel went away (interrupted, or restarted) mid-request
        except Exception:
            log.exception("attestation callback connection failed")
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return _failure("the request is not JSON")
        if not isinstance(request, dict):
            return _failure("the request is not a JSON object")
        glyph_id = self._tokens.get(request.get("token")) if isinstance(request.get("token"), str) else None
        if glyph_id is None:
            return _failure("unknown token: only a kernel started by this provider may call it")
        method, params = request.get("method"), request.get("params")
        if not isinstance(params, dict):
            return _failure("params must be a JSON object")
        try:
            if method == "attest":
                result: Any = await self.attest(glyph_id, params)
            elif method == "last":
                result = await self.last(params)
            else:
                return _failure(f"unknown method {method!r}")
        except AttestationError as exc:
            return _failure(str(exc))
        except Exception as exc:  # a bug of ours must reach the glyph as an error, not kill the connection
            log.exception("attestation callback %s failed", method)
            return _failure(f"internal error of the kernel provider: {type(exc).__name__}: {exc}")
        return {"ok": True, "result": result}

    async def attest(self, glyph_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """Create an attestation for ``glyph_id``'s kernel; return it as a dict."""
        command = atsstore_pb2.AttestationCommand(
            subjects=_strings(params, "subjects", required=True),
            predicates=_strings(params, "predicates", required=True),
            contexts=_strings(params, "contexts"),
            actors=_strings(params, "actors") or [self._default_actor(glyph_id)],
            source=self.provider.settings.name,
            source_version=self.provider.version,
        )
        attributes = params.get("attributes")
        if attributes is not None:
            if not isinstance(attributes, dict):
                raise AttestationError("attributes must be a JSON object")
            try:
                command.attributes.update(attributes)
            except (TypeError, ValueError) as exc:
                raise AttestationError(f"attributes cannot be stored: {exc}") from None
        stub, token = self._stub()
        response = await self._call(
            stub.GenerateAndCreateAttestation,
            atsstore_pb2.GenerateAttestationRequest(auth_token=token, command=command),
        )
        if not response.success:
            raise AttestationError(f"the attestation store refused the attestation: {response.error or '?'}")
        return attestation_to_dict(response.attestation)

    async def last(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The newest attestation matching the filter, or None."""
        query = atsstore_pb2.AttestationFilter(**{key: _strings(params, key) for key in FILTER_FIELDS}, limit=PAGE_SIZE)
        stub, token = self._stub()
        newest = None
        # The store may cap a page below what we ask and need not put the newest first, so ask
        # again for anything after the newest seen until nothing newer comes back.
        for _ in range(MAX_PAGES):
            response = await self._call(
                stub.GetAttestations, atsstore_pb2.GetAttestationsRequest(auth_token=token, filter=query)
            )
            if not response.success:
                raise AttestationError(f"the attestation store refused the query: {response.error or '?'}")
            best = max(response.attestations, key=_age, default=None)
            if best is None or (newest is not None and _age(best) <= _age(newest)):
                break
            newest = best
            query.time_start = newest.timestamp + 1
        return attestation_to_dict(newest) if newest is not None else None

    def _default_actor(self, glyph_id: str) -> str:
        # A run without a glyph (a QNTX watcher action) has no glyph to name: "glyph:" would
        # lump every such run together and say nothing. The provider itself is the one acting.
        return f"glyph:{glyph_id}" if glyph_id else f"provider:{self.provider.settings.name}"

    def _stub(self) -> tuple[atsstore_pb2_grpc.ATSStoreServiceStub, str]:
        endpoint = self.provider.ats_store_endpoint
        if not endpoint:
            raise AttestationError(
                "no attestation store is configured: QNTX gave this plugin no ats_store_endpoint at Initialize"
            )
        if self._channel is None or self._channel_target != endpoint:
            old = self._channel
            if old is not None:
                asyncio.ensure_future(old.close(grace=ATS_TIMEOUT))  # calls under way may finish
            self._channel, self._channel_target = grpc.aio.insecure_channel(endpoint), endpoint
        return atsstore_pb2_grpc.ATSStoreServiceStub(self._channel), self.provider.auth_token

    async def _call(self, method, request):
        endpoint = self._channel_target
        try:
            return await method(request, timeout=ATS_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                raise AttestationError(f"the attestation store at {endpoint} is unreachable: {details}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise AttestationError(
                    f"the attestation store at {endpoint} did not answer within {ATS_TIMEOUT:g} seconds"
                ) from None
            raise AttestationError(f"the attestation store at {endpoint} failed: {code.name}: {details}") from None


def _age(attestation: atsstore_pb2.Attestation) -> tuple[int, int]:
    return attestation.timestamp, attestation.created_at


def attestation_to_dict(attestation: atsstore_pb2.Attestation) -> dict[str, Any]:
    result = json_format.MessageToDict(
        attestation, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # int64 fields come out as strings in the JSON mapping; Struct numbers as floats.
    result["timestamp"] = attestation.timestamp
    result["created_at"] = attestation.created_at
    result["attributes"] = _whole_numbers_as_ints(result.get("attributes") or {})
    return result


def _whole_numbers_as_ints(value: Any) -> Any:
    """Struct keeps every number as a double; give back 3, not 3.0, as JSON readers would."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_ints(v) for v in value]
    return value


def _strings(params: dict[str, Any], key: str, required: bool = False) -> list[str]:
    """params[key] as a list of strings; the kernel checks this too, with friendlier errors."""
    value = params.get(key)
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AttestationError(f"{key} must be a list of strings")
    if required and not value:
        raise AttestationError(f"{key} must name at least one")
    return value


def _failure(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error if error.endswith(".") else f"{error}."}
