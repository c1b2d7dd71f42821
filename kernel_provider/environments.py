"""Environments: build a virtual environment with ipykernel and packages, and register it as a kernelspec.

An environment is defined by a folder `kernelspecs/NAME/` holding `env.json` (JSON, not TOML: it is the
same format as the kernel.json it turns into, and both readers are in the standard library):

    {"name": "bio", "display_name": "Python (QNTX bio)", "packages": ["biopython"],
     "python": "python3.12", "system_site_packages": false}

Only `packages` is required; `name` defaults to the folder's name. `kernel-provider env create` makes a
stdlib venv (with pip) for it, installs ipykernel and then each package with one pip call apiece (so a
failure names its package without parsing pip's output), and installs a kernelspec `qntx-NAME` whose
metadata says it was made here. A failed build leaves nothing behind: no kernelspec, no venv folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kernel_provider.kernels import kernel_interpreter

KERNEL_PREFIX = "qntx-"
CREATED_BY = "kernel-provider env create"
DEFINITION_FILE = "env.json"
REPO_KERNELSPECS = Path(__file__).resolve().parent.parent / "kernelspecs"
START_TIMEOUT = 60.0
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_KEYS = {"name", "display_name", "packages", "python", "system_site_packages", "description"}


class EnvError(Exception):
    """A sentence for the user, and the exit status that goes with it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Definition:
    name: str
    display_name: str
    packages: list[str] = field(default_factory=list)
    python: str = sys.executable
    system_site_packages: bool = False
    source: Path | None = None


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise EnvError(f"environment name {name!r} may only use letters, digits, '_' and '-'.", exit_code=2)
    return name


def load_definition(folder: Path) -> Definition:
    path = folder / DEFINITION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EnvError(f"cannot read {path}: {exc}", exit_code=2) from None
    if not isinstance(data, dict):
        raise EnvError(f"{path} must hold a JSON object.", exit_code=2)
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise EnvError(f"{path} has unknown keys {unknown}; known: {sorted(_KEYS)}.", exit_code=2)
    packages = data.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) and p.strip() for p in packages):
        raise EnvError(f"{path}: 'packages' must be a list of pip requirement strings.", exit_code=2)
    name = validate_name(str(data.get("name", folder.name)))
    site = data.get("system_site_packages", False)
    if not isinstance(site, bool):
        raise EnvError(f"{path}: 'system_site_packages' must be true or false.", exit_code=2)
    return Definition(
        name=name,
        display_name=str(data.get("display_name") or f"Python (QNTX {name})"),
        packages=list(packages),
        python=str(data.get("python") or sys.executable),
        system_site_packages=site,
        source=folder.resolve(),
    )


def find_definition(ref: str) -> Path | None:
    """The folder REF names: REF itself (a path, relative to the current directory), then
    ./kernelspecs/REF, then the repository's kernelspecs/REF. None when no candidate has env.json."""
    candidates = [Path(ref)]
    if _NAME.fullmatch(ref):
        candidates += [Path.cwd() / "kernelspecs" / ref, REPO_KERNELSPECS / ref]
    for folder in candidates:
        if (folder / DEFINITION_FILE).is_file():
            return folder
    return None


def available_definitions() -> list[str]:
    names = set()
    for root in (Path.cwd() / "kernelspecs", REPO_KERNELSPECS):
        if root.is_dir():
            names.update(p.parent.name for p in root.glob(f"*/{DEFINITION_FILE}"))
    return sorted(names)


def resolve(ref: str, packages: list[str], python: str | None = None, system_site: bool | None = None) -> Definition:
    """A definition from a kernelspecs folder (plus extra --package), or from --package alone."""
    folder = find_definition(ref)
    if folder is not None:
        definition = load_definition(folder)
        definition.packages += [p for p in packages if p not in definition.packages]
    elif packages and _NAME.fullmatch(ref):
        definition = Definition(name=ref, display_name=f"Python (QNTX {ref})", packages=list(packages))
    elif "/" not in ref and os.sep not in ref:
        validate_name(ref)
        known = ", ".join(available_definitions()) or "none"
        raise EnvError(
            f"no environment definition {ref!r} (looked for {ref}/{DEFINITION_FILE}, ./kernelspecs/{ref}/ and "
            f"{REPO_KERNELSPECS}/{ref}/; known: {known}); or give its packages with --package.",
            exit_code=2,
        )
    else:
        raise EnvError(f"no {DEFINITION_FILE} in {ref}.", exit_code=2)
    if python:
        definition.python = python
    if system_site is not None:
        definition.system_site_packages = system_site
    return definition


def default_envs_dir() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "kernel_provider" / "envs"


def env_python(env_path: Path) -> Path:
    return env_path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def prefix_data_dir(prefix: str | os.PathLike) -> Path:
    """The Jupyter data folder under PREFIX, where `--prefix` puts kernelspecs (as `jupyter kernelspec install`)."""
    return Path(prefix).expanduser().resolve() / "share" / "jupyter"


def use_prefix(prefix: str | os.PathLike) -> None:
    """Make Jupyter (here and in kernels we start) see kernelspecs under PREFIX, the way JUPYTER_PATH does."""
    data_dir = str(prefix_data_dir(prefix))
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    if data_dir not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([data_dir, *paths])


def visible_without_help(kernel_name: str) -> bool:
    """Whether Jupyter finds KERNEL_NAME without a --prefix, i.e. whether other programs will."""
    from jupyter_client.kernelspec import KernelSpecManager

    return kernel_name in KernelSpecManager().find_kernel_specs()


def _stream(cmd: list[str], prefix: str) -> int:
    """Run CMD, copying each line it prints to stderr behind PREFIX; its exit status."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert process.stdout is not None
    for line in process.stdout:
        sys.stderr.write(f"{prefix}{line.rstrip()}\n")
        sys.stderr.flush()
    return process.wait()


def _kernel_json(definition: Definition, env_path: Path) -> dict:
    return {
        "argv": [str(env_python(env_path)), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": definition.display_name,
        "language": "python",
        "metadata": {
            "kernel_provider": {
                "environment": definition.name,
                "env_path": str(env_path),
                "packages": list(definition.packages),
                "created_by": CREATED_BY,
            }
        },
    }


def create(definition: Definition, envs_dir: Path | None = None, user: bool = False, prefix: str | None = None) -> dict:
    """Build the venv, install ipykernel and the packages, install the kernelspec; clean up on any failure."""
    from jupyter_client.kernelspec import KernelSpecManager

    kernel_name = KERNEL_PREFIX + validate_name(definition.name)
    env_path = ((envs_dir or default_envs_dir()) / definition.name).resolve()
    if env_path.exists():
        raise EnvError(f"{env_path} already exists; remove it first (kernel-provider env remove {definition.name}).")
    manager = KernelSpecManager()
    if kernel_name in manager.find_kernel_specs():
        raise EnvError(f"kernelspec {kernel_name} already exists; remove it first (kernel-provider env remove ...).")
    python = shutil.which(definition.python) or definition.python
    try:
        env_path.parent.mkdir(parents=True, exist_ok=True)
        venv_cmd = [python, "-m", "venv", *(["--system-site-packages"] if definition.system_site_packages else [])]
        if _stream([*venv_cmd, str(env_path)], "[venv] ") != 0:
            raise EnvError(f"{python} could not create a virtual environment at {env_path}.")
        # One pip call per package: a failure then names its package without parsing pip's output.
        for package in ["ipykernel", *definition.packages]:
            pip = [str(env_python(env_path)), "-m", "pip", "install", "--disable-pip-version-check", package]
            status = _stream(pip, f"[pip {package}] ")
            if status != 0:
                raise EnvError(
                    f"pip could not install {package!r} (exit {status}); "
                    f"no kernelspec was registered and {env_path} was removed."
                )
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "kernel.json").write_text(json.dumps(_kernel_json(definition, env_path), indent=1))
            resource_dir = manager.install_kernel_spec(tmp, kernel_name, user=user, prefix=prefix)
    except BaseException:
        shutil.rmtree(env_path, ignore_errors=True)
        raise
    return {"kernel_name": kernel_name, "resource_dir": resource_dir, "env_path": str(env_path)}


def _python_version(argv: list[str]) -> str | None:
    if not argv:
        return None
    exe = kernel_interpreter(argv)
    try:
        done = subprocess.run(
            [exe, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


async def _starts(name: str, timeout: float) -> tuple[bool, str | None]:
    """Start a real kernel from spec NAME, wait until it answers, shut it down."""
    from jupyter_client.manager import AsyncKernelManager

    manager = AsyncKernelManager(kernel_name=name)
    try:
        # The kernel's own output must not mix into our stdout (the JSON listing).
        await manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=timeout)
        finally:
            client.stop_channels()
        return True, None
    except Exception as exc:  # noqa: BLE001 - any failure to start is the answer
        return False, f"{type(exc).__name__}: {exc}".strip()
    finally:
        if manager.has_kernel:
            await manager.shutdown_kernel(now=True)


def list_environments(check: bool = True, timeout: float = START_TIMEOUT) -> list[dict]:
    from jupyter_client.kernelspec import KernelSpecManager

    rows = []
    for name, entry in sorted(KernelSpecManager().get_all_specs().items()):
        spec = entry.get("spec", {})
        ours = spec.get("metadata", {}).get("kernel_provider") or {}
        made_by_us = ours.get("created_by") == CREATED_BY
        argv = spec.get("argv", [])
        rows.append(
            {
                "name": name,
                "display_name": spec.get("display_name", ""),
                "language": spec.get("language", ""),
                "python_version": _python_version(argv) if spec.get("language", "").lower() == "python" else None,
                "ours": made_by_us,
                "environment": ours.get("environment") if made_by_us else None,
                "env_path": ours.get("env_path") if made_by_us else None,
                "packages": ours.get("packages") if made_by_us else None,
                "resource_dir": entry.get("resource_dir"),
                "argv": argv,
                "starts": None,
                "start_error": None,
            }
        )
    if check and rows:

        async def check_all():
            return await asyncio.gather(*(_starts(row["name"], timeout) for row in rows))

        for row, (ok, error) in zip(rows, asyncio.run(check_all()), strict=True):
            row["starts"], row["start_error"] = ok, error
    return rows


def format_table(rows: list[dict]) -> str:
    def mark(value):
        return "-" if value is None else ("yes" if value else "no")

    table = [("KERNELSPEC", "PYTHON", "OURS", "STARTS", "DISPLAY NAME")]
    table += [
        (r["name"], r["python_version"] or "-", mark(r["ours"]), mark(r["starts"]), r["display_name"]) for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(line[:4], widths, strict=True)), line[4]]) for line in table]
    errors = [f"{r['name']}: {r['start_error']}" for r in rows if r["start_error"]]
    return "\n".join(lines + errors)


def remove(name: str) -> dict:
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    kernel_name = KERNEL_PREFIX + name
    specs = manager.get_all_specs()
    if kernel_name not in specs:
        ours = sorted(
            (s["spec"].get("metadata", {}).get("kernel_provider") or {}).get("environment") or n
            for n, s in specs.items()
            if (s["spec"].get("metadata", {}).get("kernel_provider") or {}).get("created_by") == CREATED_BY
        )
        raise EnvError(f"no environment {name!r} (kernelspec {kernel_name}); ours: {', '.join(ours) or 'none'}.")
    meta = specs[kernel_name]["spec"].get("metadata", {}).get("kernel_provider") or {}
    resource_dir = manager.remove_kernel_spec(kernel_name)
    removed_env = None
    env_path = Path(meta["env_path"]) if meta.get("created_by") == CREATED_BY and meta.get("env_path") else None
    # Only ever delete a folder that is a virtual environment.
    if env_path is not None and (env_path / "pyvenv.cfg").is_file():
        shutil.rmtree(env_path)
        removed_env = str(env_path)
    return {"kernel_name": kernel_name, "resource_dir": resource_dir, "env_path": removed_env}


def add_env_parser(commands) -> None:
    """Register `kernel-provider env create|list|remove` on the CLI's subparsers."""
    env = commands.add_parser("env", help="build, list and remove environments (kernelspecs)")
    actions = env.add_subparsers(dest="env_command", required=True)

    create_parser = actions.add_parser("create", help="build an environment and install its kernelspec qntx-NAME")
    create_parser.add_argument(
        "ref",
        metavar="NAME|PATH",
        help=f"a folder with {DEFINITION_FILE} (as given, ./kernelspecs/NAME, then the repo's kernelspecs/NAME), "
        "or a bare NAME with --package",
    )
    create_parser.add_argument("--package", action="append", default=[], help="pip requirement (repeatable)")
    where = create_parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install the kernelspec for the current user (the default)")
    where.add_argument(
        "--system", action="store_true", help="install the kernelspec in the system-wide Jupyter path (may need root)"
    )
    where.add_argument("--prefix", help="install the kernelspec under PREFIX/share/jupyter/kernels")
    where.add_argument("--sys-prefix", action="store_true", help=f"same as --prefix {sys.prefix}")
    create_parser.add_argument("--envs-dir", type=Path, help=f"where the venv goes (default {default_envs_dir()})")
    create_parser.add_argument("--python", help="interpreter to build the venv with (default: the definition's)")
    create_parser.add_argument(
        "--system-site-packages",
        action="store_true",
        default=None,
        help="let the venv see the base interpreter's packages",
    )

    list_parser = actions.add_parser(
        "list", help="every kernelspec, its Python, whether we made it and it starts (exit 1 when one does not)"
    )
    list_parser.add_argument("--no-check", action="store_true", help="do not start a kernel from each spec")
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    list_parser.add_argument("--timeout", type=float, default=START_TIMEOUT, help="seconds a kernel gets to start")
    prefix_help = "also look under PREFIX/share/jupyter/kernels (for an environment created with --prefix)"
    list_parser.add_argument("--prefix", help=prefix_help)

    remove_parser = actions.add_parser("remove", help="remove kernelspec qntx-NAME and the venv we built for it")
    remove_parser.add_argument("name", metavar="NAME")
    remove_parser.add_argument("--prefix", help=prefix_help)
    env.set_defaults(handler=run_env)


def run_env(args: argparse.Namespace) -> int:
    try:
        if args.env_command == "create":
            definition = resolve(args.ref, args.package, args.python, args.system_site_packages)
            prefix = sys.prefix if args.sys_prefix else args.prefix
            # Unlike `jupyter kernelspec install`, the default is the user's own Jupyter path:
            # it needs no root, and the provider run by that user always finds it.
            user = args.user or (prefix is None and not args.system)
            done = create(definition, args.envs_dir, user=user, prefix=prefix)
            print(f"installed kernelspec {done['kernel_name']} in {done['resource_dir']} (venv {done['env_path']})")
            if not visible_without_help(done["kernel_name"]):
                data_dir = Path(done["resource_dir"]).parent.parent
                print(
                    f"Jupyter finds kernelspecs under a prefix only through JUPYTER_PATH: set "
                    f"JUPYTER_PATH={data_dir} where the provider (and QNTX) run, or pass --prefix {prefix} "
                    f"to env list and env remove."
                )
        elif args.env_command == "list":
            if args.prefix:
                use_prefix(args.prefix)
            rows = list_environments(check=not args.no_check, timeout=args.timeout)
            print(json.dumps(rows, indent=2) if args.json else format_table(rows))
            if any(row["starts"] is False for row in rows):
                return 1  # a kernelspec whose kernel does not start is a failure, as scripts need to know
        else:
            if args.prefix:
                use_prefix(args.prefix)
            done = remove(validate_name(args.name))
            extra = f" and {done['env_path']}" if done["env_path"] else ""
            print(f"removed kernelspec {done['kernel_name']} ({done['resource_dir']}){extra}")
    except EnvError as exc:
        print(f"kernel-provider: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
