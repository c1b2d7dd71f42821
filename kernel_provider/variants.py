"""Variant launchers: `qntx-NAME-plugin` scripts that serve plugin NAME on one kernelspec.

QNTX finds a plugin NAME as the executable `qntx-NAME-plugin` in `~/.qntx/plugins/` and runs it as
`qntx-NAME-plugin --port N [flags]`. A variant is a small POSIX shell script of that name which
execs this installation's `qntx-python-plugin` with `--name NAME --kernel KERNELSPEC` bound and
QNTX's own flags after them: a single-valued flag given at launch wins (argparse keeps the last
value), and a `--kernel` given at launch is served besides ours, which stays the default (the
first `--kernel` is). The script's second line marks it as ours; `list`, `remove` and `install`
only ever see or touch files carrying that line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kernel_provider.config import ConfigError

DEFAULT_DIR = Path("~/.qntx/plugins")
MARKER = "# made by kernel-provider variant install"
_BINDING = re.compile(r"# variant: name=(?P<name>\S+) kernelspec=(?P<kernelspec>\S+)")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class VariantError(Exception):
    """A refusal with the sentence to print and the exit status to end with."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Variant:
    name: str
    kernelspec: str
    path: str


def launcher_path(name: str, directory: Path) -> Path:
    return directory / f"qntx-{name}-plugin"


def entry_point() -> list[str]:
    """The command that starts this installation's plugin server, absolute paths only."""
    # Not resolved: a venv's python is a symlink whose location is what makes it the venv's.
    bin_dir = Path(sys.executable).absolute().parent
    console_script = bin_dir / "qntx-python-plugin"
    if console_script.is_file() and os.access(console_script, os.X_OK):
        return [str(console_script)]
    return [str(Path(sys.executable).absolute()), "-m", "kernel_provider", "serve"]


def launcher_script(name: str, kernelspec: str, jupyter_path: Path | None = None) -> str:
    """The launcher; ``jupyter_path`` is a Jupyter data folder QNTX's environment must see for the kernelspec."""
    command = " ".join(shlex.quote(part) for part in [*entry_point(), "--name", name, "--kernel", kernelspec])
    environment = ""
    if jupyter_path is not None:
        folder = shlex.quote(str(jupyter_path))
        environment = (
            "# The kernelspec is under a prefix, which Jupyter finds only through JUPYTER_PATH.\n"
            f"JUPYTER_PATH={folder}${{JUPYTER_PATH:+:$JUPYTER_PATH}}; export JUPYTER_PATH\n"
        )
    return (
        "#!/bin/sh\n"
        f"{MARKER}; remove it with: kernel-provider variant remove {name}\n"
        f"# variant: name={name} kernelspec={kernelspec}\n"
        "# Flags given at launch follow ours: a later --name wins; a later --kernel is served besides ours.\n"
        f"{environment}"
        f'exec {command} "$@"\n'
    )


def data_dir_needing_jupyter_path(kernelspec: str) -> Path | None:
    """The Jupyter data folder holding KERNELSPEC when only JUPYTER_PATH makes it visible, else None."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_core.paths import jupyter_path

    resource_dir = KernelSpecManager().find_kernel_specs().get(kernelspec)
    if resource_dir is None:
        return None
    data_dir = Path(resource_dir).resolve().parent.parent
    extra = {Path(p).resolve() for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p}
    if data_dir not in extra:
        return None
    saved = os.environ.pop("JUPYTER_PATH")
    try:
        default = {Path(p).resolve() for p in jupyter_path()}
    finally:
        os.environ["JUPYTER_PATH"] = saved
    return None if data_dir in default else data_dir


def read_variant(path: Path) -> Variant | None:
    """The variant a launcher binds, or None when the file is not one we wrote."""
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            head = [file.readline() for _ in range(3)]
    except (OSError, UnicodeError):
        return None
    if len(head) < 3 or not head[1].startswith(MARKER):
        return None
    match = _BINDING.fullmatch(head[2].rstrip("\n"))
    if not match:
        return None
    return Variant(match.group("name"), match.group("kernelspec"), str(path))


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise VariantError(
            f"A variant name is letters, digits, '_' and '-' only (it becomes qntx-NAME-plugin); got {name!r}.", 2
        )


def install(name: str, kernelspec: str, directory: Path, force: bool = False) -> Variant:
    from kernel_provider.provider import check_kernelspecs

    check_name(name)
    try:
        check_kernelspecs(kernelspec)
    except ConfigError as exc:
        raise VariantError(str(exc), 2) from None
    directory = directory.expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    path = launcher_path(name, directory)
    if path.exists() or path.is_symlink():
        if read_variant(path) is None:
            raise VariantError(f"{path} exists and was not made by kernel-provider; it is left alone.")
        if not force:
            raise VariantError(f"The variant {name!r} is already installed at {path}; use --force to replace it.")
    # Write beside it and rename, so QNTX never launches a half-written script.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(launcher_script(name, kernelspec, data_dir_needing_jupyter_path(kernelspec)))
        os.chmod(temporary, 0o755)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Variant(name, kernelspec, str(path))


def list_variants(directory: Path) -> list[Variant]:
    directory = directory.expanduser()
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("qntx-*-plugin")):
        variant = read_variant(path)
        if variant is not None and path.is_file():
            found.append(variant)
    return found


def remove(name: str, directory: Path) -> Variant:
    check_name(name)
    path = launcher_path(name, directory.expanduser())
    if not (path.exists() or path.is_symlink()):
        raise VariantError(f"No variant named {name!r} in {path.parent}.")
    variant = read_variant(path)
    if variant is None:
        raise VariantError(f"{path} was not made by kernel-provider; it is left alone.")
    path.unlink()
    return variant


def format_table(variants: list[Variant]) -> str:
    rows = [("NAME", "KERNELSPEC", "PATH")] + [(v.name, v.kernelspec, v.path) for v in variants]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)


def add_commands(commands) -> None:
    """Register the `variant` group on `kernel-provider`'s subcommands."""
    parser = commands.add_parser("variant", help="install, list or remove qntx-NAME-plugin launchers")
    parser.set_defaults(handler=run)
    actions = parser.add_subparsers(dest="variant_command", required=True)
    dir_help = f"plugin folder (default {DEFAULT_DIR})"

    install_parser = actions.add_parser("install", help="write qntx-NAME-plugin serving NAME on a kernelspec")
    install_parser.add_argument("name", help="plugin name: letters, digits, '_' and '-'")
    install_parser.add_argument("--kernel", required=True, metavar="KERNELSPEC", help="kernelspec it runs glyphs on")
    install_parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=dir_help)
    install_parser.add_argument("--force", action="store_true", help="replace a variant of that name made by us")

    list_parser = actions.add_parser("list", help="the variants in the folder made by kernel-provider")
    list_parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=dir_help)
    list_parser.add_argument("--json", action="store_true", help="print JSON")

    remove_parser = actions.add_parser("remove", help="remove a variant made by kernel-provider")
    remove_parser.add_argument("name")
    remove_parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=dir_help)


def run(args: argparse.Namespace) -> int:
    try:
        if args.variant_command == "install":
            variant = install(args.name, args.kernel, args.dir, force=args.force)
            print(f"installed {variant.path} (plugin {variant.name!r} on kernelspec {variant.kernelspec!r})")
        elif args.variant_command == "list":
            variants = list_variants(args.dir)
            if args.json:
                print(json.dumps([asdict(v) for v in variants], indent=2))
            elif variants:
                print(format_table(variants))
            else:
                print(f"no variants in {args.dir.expanduser()}")
        else:
            variant = remove(args.name, args.dir)
            print(f"removed {variant.path}")
    except VariantError as exc:
        print(f"kernel-provider: {exc}", file=sys.stderr)
        return exc.status
    return 0
