"""Check the provider against a real Jupyter Enterprise Gateway (not part of the test suite).

Enterprise Gateway 3.3.0 pins jupyter_client<7 and jupyter_server<2, so it cannot share the
provider's environment: this script builds it a virtual environment of its own (once), starts
it on 127.0.0.1 with a random port and a token, and drives a provider on it as QNTX would:
state per glyph, then SIGKILL of the provider and a restart that must find each glyph's kernel
and variables again, with no new kernel on the gateway. Run it with the provider's Python:

    python scripts/enterprise_gateway_check.py [--venv DIR]

It prints each step and exits 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc

EG_VERSION = "3.3.0"
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"eg-check: {message}", flush=True)


def build_venv(venv: Path) -> Path:
    executable = venv / "bin" / "jupyter-enterprisegateway"
    if not executable.exists():
        say(f"building Enterprise Gateway {EG_VERSION} in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"jupyter_enterprise_gateway=={EG_VERSION}", "ipykernel"], check=True)
    return executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(url: str, token: str, path: str):
    request = urllib.request.Request(url + path, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_gateway(executable: Path, folder: Path) -> tuple[subprocess.Popen, str, str]:
    port, token = free_port(), secrets.token_hex(16)
    command = [
        str(executable),
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--EnterpriseGatewayApp.auth_token={token}",
        "--EnterpriseGatewayApp.list_kernels=True",
    ]
    log = open(folder / "eg.log", "w")  # noqa: SIM115 - kept open for the gateway's life
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(folder / "runtime"), "JUPYTER_PATH": ""}
    process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            rest(url, token, "/api/kernelspecs")
            return process, url, token
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"Enterprise Gateway did not start; see {folder / 'eg.log'}") from None
            time.sleep(0.3)


class Provider:
    def __init__(self, folder: Path, url: str, token: str, state_dir: Path):
        command = [
            str(BIN / "qntx-python-plugin"),
            *("--port", "0", "--connection-dir", str(folder), "--pool-size", "0"),
            *("--gateway-url", url, "--gateway-token", token, "--state-dir", str(state_dir)),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("QNTX_PLUGIN_PORT="):
            raise SystemExit(f"the provider did not start: {line!r}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{line.strip().split('=', 1)[1]}")
        domain_pb2_grpc.DomainPluginServiceStub(self.channel).Initialize(domain_pb2.InitializeRequest(), timeout=60)
        self.python = python_pb2_grpc.PythonServiceStub(self.channel)

    def run(self, code: str, glyph: str) -> dict:
        request = python_pb2.PythonExecuteRequest(code=code, glyph_id=glyph)
        return json.loads(self.python.Execute(request, timeout=180).result)


def check(condition: bool, what: str) -> None:
    say(f"{'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        raise SystemExit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "kernel-provider-eg-venv")
    args = parser.parse_args()
    executable = build_venv(args.venv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        gateway, url, token = start_gateway(executable, folder)
        say(f"Enterprise Gateway {EG_VERSION} on {url}")
        providers: list[Provider] = []
        try:
            first = Provider(folder / "conn1", url, token, folder / "state")
            providers.append(first)
            started = time.perf_counter()
            check(first.run("x = 'alpha'", "a")["success"], "glyph a sets x on an EG kernel")
            say(f"first run (kernel start on EG included): {time.perf_counter() - started:.2f} s")
            check(first.run("x = 'beta'", "b")["success"], "glyph b sets x on its own EG kernel")
            check(first.run("x", "a")["result"] == "'alpha'", "glyph a keeps its state, apart from b")
            kernels = {k["id"] for k in rest(url, token, "/api/kernels")}
            check(len(kernels) == 2, "two kernels on the gateway")
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(timeout=30)
            second = Provider(folder / "conn2", url, token, folder / "state")
            providers.append(second)
            check(second.run("x", "a")["result"] == "'alpha'", "after SIGKILL, glyph a re-attached with its state")
            check(second.run("x", "b")["result"] == "'beta'", "after SIGKILL, glyph b re-attached with its state")
            after = {k["id"] for k in rest(url, token, "/api/kernels")}
            check(after == kernels, "no new kernel on the gateway")
        finally:
            for provider in providers:
                if provider.process.poll() is None:
                    provider.process.terminate()
                    provider.process.wait(timeout=30)
            for kernel in rest(url, token, "/api/kernels") if gateway.poll() is None else []:
                request = urllib.request.Request(
                    f"{url}/api/kernels/{kernel['id']}", method="DELETE", headers={"Authorization": f"token {token}"}
                )
                urllib.request.urlopen(request, timeout=30).read()
            gateway.terminate()
            gateway.wait(timeout=30)
    say("every check held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
