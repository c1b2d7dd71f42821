"""Where kernels come from: the one interface sessions use, and its backends.

Sessions ask a backend for a started kernel and give it back when done; nothing above
this package knows how or where a kernel runs. Backends, one module each (jupyter_client's
``provisioning/`` is the model):

- ``local``: jupyter_client kernel managers on this machine, a warm pool, a ceiling;
- ``gateway``: kernels on a Jupyter Kernel Gateway or Enterprise Gateway, which outlive
  the provider and are re-attached when it starts again;
- ``sandbox``: a kernel provisioner that starts a local kernel inside namespaces.

``make_supply`` picks the backend once, at start. A supply offers:

- ``obtain(kernel_name, glyph_id | None, timeout)``: a ready kernel for the glyph (the
  glyph's surviving kernel when the backend keeps one, ``kernel.resumed`` then True);
- ``give_back(kernel)``: stop it for good (DELETE, culling, eviction, restart);
- ``detach(kernel)``: let go of it on provider shutdown; a gateway kernel keeps running
  for the next provider, a local one stops;
- ``remembered()``: glyph_id -> kernelspec of kernels a previous provider left to re-attach;
- ``configure_pool``, ``capacity``, ``pooled``, ``started``, ``close()``.

A kernel offers ``connection`` (a KernelConnection), ``interrupt()``, ``is_alive()``,
``kernel_name``, ``resumed``, ``connection_file`` (None when there is none to attach to) and
``missed_output()`` (what the glyph's code printed while no provider was attached, told once).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from kernel_provider.config import Settings
from kernel_provider.kernels.gateway import GatewayKernel, GatewaySupply, GatewayUnavailable
from kernel_provider.kernels.local import (
    KERNEL_START_TIMEOUT,
    CapacityError,
    KernelSupply,
    StartedKernel,
    clean_stale_files,
    kernel_interpreter,
    label_connection_file,
)

Kernel = StartedKernel | GatewayKernel
Supply = KernelSupply | GatewaySupply


def make_supply(
    settings: Settings, make_room: Callable[[], Awaitable[bool]], setup_code: Callable[[], str] | None = None
) -> Supply:
    """The kernel backend the settings ask for: a gateway when one is named, else this machine."""
    if settings.gateway_url:
        return GatewaySupply(
            settings.gateway_url,
            settings.gateway_token,
            settings.resolved_state_dir(),
            settings.max_kernels,
            make_room,
            setup_code,
        )
    return KernelSupply(settings.resolved_connection_dir(), settings.name, settings.max_kernels, make_room, setup_code)


__all__ = [
    "KERNEL_START_TIMEOUT",
    "CapacityError",
    "GatewayKernel",
    "GatewaySupply",
    "GatewayUnavailable",
    "Kernel",
    "KernelSupply",
    "StartedKernel",
    "Supply",
    "clean_stale_files",
    "kernel_interpreter",
    "label_connection_file",
    "make_supply",
]
