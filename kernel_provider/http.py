"""The plugin's HTTP routes, which QNTX's frontend reaches through HandleHTTP.

Paths are relative to the plugin root (/api/NAME); a `?query` is ignored. Every
answer is JSON with a Content-Type header; bad input gets a 4xx and a sentence.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any
from urllib.parse import unquote

from jupyter_client.kernelspec import KernelSpecManager

from kernel_provider import glyph, packages
from kernel_provider.kernels import kernel_interpreter
from kernel_provider.notebook import notebook_of
from kernel_provider.provider import Provider
from kernel_provider.python_service import BadRequest, decode_upstream, load_json, validate_code, validate_glyph_id
from kernel_provider.results import ANSWER_BUDGET_BYTES, cut_text, fit_result
from kernel_provider.sessions import ProviderClosing

log = logging.getLogger(__name__)

MAX_TIMEOUT_SECONDS = 86_400

# A route handler gets the provider, the path's named parts and the parsed JSON body,
# and answers (status, JSON-able payload).
Params = dict[str, str]
Body = dict[str, Any]
Reply = tuple[int, Any]
# A handler whose answer is not JSON (the glyph's files) answers a Response of its own.
Handler = Callable[[Provider, Params, Body], Awaitable["Reply | Response"]]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as announced in http_routes, e.g. /kernels/{glyph_id}
    description: str
    handler: Handler

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8", "replace")
    return Response(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


def shown(text: str, limit: int = 200) -> str:
    """A request's own text as an error message repeats it: never more than ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# --- request parsing -------------------------------------------------------------------------


def parse_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = load_json(body, "the request body")
    except BadRequest as exc:
        raise HTTPError(400, str(exc)) from None
    if not isinstance(value, dict):
        raise HTTPError(400, "the request body must be a JSON object.")
    return value


def optional_string(body: dict[str, Any], key: str) -> str:
    value = body.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise HTTPError(400, f"{key} must be a string.")
    return value


def glyph_from(body: dict[str, Any]) -> str:
    try:
        return validate_glyph_id(optional_string(body, "glyph_id"))
    except BadRequest as exc:
        raise HTTPError(400, str(exc)) from None


def upstream_from(body: dict[str, Any]) -> Any:
    """An attestation given as a JSON object, or as a string holding one."""
    value = body.get("upstream_attestation", body.get("upstream"))
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            return decode_upstream(value.encode("utf-8", "replace"))
        except BadRequest as exc:
            raise HTTPError(400, str(exc)) from None
    raise HTTPError(400, "upstream_attestation must be a JSON object.")


def timeout_from(body: dict[str, Any]) -> float | None:
    value = body.get("timeout_secs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_SECONDS:
        raise HTTPError(400, f"timeout_secs must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS}.")
    return float(value)


# --- handlers ---------------------------------------------------------------------------------


async def execute(provider: Provider, params: Params, body: Body) -> Reply:
    code = body.get("content", body.get("code"))
    if not isinstance(code, str):
        raise HTTPError(400, "send the Python source to run as `content` or `code` (a string).")
    try:
        validate_code(code)
    except BadRequest as exc:
        raise HTTPError(400, str(exc)) from None
    run = provider.run_request(code, upstream_from(body), timeout_from(body))
    result = await provider.sessions.execute(glyph_from(body), run)
    return 200, fit_result(result).to_dict()


async def evaluate(provider: Provider, params: Params, body: Body) -> Reply:
    expression = body.get("expr")
    if not isinstance(expression, str) or not expression.strip():
        raise HTTPError(400, "send the expression to evaluate as `expr` (a non-empty string).")
    result, bundle = await provider.sessions.evaluate(
        glyph_from(body), as_json_expression(expression), provider.settings.execute_timeout
    )
    answer = {"success": False, "result": None, "error": result.error, "duration_ms": result.duration_ms}
    if bundle.get("status") == "error":
        answer["error"] = cut_text(f"{bundle.get('ename')}: {bundle.get('evalue')}", MAX_EVALUATE_ERROR_BYTES)
    elif bundle.get("status") == "ok":
        answer.update(read_evaluation(bundle.get("data", {}).get("text/plain")))
    return 200, answer


# The JSON of an evaluated value that an answer may carry, with room for the rest of the answer.
MAX_EVALUATE_VALUE_BYTES = ANSWER_BUDGET_BYTES - 64 * 1024
MAX_EVALUATE_ERROR_BYTES = 64 * 1024


def as_json_expression(expression: str) -> str:
    """Wrap ``expression`` so the kernel answers with JSON: {"json": value} or, if not JSON-able, {"text": repr}.

    One expression (Jupyter's user_expressions take no statements): the kernel compiles
    it from a string literal in 'eval' mode, so nothing in it can close our wrapper's
    brackets. The value is computed once; an object json cannot encode, even deep
    inside, turns the whole answer into its text; an answer too large for the 4 MB
    limit becomes {"too_large": its size} and never leaves the kernel.
    """
    return (
        "(lambda value, json=__import__('json'), unencodable=[]: "
        f"(lambda encoded: encoded if len(encoded) <= {MAX_EVALUATE_VALUE_BYTES} "
        "else json.dumps({'too_large': len(encoded)}))"
        "((lambda encoded: json.dumps({'text': repr(value)}) if unencodable else encoded)"
        "(json.dumps({'json': value}, allow_nan=False, default=lambda o: unencodable.append(o)))))"
        f"(eval(compile({expression!r}, '<expr>', 'eval'), __import__('builtins').globals()))"
    )


def read_evaluation(text_plain: Any) -> dict[str, Any]:
    """The fields of /evaluate's answer from the kernel's text/plain of our wrapper's JSON string."""
    try:
        decoded = json.loads(ast.literal_eval(text_plain))
        if not isinstance(decoded, dict) or not decoded.keys() & {"json", "text", "too_large"}:
            raise ValueError(decoded)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return {
            "error": "EvaluationError: the kernel did not show the value as plain JSON text; a custom text/plain "
            "formatter for str in this kernel is the likely cause."
        }
    if "too_large" in decoded:
        return {
            "error": f"ValueTooLarge: the value is {decoded['too_large']} bytes as JSON, more than the "
            f"{MAX_EVALUATE_VALUE_BYTES} an answer may carry; evaluate a smaller part of it."
        }
    return {"success": True, "error": None, "result": decoded.get("json", decoded.get("text"))}


# Entries GET /kernels lists at most (about 700 bytes each with a 256-character glyph id);
# past it, the most recently active, with `truncated` set and `total` saying how many there are.
MAX_LISTED_KERNELS = 1000


async def list_kernels(provider: Provider, params: Params, body: Body) -> Reply:
    sessions = list(provider.sessions.sessions.values())
    listed = sessions
    if len(sessions) > MAX_LISTED_KERNELS:
        listed = sorted(sessions, key=lambda s: s.last_activity, reverse=True)[:MAX_LISTED_KERNELS]
    return 200, {
        "kernels": [session.info() for session in listed],
        "total": len(sessions),
        "truncated": len(listed) < len(sessions),
        # Runs without a glyph (QNTX's watcher actions) share runner kernels: how many, and the queue.
        "watcher_runs": provider.sessions.watchers.status(),
    }


def session_or_404(provider: Provider, params: dict[str, str]):
    glyph_id = unquote(params["glyph_id"])
    session = provider.sessions.sessions.get(glyph_id)
    if session is None:
        raise HTTPError(404, f"no live kernel for glyph {shown(glyph_id)!r}.")
    return session


async def interrupt_kernel(provider: Provider, params: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
    session = session_or_404(provider, params)
    await session.interrupt()
    return 200, {"interrupted": session.glyph_id}


async def restart_kernel(provider: Provider, params: Params, body: Body) -> Reply:
    session = session_or_404(provider, params)
    await session.restart()
    return 200, session.info()


async def delete_kernel(provider: Provider, params: Params, body: Body) -> Reply:
    session = session_or_404(provider, params)
    await provider.sessions.remove(session.glyph_id)
    return 200, {"deleted": session.glyph_id}


async def glyph_notebook(provider: Provider, params: Params, body: Body) -> Reply:
    glyph_id = unquote(params["glyph_id"])
    runs = provider.sessions.history.runs(glyph_id)
    if not runs:
        raise HTTPError(404, f"glyph {glyph_id!r} has no runs on record (none yet, or the provider restarted).")
    return 200, notebook_of(runs)


async def list_packages(provider: Provider, params: Params, body: Body) -> Reply:
    try:
        found = [await packages.environment(name) for name in provider.settings.served_kernels]
    except packages.PackageError as exc:
        raise HTTPError(exc.status, str(exc)) from None
    return 200, {"environments": [environment.summary() for environment in found]}


async def install_packages(provider: Provider, params: Params, body: Body) -> Reply:
    try:
        return 200, await packages.install_from_request(provider, body, glyph_from(body))
    except packages.PackageError as exc:
        raise HTTPError(exc.status, str(exc)) from None


async def glyph_asset(provider: Provider, params: Params, body: Body) -> Response:
    found = glyph.asset(unquote(params["asset"]))
    if found is None:
        raise HTTPError(404, f"the glyph has no file {params['asset']!r}.")
    content, content_type, etag = found
    # no-cache: the browser may keep the file but asks again (If-None-Match) before using it,
    # so a provider upgrade reaches the canvas without stale modules.
    return Response(200, content, {"Content-Type": content_type, "Cache-Control": "no-cache", "ETag": etag})


async def list_kernelspecs(provider: Provider, params: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
    specs = KernelSpecManager().get_all_specs()
    return 200, {
        "default": provider.settings.kernel,
        "kernelspecs": [
            {
                "name": name,
                "display_name": entry["spec"].get("display_name", name),
                "language": entry["spec"].get("language", ""),
                "in_use": name in provider.settings.served_kernels,
            }
            for name, entry in sorted(specs.items())
        ],
    }


_KERNEL_VERSIONS_PROBE = (
    "import json, platform\n"
    "try:\n    import ipykernel; v = ipykernel.__version__\n"
    "except ImportError:\n    v = None\n"
    "print(json.dumps({'python': platform.python_version(), 'ipykernel': v}))"
)


# Probe answers by (kernelspec, interpreter): /version starts an interpreter once per
# kernelspec, not on every call. Bounded, since kernelspecs can come and go.
_KERNEL_VERSIONS: dict[tuple[str, str], dict[str, Any]] = {}
_KERNEL_VERSIONS_MAX = 64


async def kernel_versions(kernel_name: str) -> dict[str, Any]:
    """Python and ipykernel versions of a kernelspec's own interpreter (which may not be ours)."""
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    interpreter = kernel_interpreter(spec.argv)
    key = (kernel_name, interpreter)
    if key not in _KERNEL_VERSIONS:
        answer = await _probe_versions(interpreter)
        if answer.get("python") is None:
            return answer  # a failed probe is tried again next time
        if len(_KERNEL_VERSIONS) >= _KERNEL_VERSIONS_MAX:
            _KERNEL_VERSIONS.clear()
        _KERNEL_VERSIONS[key] = answer
    return _KERNEL_VERSIONS[key]


async def _probe_versions(interpreter: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        interpreter,
        "-c",
        _KERNEL_VERSIONS_PROBE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
        return json.loads(stdout)
    except (TimeoutError, json.JSONDecodeError):
        process.kill()
        return {"python": None, "ipykernel": None}


async def versions(provider: Provider, params: Params, body: Body) -> Reply:
    kernel = await kernel_versions(provider.settings.kernel)
    return 200, {
        "provider": provider.version,
        "kernelspec": provider.settings.kernel,
        "python": kernel["python"],
        "ipykernel": kernel["ipykernel"],
        "jupyter_client": version("jupyter_client"),
        "provider_python": sys.version.split()[0],
    }


ROUTES = [
    Route("POST", "/execute", "Run code on a glyph's kernel; answers the ExecutionResult JSON.", execute),
    Route(
        "POST",
        "/evaluate",
        "Evaluate one expression on a glyph's kernel without adding to its history.",
        evaluate,
    ),
    Route("GET", "/kernels", "The live glyph kernels and their state.", list_kernels),
    Route(
        "POST",
        "/kernels/{glyph_id}/interrupt",
        "Interrupt what a glyph's kernel is running.",
        interrupt_kernel,
    ),
    Route(
        "POST",
        "/kernels/{glyph_id}/restart",
        "Give a glyph a fresh kernel (its state is lost).",
        restart_kernel,
    ),
    Route(
        "GET",
        "/kernels/{glyph_id}/notebook",
        "A glyph's runs so far as a Jupyter notebook (.ipynb, nbformat 4).",
        glyph_notebook,
    ),
    Route("DELETE", "/kernels/{glyph_id}", "Stop a glyph's kernel and forget the glyph.", delete_kernel),
    Route("GET", "/kernelspecs", "The installed kernelspecs and the one in use.", list_kernelspecs),
    Route("GET", "/packages", "What each served kernelspec's environment has installed.", list_packages),
    Route(
        "POST",
        "/packages",
        "Install packages into the environment of a glyph's kernelspec (never the provider's own).",
        install_packages,
    ),
    Route(
        "GET",
        glyph.ASSETS_PREFIX + "{asset}",
        "The Jupyter glyph's ES module, stylesheet and libraries.",
        glyph_asset,
    ),
    Route(
        "GET",
        "/version",
        "Versions of the provider, the kernel's Python, jupyter_client and ipykernel.",
        versions,
    ),
]


def not_modified(response: Response, request_headers: dict[str, str]) -> Response:
    """304 without a body when the browser already holds this version (its If-None-Match is our ETag)."""
    etag = response.headers.get("ETag")
    asked = {k.lower(): v for k, v in request_headers.items()}.get("if-none-match", "")
    if etag and etag in [tag.strip() for tag in asked.split(",")]:
        kept = {k: v for k, v in response.headers.items() if k in ("ETag", "Cache-Control")}
        return Response(304, b"", kept)
    return response


async def dispatch(
    provider: Provider, method: str, raw_path: str, body: bytes, headers: dict[str, str] | None = None
) -> Response:
    path = raw_path.split("?", 1)[0].rstrip("/") or "/"
    matching = [(route, m) for route in ROUTES if (m := route.pattern.match(path))]
    try:
        if not matching:
            raise HTTPError(404, f"no route {shown(path)}; see Initialize's http_routes for the ones there are.")
        for route, match in matching:
            if route.method == method.upper():
                reply = await route.handler(provider, match.groupdict(), parse_body(body))
                if isinstance(reply, Response):  # a file (the glyph's assets), not JSON
                    return not_modified(reply, headers or {})
                response = json_response(*reply)
                if len(response.body) > ANSWER_BUDGET_BYTES:
                    # Each route bounds its own answer; this only keeps a missed case from failing the call.
                    log.error("%s %s answered %d bytes; refusing to send it", method, shown(path), len(response.body))
                    raise HTTPError(500, f"the answer was {len(response.body)} bytes, over the 4 MB limit.")
                return response
        allowed = ", ".join(sorted({route.method for route, _ in matching}))
        raise HTTPError(405, f"{shown(method)} is not allowed on {shown(path)}; use {allowed}.", {"Allow": allowed})
    except HTTPError as exc:
        return json_response(exc.status, {"error": str(exc)}, exc.headers)
    except ProviderClosing as exc:
        return json_response(503, {"error": f"{exc}."})
