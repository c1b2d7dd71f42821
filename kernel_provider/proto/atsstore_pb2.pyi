from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Attestation(_message.Message):
    __slots__ = ("id", "subjects", "predicates", "contexts", "actors", "timestamp", "source", "attributes", "created_at", "signature", "signer_did")
    ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    PREDICATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_DID_FIELD_NUMBER: _ClassVar[int]
    id: str
    subjects: _containers.RepeatedScalarFieldContainer[str]
    predicates: _containers.RepeatedScalarFieldContainer[str]
    contexts: _containers.RepeatedScalarFieldContainer[str]
    actors: _containers.RepeatedScalarFieldContainer[str]
    timestamp: int
    source: str
    attributes: _struct_pb2.Struct
    created_at: int
    signature: bytes
    signer_did: str
    def __init__(self, id: _Optional[str] = ..., subjects: _Optional[_Iterable[str]] = ..., predicates: _Optional[_Iterable[str]] = ..., contexts: _Optional[_Iterable[str]] = ..., actors: _Optional[_Iterable[str]] = ..., timestamp: _Optional[int] = ..., source: _Optional[str] = ..., attributes: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[int] = ..., signature: _Optional[bytes] = ..., signer_did: _Optional[str] = ...) -> None: ...

class AttestationCommand(_message.Message):
    __slots__ = ("subjects", "predicates", "contexts", "actors", "timestamp", "attributes", "source", "source_version")
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    PREDICATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    subjects: _containers.RepeatedScalarFieldContainer[str]
    predicates: _containers.RepeatedScalarFieldContainer[str]
    contexts: _containers.RepeatedScalarFieldContainer[str]
    actors: _containers.RepeatedScalarFieldContainer[str]
    timestamp: int
    attributes: _struct_pb2.Struct
    source: str
    source_version: str
    def __init__(self, subjects: _Optional[_Iterable[str]] = ..., predicates: _Optional[_Iterable[str]] = ..., contexts: _Optional[_Iterable[str]] = ..., actors: _Optional[_Iterable[str]] = ..., timestamp: _Optional[int] = ..., attributes: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., source: _Optional[str] = ..., source_version: _Optional[str] = ...) -> None: ...

class AttestationFilter(_message.Message):
    __slots__ = ("subjects", "predicates", "contexts", "actors", "time_start", "time_end", "limit")
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    PREDICATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    TIME_START_FIELD_NUMBER: _ClassVar[int]
    TIME_END_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    subjects: _containers.RepeatedScalarFieldContainer[str]
    predicates: _containers.RepeatedScalarFieldContainer[str]
    contexts: _containers.RepeatedScalarFieldContainer[str]
    actors: _containers.RepeatedScalarFieldContainer[str]
    time_start: int
    time_end: int
    limit: int
    def __init__(self, subjects: _Optional[_Iterable[str]] = ..., predicates: _Optional[_Iterable[str]] = ..., contexts: _Optional[_Iterable[str]] = ..., actors: _Optional[_Iterable[str]] = ..., time_start: _Optional[int] = ..., time_end: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class GenerateAttestationRequest(_message.Message):
    __slots__ = ("auth_token", "command")
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    auth_token: str
    command: AttestationCommand
    def __init__(self, auth_token: _Optional[str] = ..., command: _Optional[_Union[AttestationCommand, _Mapping]] = ...) -> None: ...

class GenerateAttestationResponse(_message.Message):
    __slots__ = ("success", "error", "attestation")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    error: str
    attestation: Attestation
    def __init__(self, success: _Optional[bool] = ..., error: _Optional[str] = ..., attestation: _Optional[_Union[Attestation, _Mapping]] = ...) -> None: ...

class GetAttestationsRequest(_message.Message):
    __slots__ = ("auth_token", "filter")
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    auth_token: str
    filter: AttestationFilter
    def __init__(self, auth_token: _Optional[str] = ..., filter: _Optional[_Union[AttestationFilter, _Mapping]] = ...) -> None: ...

class GetAttestationsResponse(_message.Message):
    __slots__ = ("success", "error", "attestations")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTESTATIONS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    error: str
    attestations: _containers.RepeatedCompositeFieldContainer[Attestation]
    def __init__(self, success: _Optional[bool] = ..., error: _Optional[str] = ..., attestations: _Optional[_Iterable[_Union[Attestation, _Mapping]]] = ...) -> None: ...
