"""A fake of QNTX's attestation store: a real gRPC server on 127.0.0.1 serving ATSStoreService.

It records every request, checks the auth token (a wrong one gets success=false, "unauthorized"),
gives each attestation an id and a timestamp, keeps them in memory, and answers GetAttestations by
filter, oldest first and at most ``max_results`` at a time, as a store with a small default page may.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent import futures

import grpc

from kernel_provider.proto import atsstore_pb2, atsstore_pb2_grpc


class FakeATSStore(atsstore_pb2_grpc.ATSStoreServiceServicer):
    def __init__(self, token: str = "secret-token", max_results: int = 1000):
        self.token = token
        self.max_results = max_results
        # When set, every request is refused with this error (an unhappy store).
        self.refuse_with = ""
        self.requests: list[tuple[str, object]] = []
        self.attestations: list[atsstore_pb2.Attestation] = []
        self._lock = threading.Lock()
        self._last_ms = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        atsstore_pb2_grpc.add_ATSStoreServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"

    def start(self) -> FakeATSStore:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def creates(self) -> list[atsstore_pb2.GenerateAttestationRequest]:
        return [r for name, r in self.requests if name == "GenerateAndCreateAttestation"]

    def queries(self) -> list[atsstore_pb2.GetAttestationsRequest]:
        return [r for name, r in self.requests if name == "GetAttestations"]

    def _refusal(self, auth_token: str) -> str:
        if auth_token != self.token:
            return "unauthorized"
        return self.refuse_with

    def _now_ms(self) -> int:
        # Strictly increasing, so that "newest" is never a tie in the tests.
        self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        return self._last_ms

    def GenerateAndCreateAttestation(self, request, context):
        with self._lock:
            self.requests.append(("GenerateAndCreateAttestation", request))
            error = self._refusal(request.auth_token)
            if error:
                return atsstore_pb2.GenerateAttestationResponse(success=False, error=error)
            command = request.command
            now = self._now_ms()
            attestation = atsstore_pb2.Attestation(
                id=f"AS-{uuid.uuid4().hex[:12]}",
                subjects=command.subjects,
                predicates=command.predicates,
                contexts=command.contexts,
                actors=command.actors,
                timestamp=command.timestamp if command.HasField("timestamp") else now,
                source=command.source,
                attributes=command.attributes,
                created_at=now,
            )
            self.attestations.append(attestation)
            return atsstore_pb2.GenerateAttestationResponse(success=True, attestation=attestation)

    def GetAttestations(self, request, context):
        with self._lock:
            self.requests.append(("GetAttestations", request))
            error = self._refusal(request.auth_token)
            if error:
                return atsstore_pb2.GetAttestationsResponse(success=False, error=error)
            f = request.filter
            matches = sorted(
                (a for a in self.attestations if _matches(a, f)), key=lambda a: (a.timestamp, a.created_at)
            )
            limit = min(f.limit if f.HasField("limit") and f.limit > 0 else 100, self.max_results)
            return atsstore_pb2.GetAttestationsResponse(success=True, attestations=matches[:limit])


def _matches(a: atsstore_pb2.Attestation, f: atsstore_pb2.AttestationFilter) -> bool:
    """Every non-empty list of the filter shares an item with the attestation; times are inclusive."""
    for wanted, have in [
        (f.subjects, a.subjects),
        (f.predicates, a.predicates),
        (f.contexts, a.contexts),
        (f.actors, a.actors),
    ]:
        if wanted and not set(wanted) & set(have):
            return False
    if f.time_start and a.timestamp < f.time_start:
        return False
    return not (f.time_end and a.timestamp > f.time_end)
