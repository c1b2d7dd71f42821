"""Packages from the canvas: POST /packages and GET /packages against real environments.

The test builds a throwaway virtual environment with its own kernelspec (`ipykernel install
--prefix`), which sees the test environment's ipykernel through a .pth file instead of
downloading it, and a tiny wheel in a temporary folder; pip finds it there through
PIP_FIND_LINKS with the index switched off, so nothing here needs the network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import pytest
from qntx_canvas import Canvas, open_glyph, run_code, wait_until_idle

from conftest import http, launch
from kernel_provider.proto import domain_pb2

Message = domain_pb2.WebSocketMessage

TINY = "kp-tiny-pkg"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def tiny_wheel(folder: Path, name: str = TINY, version: str = "1.0") -> Path:
    """A pure-Python wheel of ``name`` with one module (the name with underscores) saying its version."""
    module, dist = name.replace("-", "_").removesuffix("_pkg"), name.replace("-", "_")
    files = {
        f"{module}.py": f"VALUE = 'tiny {version}'\n",
        f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: kernel_provider-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record_name = f"{dist}-{version}.dist-info/RECORD"
    record = []
    for file_name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{file_name},sha256={digest},{len(text.encode())}")
    record.append(f"{record_name},,")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for file_name, text in files.items():
            wheel.writestr(file_name, text)
        wheel.writestr(record_name, "\n".join(record) + "\n")
    return path


def run(*command: str | Path) -> str:
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True, timeout=300).stdout


@pytest.fixture(scope="module")
def environments(tmp_path_factory):
    """A provider serving three kernelspecs: a throwaway venv (default), its own env (python3), a system Python."""
    root = tmp_path_factory.mktemp("packages")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(purelib, "provider-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    data = root / "data"
    run(python, "-m", "ipykernel", "install", "--prefix", data, "--name", "kp-venv")
    system_spec = data / "share" / "jupyter" / "kernels" / "kp-system"
    system_spec.mkdir(parents=True)
    system_python = Path(sys.base_prefix) / "bin" / "python3"
    argv = [str(system_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (system_spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "system", "language": "python"}))
    wheels = root / "wheels"
    wheels.mkdir()
    for name in (TINY, "kp-socket-pkg", "kp-panel-pkg"):
        tiny_wheel(wheels, name)
    env = {
        "JUPYTER_PATH": str(data / "share" / "jupyter"),
        "PIP_FIND_LINKS": str(wheels),
        "PIP_NO_INDEX": "1",
        "UV_FIND_LINKS": str(wheels),
        "UV_NO_INDEX": "1",
    }
    kernels = ("--kernel", "kp-venv", "--kernel", "python3", "--kernel", "kp-system", "--pool-size", "0")
    plugin = launch(root / "conn", *kernels, env=env)
    yield plugin, python, system_python
    assert plugin.stop() == 0


def listed(plugin) -> dict[str, dict]:
    status, _, answer = http(plugin, "GET", "/packages")
    assert status == 200
    return {environment["kernelspec"]: environment for environment in answer["environments"]}


def has_tiny(python: Path) -> bool:
    return (
        run(python, "-c", "import importlib.util; print(importlib.util.find_spec('kp_tiny') is not None)").strip()
        == "True"
    )


BAD_REQUESTS = [
    ({"packages": ["requests; rm -rf /"]}, "is not a requirement specifier"),
    ({"packages": ["-e ."]}, "is an installer option"),
    ({"packages": ["--index-url=http://127.0.0.1:1/simple", TINY]}, "is an installer option"),
    ({"packages": ["../elsewhere"]}, "is not a requirement specifier"),
    ({"packages": ["git+https://example.invalid/x.git"]}, "is not a requirement specifier"),
    ({"packages": [f"{TINY} @ https://example.invalid/x.whl"]}, "names a URL"),
    ({"packages": [""]}, "non-empty string"),
    ({"packages": [42]}, "non-empty string"),
    ({"packages": []}, "non-empty list of strings"),
    ({"packages": TINY}, "non-empty list of strings"),
    ({}, "non-empty list of strings"),
    ({"packages": ["a" * 300]}, "at most 200 characters"),
    ({"packages": [f"p{i}" for i in range(51)]}, "at most 50 packages"),
    ({"packages": [TINY], "kernelspec": "not-served"}, "does not serve the kernelspec 'not-served'"),
]


@pytest.mark.parametrize(("body", "said"), BAD_REQUESTS)
def test_bad_package_requests_get_a_clear_error_and_change_nothing(environments, body, said):
    plugin, python, _ = environments
    before = listed(plugin)["kp-venv"]["packages"]
    status, _, answer = http(plugin, "POST", "/packages", body)
    assert status == 400 and said in answer["error"], answer
    assert answer["error"].endswith(".")
    assert listed(plugin)["kp-venv"]["packages"] == before


def test_the_providers_own_environment_and_a_system_python_are_refused(environments):
    plugin, _, system_python = environments
    status, _, answer = http(plugin, "POST", "/packages", {"packages": [TINY], "kernelspec": "python3"})
    assert status == 403
    assert answer["error"].startswith("will not install into it: kernelspec 'python3' runs in the provider's own")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version(TINY)  # this test process runs in the provider's environment

    status, _, answer = http(plugin, "POST", "/packages", {"packages": [TINY], "kernelspec": "kp-system"})
    assert status == 403 and "is not a virtual environment" in answer["error"]
    assert not has_tiny(system_python)

    environments_listed = listed(plugin)
    assert environments_listed["python3"]["installable"] is False
    assert environments_listed["kp-system"]["installable"] is False
    assert environments_listed["kp-venv"]["installable"] is True


def test_a_failed_install_says_why(environments):
    plugin, python, _ = environments
    status, _, answer = http(plugin, "POST", "/packages", {"packages": [f"{TINY}==9.9"]})
    assert status == 422 and answer["error"].startswith("the install failed (exit status 1): ")
    assert not has_tiny(python)


def test_an_installed_package_is_importable_in_the_running_glyph_without_a_restart(environments):
    plugin, python, _ = environments
    glyph_id = f"pkg-{uuid.uuid4().hex[:8]}"
    before = plugin.run("kept = 'same kernel'\nimport kp_tiny", glyph_id)
    assert not before["success"] and "ModuleNotFoundError" in before["error"]

    status, _, answer = http(plugin, "POST", "/packages", {"packages": [f"{TINY}==1.0"], "glyph_id": glyph_id})
    assert status == 200, answer
    assert answer["kernelspec"] == "kp-venv"
    assert answer["installed"] == [{"name": TINY, "version": "1.0"}]
    assert answer["installer"] in ("pip", "uv") and answer["output"]

    after = plugin.run("import kp_tiny\nprint(kp_tiny.VALUE, kept)", glyph_id)
    assert after["success"], after["error"]
    assert after["stdout"] == "tiny 1.0 same kernel\n"
    assert {"name": TINY, "version": "1.0"} in listed(plugin)["kp-venv"]["packages"]
    assert has_tiny(python)


def test_an_install_over_the_websocket_streams_the_installers_output(environments):
    plugin, python, _ = environments
    request = {"id": "i-1", "action": "install", "packages": ["kp-socket-pkg"]}
    bad = {"id": "i-2", "action": "install", "packages": ["--pre"]}
    sent = [Message(type=Message.DATA, data=json.dumps(r).encode()) for r in (bad, request)]
    answers = [json.loads(m.data) for m in plugin.domain.HandleWebSocket(iter(sent), timeout=300)]
    refused = [a for a in answers if a["id"] == "i-2"]
    said = '"--pre" is an installer option; send only requirement specifiers.'
    assert refused == [{"type": "error", "error": said, "id": "i-2"}]
    installing = [a for a in answers if a["id"] == "i-1"]
    progress, last = installing[:-1], installing[-1]
    assert progress and all(a["type"] == "install_output" for a in progress)
    assert any("kp-socket-pkg" in a["line"] for a in progress)
    assert last["type"] == "install_result" and last["id"] == "i-1"
    assert last["result"]["installed"] == [{"name": "kp-socket-pkg", "version": "1.0"}]
    assert [a["line"] for a in progress][-len(last["result"]["output"]) :] == last["result"]["output"]
    assert run(python, "-c", "import kp_socket; print(kp_socket.VALUE)") == "tiny 1.0\n"


def test_the_glyphs_packages_panel_lists_and_installs(environments, browser):
    from playwright.sync_api import expect

    plugin, _, _ = environments
    with Canvas(plugin.port) as canvas:
        page = open_glyph(browser, canvas, f"panel-{uuid.uuid4().hex[:8]}")
        run_code(page, "import sys\nprint(sys.prefix)")
        wait_until_idle(page, 1)
        expect(page.locator(".kp-kernelspec")).to_have_text("kp-venv")
        page.get_by_role("button", name="Packages").click()
        expect(page.locator(".kp-package-list")).to_contain_text("pip ")
        page.locator(".kp-package-names").fill("kp-panel-pkg")
        page.get_by_role("button", name="Install").click()
        expect(page.locator(".kp-package-log")).to_contain_text("installed: kp-panel-pkg 1.0")
        expect(page.locator(".kp-package-list")).to_contain_text("kp-panel-pkg 1.0")
        run_code(page, "import kp_panel\nprint(kp_panel.VALUE)")
        wait_until_idle(page, 2)
        expect(page.locator(".kp-outputs .kp-stdout")).to_have_text("tiny 1.0\n")
        page.screenshot(path=str(ARTIFACTS / "jupyter-glyph-packages.png"))
        page.close()
