"""Where kernels come from: the one interface sessions use, and its backends.

Sessions ask a backend for a started kernel and give it back when done; nothing above
this package knows how or where a kernel runs. Backends, one module each (jupyter_client's
``provisioning/`` is the model):

- ``local``: jupyter_client kernel managers on this machine, a warm pool, a ceiling;
- ``sandbox``: a kernel provisioner that starts a local kernel inside namespaces.
"""

from kernel_provider.kernels.local import (
    KERNEL_START_TIMEOUT,
    CapacityError,
    KernelSupply,
    StartedKernel,
    clean_stale_files,
    kernel_interpreter,
    label_connection_file,
)

__all__ = [
    "KERNEL_START_TIMEOUT",
    "CapacityError",
    "KernelSupply",
    "StartedKernel",
    "clean_stale_files",
    "kernel_interpreter",
    "label_connection_file",
]
