"""Settings: one object built from the command line, then updated by Initialize's config map."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

log = logging.getLogger(__name__)

DEFAULT_PORT = 9000
DEFAULT_KERNEL = "python3"
DEFAULT_EXECUTE_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT_BYTES = 1_000_000
DEFAULT_POOL_SIZE = 1
DEFAULT_IDLE_TIMEOUT = 3600.0
DEFAULT_MAX_KERNELS = 64
# Runs without a glyph (QNTX's watcher actions): runner kernels at once, and runs that may wait.
DEFAULT_WATCHER_KERNELS = 8  # started only as runs come; about 50 MB each
DEFAULT_WATCHER_QUEUE = 1000
WATCHER_MODES = ("reset", "fresh")
# The share of a runner's time runs without a glyph may take while glyphs are active (see
# watchers.GlyphsFirst); 1 turns that pacing off.
DEFAULT_WATCHER_SHARE = 0.5
# An idle ipykernel already uses about 140 MB of data memory; below this it could not start.
MIN_KERNEL_MEMORY_MB = 256
# gRPC's default message ceiling, which QNTX's Go client keeps. The output cap
# must leave room for the same text appearing in `output`, `result.stdout` and
# `result.outputs`, so it may not exceed a third of this.
GRPC_MESSAGE_LIMIT = 4 * 1024 * 1024
MAX_OUTPUT_BYTES_CEILING = 1_300_000


# auto: sandbox where the platform allows it, else say so once and run kernels unsandboxed.
ISOLATION_MODES = ("auto", "sandbox", "none")
# none: a loopback of its own and nothing else; host: the host's network, loopback included.
KERNEL_NETWORKS = ("none", "host")


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message is one sentence for a person."""


@dataclass(frozen=True)
class Settings:
    name: str = "python"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # QNTX's --port: the next nine are tried when it is taken. An explicit --address is honoured or refused.
    retry_port: bool = True
    kernel: str = DEFAULT_KERNEL  # the default kernelspec, for glyphs that ask for none
    extra_kernels: tuple[str, ...] = ()  # more kernelspecs a glyph may ask for with `#| kernel: NAME`
    execute_timeout: float = DEFAULT_EXECUTE_TIMEOUT
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    pool_size: int = DEFAULT_POOL_SIZE  # kernels of the default kernelspec started ahead of need
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds without a run before a glyph's kernel stops; 0 = never
    max_kernels: int = DEFAULT_MAX_KERNELS  # ceiling on live kernels, pooled ones included
    kernel_memory_limit: int | None = None  # MB of data memory per kernel (RLIMIT_DATA); None = no limit
    watcher_kernels: int = DEFAULT_WATCHER_KERNELS  # runner kernels for runs without a glyph
    watcher_queue: int = DEFAULT_WATCHER_QUEUE  # runs without a glyph that may wait for a runner
    watcher_mode: str = "reset"  # "reset": runners reset between runs; "fresh": a kernel per run
    watcher_share: float = DEFAULT_WATCHER_SHARE  # of a runner's time, beside active glyphs; 1 = no pacing
    connection_dir: Path | None = None
    log_level: str = "info"
    isolation: str = "auto"  # ISOLATION_MODES: glyph kernels in a sandbox (kernels/sandbox.py) or not
    kernel_network: str = "none"  # KERNEL_NETWORKS: what network a sandboxed kernel gets
    # A Jupyter Kernel/Enterprise Gateway to run glyph kernels on ("" = kernels on this machine),
    # and the folder remembering which gateway kernel is whose, across provider restarts.
    gateway_url: str = ""
    gateway_token: str = dataclasses.field(default="", repr=False)
    state_dir: Path | None = None

    def resolved_connection_dir(self) -> Path:
        """The folder for this plugin's kernel connection files (default under the Jupyter runtime dir)."""
        if self.connection_dir is not None:
            return self.connection_dir
        return Path(jupyter_runtime_dir()) / "kernel_provider" / _safe_name(self.name)

    def resolved_state_dir(self) -> Path:
        """The folder for durable glyph sessions (default: this plugin's folder in the user data dir)."""
        if self.state_dir is not None:
            return self.state_dir
        return Path(jupyter_data_dir()) / "kernel_provider" / _safe_name(self.name)

    @property
    def served_kernels(self) -> tuple[str, ...]:
        return (self.kernel, *(k for k in self.extra_kernels if k != self.kernel))

    def with_config(self, config: Mapping[str, str]) -> Settings:
        """Apply Initialize's config map; unknown keys are logged and ignored."""
        changes: dict[str, Any] = {}
        for key, raw in config.items():
            field = CONFIG_FIELDS.get(key)
            if field is None:
                log.warning("ignoring unknown config key %r", key)
                continue
            changes[key] = field.parse(key, raw)
        if "kernels" in changes:  # a list: the first is the default, the rest may be asked for
            kernels = changes.pop("kernels")
            changes.setdefault("kernel", kernels[0])
            changes["extra_kernels"] = tuple(kernels)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ConfigField:
    """One key of Initialize's config map: its schema for ConfigSchema, and its parser."""

    type: str
    description: str
    default: str
    parse: Callable[[str, str], Any]
    min_value: str = ""
    max_value: str = ""


def parse_kernel_name(key: str, raw: str) -> str:
    name = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{key} must be a kernelspec name (letters, digits, '.', '_' or '-'), got {raw!r}.")
    return name


def parse_kernel_names(key: str, raw: str) -> tuple[str, ...]:
    """A JSON list (as QNTX encodes lists) or a comma-separated string of kernelspec names."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = [part for part in raw.split(",") if part.strip()]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a non-empty list of kernelspec names, got {raw!r}.")
    return tuple(parse_kernel_name(key, v) for v in value)


def parse_timeout(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a number of seconds, got {raw!r}.") from None
    if not (0 < value <= 86_400):
        raise ConfigError(f"{key} must be more than 0 and at most 86400 seconds, got {raw!r}.")
    return value


def parse_output_limit(key: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number of bytes, got {raw!r}.") from None
    if not (1024 <= value <= MAX_OUTPUT_BYTES_CEILING):
        raise ConfigError(
            f"{key} must be between 1024 and {MAX_OUTPUT_BYTES_CEILING} bytes so that an answer fits "
            f"gRPC's 4 MB message limit, got {raw!r}."
        )
    return value


def _whole_number(key: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, got {raw!r}.") from None
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high}, got {raw!r}.")
    return value


def parse_pool_size(key: str, raw: str) -> int:
    return _whole_number(key, raw, 0, 64)


def parse_max_kernels(key: str, raw: str) -> int:
    return _whole_number(key, raw, 1, 4096)


def parse_idle_timeout(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a number of seconds (0 = never), got {raw!r}.") from None
    if not 0 <= value <= 30 * 86_400 or value != value:
        raise ConfigError(f"{key} must be 0 (never) or up to 2592000 seconds, got {raw!r}.")
    return value


def parse_watcher_kernels(key: str, raw: str) -> int:
    return _whole_number(key, raw, 1, 64)


def parse_watcher_queue(key: str, raw: str) -> int:
    return _whole_number(key, raw, 0, 100_000)


def parse_watcher_mode(key: str, raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in WATCHER_MODES:
        raise ConfigError(f"{key} must be one of {', '.join(WATCHER_MODES)}, got {raw!r}.")
    return mode


def parse_watcher_share(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a number from 0.05 to 1, got {raw!r}.") from None
    if not 0.05 <= value <= 1:  # also refuses NaN
        raise ConfigError(f"{key} must be from 0.05 to 1 (1 turns pacing off), got {raw!r}.")
    return value


def parse_gateway_url(key: str, raw: str) -> str:
    url = raw.strip().rstrip("/")
    if url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ConfigError(f"{key} must be an http:// or https:// URL of a Jupyter gateway, got {raw!r}.")
    return url


def parse_text(key: str, raw: str) -> str:
    return raw.strip()


def parse_path(key: str, raw: str) -> Path | None:
    return Path(raw).expanduser().resolve() if raw.strip() else None


def parse_memory_limit(key: str, raw: str) -> int | None:
    if raw.strip().lower() in ("", "none", "0"):
        return None
    return _whole_number(key, raw, MIN_KERNEL_MEMORY_MB, 1_048_576)


CONFIG_FIELDS: dict[str, ConfigField] = {
    "kernel": ConfigField(
        type="string",
        description="Name of the Jupyter kernelspec every glyph kernel is started from.",
        default=DEFAULT_KERNEL,
        parse=parse_kernel_name,
    ),
    "kernels": ConfigField(
        type="array",
        description="Kernelspecs served at once: the first is the default, and a glyph whose code starts with "
        "`#| kernel: NAME` runs on NAME.",
        default=json.dumps([DEFAULT_KERNEL]),
        parse=parse_kernel_names,
    ),
    "execute_timeout": ConfigField(
        type="number",
        description="Seconds a run may take before its kernel is interrupted (a shorter gRPC deadline wins).",
        default=str(int(DEFAULT_EXECUTE_TIMEOUT)),
        parse=parse_timeout,
        min_value="0",
        max_value="86400",
    ),
    "pool_size": ConfigField(
        type="number",
        description="Kernels of the default kernelspec kept started ahead of need, so a new glyph's first run "
        "does not wait for a kernel to start.",
        default=str(DEFAULT_POOL_SIZE),
        parse=parse_pool_size,
        min_value="0",
        max_value="64",
    ),
    "idle_timeout": ConfigField(
        type="number",
        description="Seconds without a run after which a glyph's kernel is stopped (its next run starts fresh "
        "and says so); 0 = never.",
        default=str(int(DEFAULT_IDLE_TIMEOUT)),
        parse=parse_idle_timeout,
        min_value="0",
        max_value="2592000",
    ),
    "max_kernels": ConfigField(
        type="number",
        description="Most kernels alive at once; at the ceiling the least recently used idle glyph kernel is "
        "stopped, and when all are busy a run waits up to its timeout, then fails with a capacity error.",
        default=str(DEFAULT_MAX_KERNELS),
        parse=parse_max_kernels,
        min_value="1",
        max_value="4096",
    ),
    "kernel_memory_limit": ConfigField(
        type="number",
        description="MB of data memory each kernel may use (a glyph over it gets MemoryError); empty = no limit.",
        default="",
        parse=parse_memory_limit,
        min_value=str(MIN_KERNEL_MEMORY_MB),
    ),
    "watcher_kernels": ConfigField(
        type="number",
        description="Runner kernels that take runs without a glyph (QNTX's watcher actions) side by side; "
        "more runs wait in a queue.",
        default=str(DEFAULT_WATCHER_KERNELS),
        parse=parse_watcher_kernels,
        min_value="1",
        max_value="64",
    ),
    "watcher_queue": ConfigField(
        type="number",
        description="Runs without a glyph that may wait for a runner kernel; past it they fail at once with a "
        "capacity error.",
        default=str(DEFAULT_WATCHER_QUEUE),
        parse=parse_watcher_queue,
        min_value="0",
        max_value="100000",
    ),
    "watcher_mode": ConfigField(
        type="string",
        description="reset: runner kernels reset their namespace between runs (fast); fresh: a new kernel for "
        "every run without a glyph (strongest separation, one kernel start per run).",
        default="reset",
        parse=parse_watcher_mode,
    ),
    "watcher_share": ConfigField(
        type="number",
        description="While glyphs are active (one ran in the last second), runs without a glyph go one at a "
        "time and take at most this share of a runner's time, so that glyphs stay fast; 1 turns this off.",
        default=str(DEFAULT_WATCHER_SHARE),
        parse=parse_watcher_share,
        min_value="0.05",
        max_value="1",
    ),
    "max_output_bytes": ConfigField(
        type="number",
        description="Bytes of output kept per run; the rest is dropped with a marker saying how much.",
        default=str(DEFAULT_MAX_OUTPUT_BYTES),
        parse=parse_output_limit,
        min_value="1024",
        max_value=str(MAX_OUTPUT_BYTES_CEILING),
    ),
    "gateway_url": ConfigField(
        type="string",
        description="URL of a Jupyter Kernel Gateway or Enterprise Gateway to run glyph kernels on; empty = "
        "kernels on this machine. Gateway kernels survive a provider restart.",
        default="",
        parse=parse_gateway_url,
    ),
    "gateway_token": ConfigField(
        type="string",
        description="Auth token of the gateway (sent as `Authorization: token ...`).",
        default="",
        parse=parse_text,
    ),
    "state_dir": ConfigField(
        type="string",
        description="Folder (made 0700) remembering which gateway kernel belongs to which glyph.",
        default="",
        parse=parse_path,
    ),
}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "plugin"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
