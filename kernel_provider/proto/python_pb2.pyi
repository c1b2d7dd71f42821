from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PythonExecuteRequest(_message.Message):
    __slots__ = ("code", "glyph_id", "upstream_attestation")
    CODE_FIELD_NUMBER: _ClassVar[int]
    GLYPH_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    code: str
    glyph_id: str
    upstream_attestation: bytes
    def __init__(self, code: _Optional[str] = ..., glyph_id: _Optional[str] = ..., upstream_attestation: _Optional[bytes] = ...) -> None: ...

class PythonExecuteResponse(_message.Message):
    __slots__ = ("success", "output", "error", "result")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    success: bool
    output: str
    error: str
    result: bytes
    def __init__(self, success: _Optional[bool] = ..., output: _Optional[str] = ..., error: _Optional[str] = ..., result: _Optional[bytes] = ...) -> None: ...

class PythonExecuteEvent(_message.Message):
    __slots__ = ("output", "done")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    output: bytes
    done: PythonExecuteResponse
    def __init__(self, output: _Optional[bytes] = ..., done: _Optional[_Union[PythonExecuteResponse, _Mapping]] = ...) -> None: ...
