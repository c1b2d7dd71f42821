"""Packages from the canvas: install into the environment of the kernelspec a glyph runs on, and list it.

Only into a virtual environment that is not the provider's own: the kernelspec's real
interpreter is asked for its sys.prefix and sys.base_prefix, and an install is refused
when they are equal (a system or base Python, or a conda environment) or when the
prefix is the provider's. Only requirement specifiers (PEP 508 names, extras, versions,
markers) are accepted: no URLs, paths or installer options. uv installs when it is on
PATH, pip (the target's own) otherwise; one install at a time per provider. A live
glyph on that environment sees the new package without a restart: its import caches
are invalidated once the install is done.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from packaging.requirements import InvalidRequirement, Requirement

from kernel_provider.kernels import kernel_interpreter

if TYPE_CHECKING:
    from kernel_provider.provider import Provider

MAX_PACKAGES = 50
MAX_SPECIFIER_LENGTH = 200
INSTALL_TIMEOUT_SECONDS = 900
PROBE_TIMEOUT_SECONDS = 60
KEPT_OUTPUT_LINES = 200  # the tail of the installer's output given back with the answer
MAX_LINE_CHARACTERS = 1000  # longer lines of the installer's output are cut

# Run by the target interpreter: where it lives, and what it has installed.
_PROBE = (
    "import json, sys\n"
    "from importlib.metadata import distributions\n"
    "installed = {}\n"
    "for d in distributions():\n"
    "    name = d.metadata['Name']\n"
    "    if name: installed.setdefault(name, d.version)\n"
    "print(json.dumps({'prefix': sys.prefix, 'base_prefix': sys.base_prefix,\n"
    "                  'python': sys.version.split()[0], 'packages': installed}))\n"
)

_install_lock = asyncio.Lock()


class PackageError(Exception):
    """A request we refuse or an install that failed; the message is one sentence for the person."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_packages(value: Any) -> list[str]:
    """The requested requirement specifiers, checked; raises PackageError naming the first bad one."""
    if not isinstance(value, list) or not value:
        raise PackageError('send the packages to install as "packages", a non-empty list of strings.')
    if len(value) > MAX_PACKAGES:
        raise PackageError(f"at most {MAX_PACKAGES} packages per install, got {len(value)}.")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise PackageError(f"each package must be a non-empty string, got {json.dumps(item)[:80]}.")
        if len(item) > MAX_SPECIFIER_LENGTH:
            raise PackageError(f"a package specifier is at most {MAX_SPECIFIER_LENGTH} characters long.")
        shown = json.dumps(item)[:80]
        if item.lstrip().startswith("-"):
            raise PackageError(f"{shown} is an installer option; send only requirement specifiers.")
        try:
            requirement = Requirement(item)
        except InvalidRequirement:
            raise PackageError(
                f"{shown} is not a requirement specifier (a name with optional extras, versions and "
                "markers, e.g. requests>=2.31)."
            ) from None
        if requirement.url:
            raise PackageError(f"{shown} names a URL; only packages from the package index can be installed.")
    return [item.strip() for item in value]


@dataclass(frozen=True)
class Environment:
    kernelspec: str
    interpreter: str
    prefix: str
    base_prefix: str
    python: str
    packages: dict[str, str]

    def refusal(self) -> str | None:
        """Why nothing may be installed here, or None when it may."""
        if os.path.realpath(self.prefix) == os.path.realpath(sys.prefix):
            return f"kernelspec {self.kernelspec!r} runs in the provider's own environment ({self.prefix})."
        if os.path.realpath(self.prefix) == os.path.realpath(self.base_prefix):
            return (
                f"kernelspec {self.kernelspec!r} runs on a Python that is not a virtual environment ({self.prefix}); "
                "give the glyph a kernelspec of its own (kernel-provider env create)."
            )
        return None

    def summary(self) -> dict[str, Any]:
        refusal = self.refusal()
        return {
            "kernelspec": self.kernelspec,
            "interpreter": self.interpreter,
            "prefix": self.prefix,
            "python": self.python,
            "installable": refusal is None,
            "not_installable_because": refusal,
            "packages": [
                {"name": name, "version": version}
                for name, version in sorted(self.packages.items(), key=lambda item: item[0].lower())
            ],
        }


async def environment(kernelspec: str) -> Environment:
    """Ask the kernelspec's own interpreter where it lives and what it has."""
    try:
        spec = KernelSpecManager().get_kernel_spec(kernelspec)
    except NoSuchKernel:
        raise PackageError(f"no kernelspec named {kernelspec!r} is installed.", 404) from None
    interpreter = kernel_interpreter(spec.argv)
    try:
        process = await asyncio.create_subprocess_exec(
            interpreter, "-c", _PROBE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError as exc:
        raise PackageError(f"kernelspec {kernelspec!r}'s interpreter {interpreter} cannot run: {exc}.", 409) from None
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT_SECONDS)
        found = json.loads(stdout)
    except (TimeoutError, ValueError):
        if process.returncode is None:
            process.kill()
        reason = f"kernelspec {kernelspec!r}'s interpreter {interpreter} is not a working Python."
        raise PackageError(reason, 409) from None
    prefixes = found["prefix"], found["base_prefix"]
    return Environment(kernelspec, interpreter, *prefixes, found["python"], found["packages"])


def installer_command(interpreter: str, packages: list[str]) -> list[str]:
    uv = shutil.which("uv")
    if uv:
        return [uv, "pip", "install", "--python", interpreter, "--", *packages]
    return [interpreter, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--", *packages]


async def install(kernelspec: str, packages: list[str], on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Install ``packages`` (already checked) into ``kernelspec``'s environment; what changed, and the output's tail.

    Raises PackageError when the environment is forbidden or the installer fails.
    """
    async with _install_lock:
        before = await environment(kernelspec)
        refusal = before.refusal()
        if refusal:
            raise PackageError(f"will not install into it: {refusal}", 403)
        command = installer_command(before.interpreter, packages)
        tail: deque[str] = deque(maxlen=KEPT_OUTPUT_LINES)
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL
        )

        def emit(raw: bytes) -> None:
            line = raw.decode("utf-8", "replace").rstrip()[:MAX_LINE_CHARACTERS]
            tail.append(line)
            if on_line is not None:
                on_line(line)

        async def relay() -> None:
            # By chunks, not readline: a line of any length (a progress bar) must not stop the relay.
            assert process.stdout is not None
            pending = b""
            while chunk := await process.stdout.read(65536):
                *lines, pending = (pending + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
                for raw in lines:
                    emit(raw)
                pending = pending[: MAX_LINE_CHARACTERS * 4]  # the rest of an overlong line is dropped
            if pending:
                emit(pending)

        try:
            await asyncio.wait_for(asyncio.gather(relay(), process.wait()), INSTALL_TIMEOUT_SECONDS)
        except TimeoutError:
            reason = f"the install took longer than {INSTALL_TIMEOUT_SECONDS} s and was stopped."
            raise PackageError(reason, 504) from None
        finally:
            if process.returncode is None:  # timed out, or the request was cancelled
                process.kill()
                await process.wait()
        after = await environment(kernelspec)
    installed = [
        {"name": name, "version": version}
        for name, version in sorted(after.packages.items())
        if before.packages.get(name) != version
    ]
    answer = {
        "kernelspec": kernelspec,
        "installer": "pip" if command[0] == before.interpreter else "uv",
        "installed": installed,
        "output": list(tail),
    }
    if process.returncode != 0:
        last = next((line for line in reversed(tail) if line.strip()), "no output")
        raise PackageError(f"the install failed (exit status {process.returncode}): {last}", 422)
    return answer


def chosen_kernelspec(body: dict[str, Any], glyph_kernel: str | None, default: str, served: tuple[str, ...]) -> str:
    """The kernelspec named in the request, else the one the glyph runs on, else the provider's default."""
    named = body.get("kernelspec")
    if named is not None and not isinstance(named, str):
        raise PackageError("kernelspec must be a string.")
    kernelspec = named or glyph_kernel or default
    if kernelspec not in served:
        listing = ", ".join(served)
        raise PackageError(f"this provider does not serve the kernelspec {kernelspec!r}; it serves: {listing}.")
    return kernelspec


async def install_from_request(
    provider: Provider, body: dict[str, Any], glyph_id: str, on_line: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """POST /packages and the websocket's install action: check, install, and let live glyphs see it."""
    requested = parse_packages(body.get("packages"))
    session = provider.sessions.sessions.get(glyph_id) if glyph_id else None
    settings = provider.settings
    kernelspec = chosen_kernelspec(
        body, session.kernel_name if session else None, settings.kernel, settings.served_kernels
    )
    answer = await install(kernelspec, requested, on_line)
    await refresh_imports(provider, kernelspec)
    return answer


async def refresh_imports(provider: Provider, kernelspec: str) -> None:
    """Let live glyphs on ``kernelspec`` import what was just installed, without a restart."""
    sessions = provider.sessions
    live = [s for s in sessions.sessions.values() if s.kernel_name == kernelspec and s.kernel is not None]
    expression = "__import__('importlib').invalidate_caches()"
    await asyncio.gather(
        *(asyncio.wait_for(sessions.evaluate(s.glyph_id, expression, 30), 30) for s in live),
        return_exceptions=True,  # a busy or dying glyph still finds the package once Python rescans
    )


# ---------------------------------------------------------------------------- over the websocket


def install_action(data: bytes) -> dict[str, Any] | None:
    """The request of a websocket DATA message that asks for an install ({"action": "install", ...}), else None."""
    if b'"action"' not in data:  # a run: spare it a second JSON parse
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    return body if isinstance(body, dict) and body.get("action") == "install" else None


async def answer_install_action(
    provider: Provider, body: dict[str, Any], send: Callable[[dict[str, Any]], None]
) -> None:
    """Stream the installer's output as {"type": "install_output", "line"} answers, then one
    {"type": "install_result", "result"} or {"type": "error", "error"}; each with the request's id."""
    extra = {"id": body["id"]} if "id" in body else {}
    glyph_id = body.get("glyph_id") or ""
    try:
        if not isinstance(glyph_id, str):
            raise PackageError("glyph_id must be a string.")
        result = await install_from_request(
            provider, body, glyph_id, lambda line: send({"type": "install_output", "line": line, **extra})
        )
    except PackageError as exc:
        send({"type": "error", "error": str(exc), **extra})
        return
    send({"type": "install_result", "result": result, **extra})
