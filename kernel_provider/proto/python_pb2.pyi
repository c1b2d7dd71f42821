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
    __slots__ = ("output", "done", "clear_output", "update_display_data", "dropped", "display_id")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CLEAR_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DISPLAY_DATA_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_ID_FIELD_NUMBER: _ClassVar[int]
    output: bytes
    done: PythonExecuteResponse
    clear_output: PythonClearOutput
    update_display_data: bytes
    dropped: PythonDroppedEvents
    display_id: str
    def __init__(self, output: _Optional[bytes] = ..., done: _Optional[_Union[PythonExecuteResponse, _Mapping]] = ..., clear_output: _Optional[_Union[PythonClearOutput, _Mapping]] = ..., update_display_data: _Optional[bytes] = ..., dropped: _Optional[_Union[PythonDroppedEvents, _Mapping]] = ..., display_id: _Optional[str] = ...) -> None: ...

class PythonClearOutput(_message.Message):
    __slots__ = ("wait",)
    WAIT_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    def __init__(self, wait: _Optional[bool] = ...) -> None: ...

class PythonDroppedEvents(_message.Message):
    __slots__ = ("events", "bytes")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    events: int
    bytes: int
    def __init__(self, events: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
