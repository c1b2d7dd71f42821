"""attest() and last() for glyph kernels: the provider's side, and the ATS store client.

A glyph kernel may be any Python that has ipykernel, so it cannot be asked to speak gRPC. Its
``attest`` and ``last`` (defined by kernel_provider/prelude.py) ask the provider over the kernel's
own stdin channel, mid-run (execution.py routes those requests here); the provider calls QNTX's
ATSStoreService for them.

Who is asking is never taken from the request: a request arrives on one kernel's channel, and the
provider knows whose kernel that is. The first actor of an attestation is always that glyph; a
kernel may add actors, never another glyph. A malformed request gets an error answer, never a
failure of the provider.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from kernel_provider.execution import ServiceError
from kernel_provider.proto import atsstore_pb2, atsstore_pb2_grpc

log = logging.getLogger(__name__)

ATS_TIMEOUT = 10.0
# last() pages forward in time, PAGE_SIZE at a time, because a store may cap its answer and
# need not return the newest attestations first.
PAGE_SIZE = 100
MAX_PAGES = 1000
# Struct numbers are doubles: integers beyond this would not come back as they went in.
MAX_EXACT_INT = 2**53
FILTER_FIELDS = ("subjects", "predicates", "contexts", "actors")
GLYPH_ACTOR_PREFIX = "glyph:"


class AttestationError(ServiceError):
    """A request the glyph should hear about; the message is one sentence for a person."""


@dataclass(frozen=True)
class StoreAddress:
    """Where attestations go, and what they say made them (QNTX gives these at Initialize)."""

    endpoint: str
    auth_token: str
    source: str
    source_version: str


class AttestationService:
    """Answers kernels' attest() and last() by calling QNTX's ATS store. One per Provider."""

    def __init__(self, store: Callable[[], StoreAddress]):
        self._store = store
        self._channel: grpc.aio.Channel | None = None
        self._channel_target = ""

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def answer(self, actor: str, request: Any) -> Any:
        """Serve one request of the kernel whose own actor is ``actor`` (``glyph:<id>``, ...)."""
        if not isinstance(request, dict):
            raise AttestationError("the request is not a JSON object.")
        method, params = request.get("method"), request.get("params")
        if not isinstance(params, dict):
            raise AttestationError("params must be a JSON object.")
        if method == "attest":
            return await self.attest(actor, params)
        if method == "last":
            return await self.last(params)
        raise AttestationError(f"unknown method {method!r}.")

    async def attest(self, actor: str, params: dict[str, Any]) -> dict[str, Any]:
        """Create an attestation made by ``actor``'s kernel; return it as a dict."""
        store = self._store()
        command = atsstore_pb2.AttestationCommand(
            subjects=_strings(params, "subjects", required=True),
            predicates=_strings(params, "predicates", required=True),
            contexts=_strings(params, "contexts"),
            actors=_actors(actor, _strings(params, "actors")),
            source=store.source,
            source_version=store.source_version,
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

    def _stub(self) -> tuple[atsstore_pb2_grpc.ATSStoreServiceStub, str]:
        store = self._store()
        endpoint = store.endpoint
        if not endpoint:
            raise AttestationError(
                "no attestation store is configured: QNTX gave this plugin no ats_store_endpoint at Initialize"
            )
        if self._channel is None or self._channel_target != endpoint:
            old = self._channel
            if old is not None:
                asyncio.ensure_future(old.close(grace=ATS_TIMEOUT))  # calls under way may finish
            self._channel, self._channel_target = grpc.aio.insecure_channel(endpoint), endpoint
        return atsstore_pb2_grpc.ATSStoreServiceStub(self._channel), store.auth_token

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


def _actors(own: str, extra: list[str]) -> list[str]:
    """The kernel's own actor first, then the ones it adds; naming another glyph is refused."""
    for name in extra:
        if name.startswith(GLYPH_ACTOR_PREFIX) and name != own:
            raise AttestationError(f"actors may add to {own!r}, but never name another glyph ({name!r}).")
    return [own, *(name for name in dict.fromkeys(extra) if name != own)]
