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

from conftest import http, launch

TINY = "kp-tiny-pkg"


def tiny_wheel(folder: Path, version: str = "1.0") -> Path:
    """A pure-Python wheel with one module, kp_tiny, saying its version."""
    files = {
        "kp_tiny.py": f"VALUE = 'tiny {version}'\n",
        f"kp_tiny_pkg-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {TINY}\nVersion: {version}\n",
        f"kp_tiny_pkg-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: kernel_provider-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record_name = f"kp_tiny_pkg-{version}.dist-info/RECORD"
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{record_name},,")
    path = folder / f"kp_tiny_pkg-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
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
    tiny_wheel(wheels)
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
