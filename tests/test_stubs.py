"""The committed gRPC stubs are exactly what scripts/generate_protos.py makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kernel_provider.proto import domain_pb2, python_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)], check=True)
    generated = {p.name: p.read_bytes() for p in (tmp_path / "kernel_provider" / "proto").glob("*_pb2*")}
    committed = {p.name: p.read_bytes() for p in (ROOT / "kernel_provider" / "proto").glob("*_pb2*")}
    assert generated, "the script generated nothing"
    assert sorted(generated) == sorted(committed)
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"regenerate with `python scripts/generate_protos.py`: {stale} differ"


def test_wire_numbers_match_the_qntx_contract():
    """Field numbers are the contract with an unmodified QNTX core; a renumbering is a silent break."""
    numbers = {f.name: f.number for f in python_pb2.PythonExecuteRequest.DESCRIPTOR.fields}
    assert numbers == {"code": 1, "glyph_id": 2, "upstream_attestation": 3}
    numbers = {f.name: f.number for f in python_pb2.PythonExecuteResponse.DESCRIPTOR.fields}
    assert numbers == {"success": 1, "output": 2, "error": 3, "result": 4}
    # ExecuteStream is ours alone (QNTX never calls it), but a field number once given stays.
    numbers = {f.name: f.number for f in python_pb2.PythonExecuteEvent.DESCRIPTOR.fields}
    assert numbers == {
        "output": 1,
        "done": 2,
        "clear_output": 3,
        "update_display_data": 4,
        "display_id": 5,
        "dropped": 6,
    }
    init = {f.name: f.number for f in domain_pb2.InitializeResponse.DESCRIPTOR.fields}
    assert init["python_provider"] == 9 and init["http_routes"] == 8 and init["handler_names"] == 1
    request = {f.name: f.number for f in domain_pb2.InitializeRequest.DESCRIPTOR.fields}
    assert request["config"] == 4 and request["auth_token"] == 3 and request["fetch_endpoint"] == 12
    services = {
        s.full_name: [m.name for m in s.methods]
        for s in [
            *domain_pb2.DESCRIPTOR.services_by_name.values(),
            *python_pb2.DESCRIPTOR.services_by_name.values(),
        ]
    }
    assert services["protocol.PythonService"] == ["Execute", "ExecuteStream"]
    assert services["protocol.DomainPluginService"] == [
        "Metadata",
        "Initialize",
        "Shutdown",
        "HandleHTTP",
        "HandleWebSocket",
        "Health",
        "ConfigSchema",
        "RegisterGlyphs",
        "ExecuteJob",
        "ParseAxQuery",
    ]
