"""Pulse jobs through ExecuteJob: the `{name}.script` handler runs code like Execute does."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from kernel_provider.proto import domain_pb2
from kernel_provider.provider import Provider
from kernel_provider.python_service import BadRequest, load_json, validate_code, validate_glyph_id
from kernel_provider.results import ANSWER_BUDGET_BYTES, ExecutionResult, fit_result_json
from kernel_provider.sessions import ProviderClosing


def handler_names(provider: Provider) -> list[str]:
    return [f"{provider.settings.name}.script"]


class JobError(ValueError):
    """A job we refuse; the message is one sentence for the job's log."""


def parse_payload(payload: bytes) -> tuple[str, str, Any]:
    """(code, glyph_id, upstream) from the job's JSON payload."""
    try:
        value = load_json(payload, "the job payload")
    except BadRequest as exc:
        raise JobError(f'{exc} Send {{"code": ...}}.') from None
    if not isinstance(value, dict):
        raise JobError("the job payload must be a JSON object with a `code` string.")
    code, glyph_id, upstream = value.get("code"), value.get("glyph_id"), value.get("upstream")
    if not isinstance(code, str):
        raise JobError("the job payload needs `code`, the Python source to run, as a string.")
    if glyph_id is None:  # absent or null: a throwaway run, as without a glyph
        glyph_id = ""
    if not isinstance(glyph_id, str):
        raise JobError(f"`glyph_id` in the job payload must be a string, got {json.dumps(glyph_id)[:40]}.")
    if upstream is not None and not isinstance(upstream, dict):
        raise JobError("`upstream` in the job payload must be a JSON object.")
    try:
        return validate_code(code), validate_glyph_id(glyph_id), upstream
    except BadRequest as exc:
        raise JobError(str(exc)) from None


# Log lines per job answer: stdout or stderr of more lines keeps its first and last ones, and
# an entry in between says how many were left out (`result` still holds the text).
MAX_LOG_ENTRIES = 1000
# Bytes one entry costs besides its message: the stamp, level, stage and protobuf framing.
LOG_ENTRY_OVERHEAD_BYTES = 64


def log_entries(result: ExecutionResult) -> list[domain_pb2.JobLogEntry]:
    """stdout lines as info, stderr lines as warn, and the error as error, stamped now (RFC3339)."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    lines = [
        (line, level)
        for text, level in ((result.stdout, "info"), (result.stderr, "warn"))
        for line in text.splitlines()
    ]
    if len(lines) > MAX_LOG_ENTRIES - 1:  # room for the error entry
        head, tail = lines[: MAX_LOG_ENTRIES // 2], lines[len(lines) - MAX_LOG_ENTRIES // 2 + 2 :]
        note = (
            f"[kernel_provider: {len(lines) - len(head) - len(tail)} more log lines left out; `result` has the output]"
        )
        lines = [*head, (note, "warn"), *tail]
    entries = [
        domain_pb2.JobLogEntry(timestamp=stamp, level=level, message=line, stage="execute") for line, level in lines
    ]
    if result.error:
        entries.append(domain_pb2.JobLogEntry(timestamp=stamp, level="error", message=result.error, stage="execute"))
    return entries


async def execute_job(provider: Provider, request: domain_pb2.ExecuteJobRequest) -> domain_pb2.ExecuteJobResponse:
    def failed(message: str) -> domain_pb2.ExecuteJobResponse:
        return domain_pb2.ExecuteJobResponse(success=False, error=message, plugin_version=provider.version)

    known = handler_names(provider)
    if request.handler_name not in known:
        return failed(f"unknown job handler {request.handler_name!r}; this plugin handles: {', '.join(known)}.")
    if request.HasField("timeout_secs") and request.timeout_secs <= 0:
        return failed(f"timeout_secs must be above 0, got {request.timeout_secs}.")
    try:
        code, glyph_id, upstream = parse_payload(request.payload)
    except JobError as exc:
        return failed(str(exc))
    timeout = float(request.timeout_secs) if request.HasField("timeout_secs") else None
    try:
        result = await provider.sessions.execute(glyph_id, provider.run_request(code, upstream, timeout))
    except ProviderClosing as exc:
        return failed(f"{exc}.")
    # The error travels three times (its field, `result`, a log entry), stdout and stderr twice.
    budget = ANSWER_BUDGET_BYTES - MAX_LOG_ENTRIES * LOG_ENTRY_OVERHEAD_BYTES
    result, encoded = fit_result_json(result, budget, sent_again={"stdout": 1, "stderr": 1, "error": 2})
    return domain_pb2.ExecuteJobResponse(
        success=result.success,
        error=result.error or "",
        result=encoded,
        log_entries=log_entries(result),
        plugin_version=provider.version,
    )
