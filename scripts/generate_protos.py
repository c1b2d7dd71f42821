"""Regenerate the committed gRPC stubs in kernel_provider/proto/ from protos/.

Usage: python scripts/generate_protos.py [--out DIR]

The stubs are committed so that installing the provider needs no protoc; the
test suite runs this script into a temporary folder and fails when the result
differs from what is committed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE_PATH = "kernel_provider/proto"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto into out/kernel_provider/proto."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTOS.glob("*.proto"))
    # Mapping protos/ onto the package path makes protoc emit imports such as
    # "from kernel_provider.proto import python_pb2", which work from anywhere.
    # grpc_tools ships the well-known types (google/protobuf/struct.proto, ...) beside
    # itself; protoc, unlike the protoc binary, does not add them on its own.
    well_known = pathlib.Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PACKAGE_PATH}={PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[f"{PACKAGE_PATH}/{p.name}" for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")
    generated = sorted((out / PACKAGE_PATH).glob("*_pb2*.py*"))
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT, help="root to write kernel_provider/proto/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
