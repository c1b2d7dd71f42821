"""A glyph's session as a Jupyter notebook: `GET /kernels/{glyph}/notebook` and `kernel-provider notebook`.

The notebook is nbformat v4: one code cell per recorded run (see history.py), in order,
with its outputs and execution count, and the kernelspec of the glyph's last run in the
metadata, so JupyterLab opens it on the same environment and nbclient can re-run it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from kernel_provider.history import Run

if TYPE_CHECKING:
    import nbformat

# nbformat is imported where a notebook is made, not with this module: its schema validator
# compiles a grammar on import (0.8 s of CPU), which every provider start paid for nothing.

# What the kernel sends beside an output that a notebook file does not keep.
_NOT_IN_NOTEBOOKS = ("transient",)


def kernelspec_metadata(kernel_name: str) -> dict[str, str]:
    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        return {"name": kernel_name, "display_name": kernel_name, "language": "python"}
    return {"name": kernel_name, "display_name": spec.display_name, "language": spec.language}


def notebook_of(runs: list[Run]) -> nbformat.NotebookNode:
    """The .ipynb of ``runs`` (not empty); valid by nbformat.validate."""
    import nbformat

    spec = kernelspec_metadata(runs[-1].kernel_name)
    cells = [
        nbformat.v4.new_code_cell(
            id=f"run-{run.number}",
            source=run.code,
            execution_count=run.execution_count,
            outputs=[notebook_output(output) for output in run.outputs],
        )
        for run in runs
    ]
    return nbformat.v4.new_notebook(
        cells=cells, metadata={"kernelspec": spec, "language_info": {"name": spec["language"]}}
    )


def notebook_output(output: dict[str, Any]) -> nbformat.NotebookNode:
    import nbformat

    kept = {key: value for key, value in output.items() if key not in _NOT_IN_NOTEBOOKS}
    if kept["output_type"] in ("display_data", "execute_result"):
        kept.setdefault("metadata", {})
    return nbformat.from_dict(kept)


# ---------------------------------------------------------------------------- the command


def notebook_command(args: argparse.Namespace) -> int:
    import grpc

    from kernel_provider.proto import domain_pb2, domain_pb2_grpc

    target = f"{args.target[0]}:{args.target[1]}"
    path = f"/kernels/{quote_glyph(args.glyph)}/notebook"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = domain_pb2_grpc.DomainPluginServiceStub(channel)
            response = stub.HandleHTTP(domain_pb2.HTTPRequest(method="GET", path=path), timeout=60)
    except grpc.RpcError as exc:
        print(f"kernel-provider: no provider answered at {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        try:
            reason = json.loads(response.body).get("error", "")
        except ValueError:
            reason = response.body.decode("utf-8", "replace")
        print(f"kernel-provider: {reason}", file=sys.stderr)
        return 1
    import nbformat

    # Written as Jupyter writes notebooks (indented, sorted keys), after checking it is one.
    text = nbformat.writes(nbformat.reads(response.body.decode("utf-8"), as_version=4))
    if args.output is None:
        sys.stdout.write(text + "\n")
    else:
        args.output.write_text(text + "\n", encoding="utf-8")
        print(f"saved glyph {args.glyph!r}'s session to {args.output}", file=sys.stderr)
    return 0


def quote_glyph(glyph_id: str) -> str:
    from urllib.parse import quote

    return quote(glyph_id, safe="")


def add_notebook_parser(commands) -> None:
    from kernel_provider.cli import _host_port
    from kernel_provider.config import DEFAULT_PORT

    parser = commands.add_parser("notebook", help="save a glyph's session (its runs so far) as a Jupyter notebook")
    parser.add_argument("glyph", help="the glyph id")
    parser.add_argument("-o", "--output", type=Path, help="the .ipynb file to write (default: standard output)")
    parser.add_argument(
        "--target",
        type=_host_port,
        default=("127.0.0.1", DEFAULT_PORT),
        help=f"HOST:PORT of the running provider (default 127.0.0.1:{DEFAULT_PORT})",
    )
    parser.set_defaults(handler=notebook_command)
