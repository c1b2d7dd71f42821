from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetadataResponse(_message.Message):
    __slots__ = ("name", "version", "qntx_version", "description", "author", "license")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QNTX_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    qntx_version: str
    description: str
    author: str
    license: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., qntx_version: _Optional[str] = ..., description: _Optional[str] = ..., author: _Optional[str] = ..., license: _Optional[str] = ...) -> None: ...

class InitializeRequest(_message.Message):
    __slots__ = ("ats_store_endpoint", "queue_endpoint", "auth_token", "config", "schedule_endpoint", "file_service_endpoint", "llm_endpoint", "embedding_endpoint", "vector_search_endpoint", "ground_endpoint", "search_endpoint", "fetch_endpoint")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATS_STORE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    FILE_SERVICE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LLM_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_SEARCH_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    GROUND_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SEARCH_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    FETCH_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ats_store_endpoint: str
    queue_endpoint: str
    auth_token: str
    config: _containers.ScalarMap[str, str]
    schedule_endpoint: str
    file_service_endpoint: str
    llm_endpoint: str
    embedding_endpoint: str
    vector_search_endpoint: str
    ground_endpoint: str
    search_endpoint: str
    fetch_endpoint: str
    def __init__(self, ats_store_endpoint: _Optional[str] = ..., queue_endpoint: _Optional[str] = ..., auth_token: _Optional[str] = ..., config: _Optional[_Mapping[str, str]] = ..., schedule_endpoint: _Optional[str] = ..., file_service_endpoint: _Optional[str] = ..., llm_endpoint: _Optional[str] = ..., embedding_endpoint: _Optional[str] = ..., vector_search_endpoint: _Optional[str] = ..., ground_endpoint: _Optional[str] = ..., search_endpoint: _Optional[str] = ..., fetch_endpoint: _Optional[str] = ...) -> None: ...

class InitializeResponse(_message.Message):
    __slots__ = ("handler_names", "schedules", "llm_provider", "watchers", "vector_search_provider", "search_provider", "embedding_provider", "http_routes", "python_provider")
    HANDLER_NAMES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    LLM_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    WATCHERS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_SEARCH_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    HTTP_ROUTES_FIELD_NUMBER: _ClassVar[int]
    PYTHON_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    handler_names: _containers.RepeatedScalarFieldContainer[str]
    schedules: _containers.RepeatedCompositeFieldContainer[ScheduleInfo]
    llm_provider: bool
    watchers: _containers.RepeatedCompositeFieldContainer[WatcherRegistration]
    vector_search_provider: bool
    search_provider: bool
    embedding_provider: bool
    http_routes: _containers.RepeatedCompositeFieldContainer[RouteInfo]
    python_provider: bool
    def __init__(self, handler_names: _Optional[_Iterable[str]] = ..., schedules: _Optional[_Iterable[_Union[ScheduleInfo, _Mapping]]] = ..., llm_provider: _Optional[bool] = ..., watchers: _Optional[_Iterable[_Union[WatcherRegistration, _Mapping]]] = ..., vector_search_provider: _Optional[bool] = ..., search_provider: _Optional[bool] = ..., embedding_provider: _Optional[bool] = ..., http_routes: _Optional[_Iterable[_Union[RouteInfo, _Mapping]]] = ..., python_provider: _Optional[bool] = ...) -> None: ...

class ScheduleInfo(_message.Message):
    __slots__ = ("handler_name", "interval_seconds", "enabled_by_default", "description", "ats_code")
    HANDLER_NAME_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_BY_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ATS_CODE_FIELD_NUMBER: _ClassVar[int]
    handler_name: str
    interval_seconds: int
    enabled_by_default: bool
    description: str
    ats_code: str
    def __init__(self, handler_name: _Optional[str] = ..., interval_seconds: _Optional[int] = ..., enabled_by_default: _Optional[bool] = ..., description: _Optional[str] = ..., ats_code: _Optional[str] = ...) -> None: ...

class RouteInfo(_message.Message):
    __slots__ = ("method", "path", "description")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    description: str
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class WatcherRegistration(_message.Message):
    __slots__ = ("id", "handler_name", "subjects", "predicates", "contexts", "actors", "max_fires_per_second")
    ID_FIELD_NUMBER: _ClassVar[int]
    HANDLER_NAME_FIELD_NUMBER: _ClassVar[int]
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    PREDICATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    MAX_FIRES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    id: str
    handler_name: str
    subjects: _containers.RepeatedScalarFieldContainer[str]
    predicates: _containers.RepeatedScalarFieldContainer[str]
    contexts: _containers.RepeatedScalarFieldContainer[str]
    actors: _containers.RepeatedScalarFieldContainer[str]
    max_fires_per_second: int
    def __init__(self, id: _Optional[str] = ..., handler_name: _Optional[str] = ..., subjects: _Optional[_Iterable[str]] = ..., predicates: _Optional[_Iterable[str]] = ..., contexts: _Optional[_Iterable[str]] = ..., actors: _Optional[_Iterable[str]] = ..., max_fires_per_second: _Optional[int] = ...) -> None: ...

class HTTPRequest(_message.Message):
    __slots__ = ("method", "path", "headers", "body")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    headers: _containers.RepeatedCompositeFieldContainer[HTTPHeader]
    body: bytes
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[HTTPHeader, _Mapping]]] = ..., body: _Optional[bytes] = ...) -> None: ...

class HTTPResponse(_message.Message):
    __slots__ = ("status_code", "headers", "body")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    headers: _containers.RepeatedCompositeFieldContainer[HTTPHeader]
    body: bytes
    def __init__(self, status_code: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[HTTPHeader, _Mapping]]] = ..., body: _Optional[bytes] = ...) -> None: ...

class HTTPHeader(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class WebSocketMessage(_message.Message):
    __slots__ = ("type", "data", "headers", "timestamp")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CONNECT: _ClassVar[WebSocketMessage.Type]
        DATA: _ClassVar[WebSocketMessage.Type]
        CLOSE: _ClassVar[WebSocketMessage.Type]
        PING: _ClassVar[WebSocketMessage.Type]
        PONG: _ClassVar[WebSocketMessage.Type]
        ERROR: _ClassVar[WebSocketMessage.Type]
    CONNECT: WebSocketMessage.Type
    DATA: WebSocketMessage.Type
    CLOSE: WebSocketMessage.Type
    PING: WebSocketMessage.Type
    PONG: WebSocketMessage.Type
    ERROR: WebSocketMessage.Type
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    type: WebSocketMessage.Type
    data: bytes
    headers: _containers.ScalarMap[str, str]
    timestamp: int
    def __init__(self, type: _Optional[_Union[WebSocketMessage.Type, str]] = ..., data: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ..., timestamp: _Optional[int] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("healthy", "message", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    message: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, healthy: _Optional[bool] = ..., message: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConfigSchemaResponse(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ConfigFieldSchema
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ConfigFieldSchema, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, ConfigFieldSchema]
    def __init__(self, fields: _Optional[_Mapping[str, ConfigFieldSchema]] = ...) -> None: ...

class ConfigFieldSchema(_message.Message):
    __slots__ = ("type", "description", "default_value", "required", "min_value", "max_value", "pattern", "element_type")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    type: str
    description: str
    default_value: str
    required: bool
    min_value: str
    max_value: str
    pattern: str
    element_type: str
    def __init__(self, type: _Optional[str] = ..., description: _Optional[str] = ..., default_value: _Optional[str] = ..., required: _Optional[bool] = ..., min_value: _Optional[str] = ..., max_value: _Optional[str] = ..., pattern: _Optional[str] = ..., element_type: _Optional[str] = ...) -> None: ...

class GlyphDefResponse(_message.Message):
    __slots__ = ("glyphs",)
    GLYPHS_FIELD_NUMBER: _ClassVar[int]
    glyphs: _containers.RepeatedCompositeFieldContainer[GlyphDef]
    def __init__(self, glyphs: _Optional[_Iterable[_Union[GlyphDef, _Mapping]]] = ...) -> None: ...

class GlyphDef(_message.Message):
    __slots__ = ("symbol", "title", "label", "content_path", "css_path", "default_width", "default_height", "module_path")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_PATH_FIELD_NUMBER: _ClassVar[int]
    CSS_PATH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    title: str
    label: str
    content_path: str
    css_path: str
    default_width: int
    default_height: int
    module_path: str
    def __init__(self, symbol: _Optional[str] = ..., title: _Optional[str] = ..., label: _Optional[str] = ..., content_path: _Optional[str] = ..., css_path: _Optional[str] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., module_path: _Optional[str] = ...) -> None: ...

class ExecuteJobRequest(_message.Message):
    __slots__ = ("job_id", "handler_name", "payload", "timeout_secs")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLER_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    handler_name: str
    payload: bytes
    timeout_secs: int
    def __init__(self, job_id: _Optional[str] = ..., handler_name: _Optional[str] = ..., payload: _Optional[bytes] = ..., timeout_secs: _Optional[int] = ...) -> None: ...

class ExecuteJobResponse(_message.Message):
    __slots__ = ("success", "error", "result", "progress_current", "progress_total", "cost_actual", "log_entries", "plugin_version")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    COST_ACTUAL_FIELD_NUMBER: _ClassVar[int]
    LOG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    error: str
    result: bytes
    progress_current: int
    progress_total: int
    cost_actual: float
    log_entries: _containers.RepeatedCompositeFieldContainer[JobLogEntry]
    plugin_version: str
    def __init__(self, success: _Optional[bool] = ..., error: _Optional[str] = ..., result: _Optional[bytes] = ..., progress_current: _Optional[int] = ..., progress_total: _Optional[int] = ..., cost_actual: _Optional[float] = ..., log_entries: _Optional[_Iterable[_Union[JobLogEntry, _Mapping]]] = ..., plugin_version: _Optional[str] = ...) -> None: ...

class JobLogEntry(_message.Message):
    __slots__ = ("timestamp", "level", "message", "stage", "metadata")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    timestamp: str
    level: str
    message: str
    stage: str
    metadata: str
    def __init__(self, timestamp: _Optional[str] = ..., level: _Optional[str] = ..., message: _Optional[str] = ..., stage: _Optional[str] = ..., metadata: _Optional[str] = ...) -> None: ...

class ParseAxQueryRequest(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: str
    def __init__(self, query: _Optional[str] = ...) -> None: ...

class ParseAxQueryResponse(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    error: str
    def __init__(self, result: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...
