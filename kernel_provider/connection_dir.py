"""The provider's own connection folder: claiming it, and telling our files from anyone else's.

The folder (``--connection-dir``) holds live kernels' connection files and ipc sockets.
The provider may chmod it and clean what a killed predecessor left in it, so it must
be sure the folder and each file are its own: a folder it created (or adopted while
empty) carries a marker file, a connection file it wrote carries its label, and an ipc
socket is named as we name them. Nothing else is ever changed or deleted, and no path
read from a file is ever followed.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

MARKER_NAME = ".kernel_provider"
# A connection file's label key (see label_connection_file): the mark of a file we wrote.
LABEL_KEY = "kernel_provider"
# ipc socket bases are "ipc-<12 hex digits>" (transport_options); zmq adds "-<port>".
IPC_BASE = re.compile(r"ipc-[0-9a-f]{12}")
_IPC_SOCKET = re.compile(r"(ipc-[0-9a-f]{12})-[0-9]+")
# Connection files larger than this are not ours (ours are well under 1 KB).
_MAX_CONNECTION_FILE_BYTES = 64 * 1024


class ConnectionDirError(Exception):
    """The folder is not ours to use; the message is one sentence for a person."""


def claim_connection_dir(path: Path, *, default: bool = False) -> Path:
    """Make ``path`` the provider's folder: create it (mode 0700), or adopt it if it is ours or empty.

    A folder we created is kept private (0700). One we did not create is adopted only when it
    is empty or holds nothing but files we wrote, and is never chmodded. Raises
    ConnectionDirError otherwise. Subfolders (the warm pool's, ...) are claimed the same way.
    The ``default`` folder (<jupyter runtime dir>/kernel_provider/NAME) is ours by its name:
    only this program uses it, and a provider from before markers left it unmarked.
    """
    if not path.exists():
        try:
            path.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass  # another provider made it at the same moment: judged below like any folder
        else:
            _write_marker(path, created=True)
    if path.is_symlink() or not path.is_dir():
        raise ConnectionDirError(f"the connection folder {path} is not a folder; give one of its own.")
    marker = read_marker(path)
    if marker is None and (default or (read_marker(path.parent) or {}).get("created") is True):
        # Inside a private folder we created, only we could have made it (an older provider's
        # subfolder, from before markers): ours.
        _write_marker(path, created=True)
        marker = {"created": True}
    if marker is None:
        stranger = next((entry for entry in path.iterdir() if not is_ours(entry)), None)
        if stranger is not None:
            raise ConnectionDirError(
                f"the connection folder {path} holds {stranger.name!r}, which this provider did not write; "
                "give it an empty folder or one of its own."
            )
        _write_marker(path, created=False)
        marker = read_marker(path) or {"created": False}
    if marker.get("created") is True and stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker (what we wrote when we claimed it), or None when it has none."""
    marker = folder / MARKER_NAME
    try:
        if marker.is_symlink() or not marker.is_file():
            return None
        value = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get(LABEL_KEY) == "connection folder" else None


def _write_marker(folder: Path, *, created: bool) -> None:
    try:
        fd = os.open(folder / MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return  # another provider marked it at the same moment
    with os.fdopen(fd, "w") as handle:
        json.dump({LABEL_KEY: "connection folder", "created": created}, handle)


def read_connection_file(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (a regular file of connection-file size), or None."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_CONNECTION_FILE_BYTES:
            return None
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def connection_file_label(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The label of a connection file we wrote, or None for any other file."""
    label = info.get(LABEL_KEY) if info is not None else None
    return label if isinstance(label, dict) else None


def our_folders(folder: Path) -> list[Path]:
    """``folder`` and every subfolder in it we claimed, at any depth."""
    found, pending = [], [folder]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += [e for e in current.iterdir() if e.is_dir() and not e.is_symlink() and read_marker(e)]
    return found


def ipc_socket_base(path: Path) -> str | None:
    """The base name of a socket named as transport_options names ours; None for anything else."""
    match = _IPC_SOCKET.fullmatch(path.name)
    try:
        return match.group(1) if match and stat.S_ISSOCK(path.lstat().st_mode) else None
    except OSError:
        return None


def is_ipc_socket(path: Path) -> bool:
    return ipc_socket_base(path) is not None


def ipc_base_name(info: dict[str, Any]) -> str | None:
    """The name of a connection file's ipc socket base when it is one of ours; never a path to follow."""
    if info.get("transport") != "ipc" or not isinstance(info.get("ip"), str):
        return None
    name = Path(info["ip"]).name
    return name if IPC_BASE.fullmatch(name) else None


def is_ours(entry: Path) -> bool:
    """Whether we wrote ``entry``: our marker, a labelled connection file, our ipc socket, a folder we claimed."""
    if entry.name == MARKER_NAME:
        return read_marker(entry.parent) is not None
    if entry.is_dir() and not entry.is_symlink():
        return read_marker(entry) is not None
    return is_ipc_socket(entry) or connection_file_label(read_connection_file(entry)) is not None
