"""The provider's shared state: settings, glyph sessions, and the signal to stop."""

from __future__ import annotations

import asyncio
import hmac
import logging
import statistics
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from kernel_provider.attestations import AttestationService, StoreAddress
from kernel_provider.config import ConfigError, Settings
from kernel_provider.sessions import RunRequest, SessionManager

log = logging.getLogger(__name__)

try:
    __version__ = version("kernel_provider")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


def installed_kernelspecs() -> list[str]:
    return sorted(KernelSpecManager().find_kernel_specs())


def check_kernelspecs(*names: str) -> None:
    """Raise ConfigError naming the installed kernelspecs when one of ``names`` is not among them."""
    installed = installed_kernelspecs()
    for name in names:
        if name not in installed:
            listing = ", ".join(installed) or "none"
            raise ConfigError(
                f"No kernelspec named {name!r} is installed (one under a --prefix is found only through "
                f"JUPYTER_PATH=PREFIX/share/jupyter); installed kernelspecs: {listing}."
            )


class LoopLag:
    """How late the provider's event loop runs a timer: anything that blocks the loop shows here.

    Every run, stream and Health call waits on this one loop, so its lag is the provider's own
    responsiveness; the last minute of samples is kept (Health details: loop_lag_*).
    """

    INTERVAL = 0.05
    SAMPLES = 1200  # a minute at INTERVAL

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=self.SAMPLES)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.INTERVAL)
            self.samples.append(max(loop.time() - before - self.INTERVAL, 0.0))

    def details(self) -> dict[str, str]:
        if len(self.samples) < 2:
            return {}
        p99 = statistics.quantiles(self.samples, n=100, method="inclusive")[98]
        return {"loop_lag_p99_ms": f"{p99 * 1000:.1f}", "loop_lag_max_ms": f"{max(self.samples) * 1000:.1f}"}

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Provider:
    """What every servicer shares. Created once per process."""

    def __init__(self, settings: Settings):
        # The flags; each Initialize applies its config map to these afresh, so a key
        # that a later Initialize leaves out goes back to the flag's value.
        self.base_settings = settings
        self.settings = settings
        self.stopping = asyncio.Event()
        self.version = __version__
        # Where attest() and last() reach QNTX's attestation store; set by Initialize.
        self.ats_store_endpoint = ""
        self.auth_token = ""
        self._store_credentials_set = False
        # Serves the attest() and last() of every glyph kernel; see attestations.py.
        self.attestations = AttestationService(self.store_address)
        self.sessions = SessionManager(settings, self.attestations)
        self.loop_lag = LoopLag()

    def store_address(self) -> StoreAddress:
        return StoreAddress(self.ats_store_endpoint, self.auth_token, self.settings.name, self.version)

    def may_set_store_credentials(self, endpoint: str, token: str) -> bool:
        """Whether an Initialize may set this ATS endpoint and token.

        The first Initialize fixes them. A later one may repeat them, or move the endpoint
        when it carries the first's (non-empty) token; anyone else who can reach our port
        (a glyph, a local process) must not redirect every glyph's attest() to their store.
        """
        if not self._store_credentials_set or (endpoint, token) == (self.ats_store_endpoint, self.auth_token):
            return True
        return bool(self.auth_token) and hmac.compare_digest(token.encode("utf-8"), self.auth_token.encode("utf-8"))

    def set_store_credentials(self, endpoint: str, token: str) -> None:
        self.ats_store_endpoint, self.auth_token = endpoint, token
        self._store_credentials_set = True

    async def apply_config(self, config: dict[str, str]) -> None:
        settings = self.base_settings.with_config(config)
        if not settings.gateway_url:  # a gateway's kernelspecs are the gateway's to check
            check_kernelspecs(*settings.served_kernels)
        self.settings = settings
        await self.sessions.reconfigure(settings)

    def run_request(self, code: str, upstream: Any, timeout: float | None = None, **extra: Any) -> RunRequest:
        """A run with this provider's limits; a request's own ``timeout`` replaces the configured one."""
        return RunRequest(
            code=code,
            upstream=upstream,
            timeout=timeout if timeout is not None else self.settings.execute_timeout,
            output_limit=self.settings.max_output_bytes,
            **extra,
        )

    def request_stop(self) -> None:
        self.stopping.set()
