"""`kernel-provider env create|list|remove`, for real: a real venv, real pip, a real kernel from the spec.

The environment is built with --system-site-packages so most of ipykernel's dependencies (IPython,
traitlets, ...) come from the base interpreter and pip only adds ipykernel itself. Note: that is the
*base* interpreter's site-packages (the project venv's own packages are not inherited by a venv made
from it). The package proving the install is `tomli_w`: tiny, pure Python, and present in neither the
project venv nor the base interpreter (`six` is in the base interpreter here, so importing it would
prove nothing). Every Jupyter path points into tmp dirs: nothing leaks into the user's Jupyter dirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from jupyter_client.manager import start_new_kernel

PACKAGE, MODULE = "tomli_w", "tomli_w"
MISSING = "this-package-does-not-exist-kp-123"


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    prefix, envs = root / "prefix", root / "envs"
    env = dict(os.environ)
    env.update(
        JUPYTER_PATH=str(prefix / "share" / "jupyter"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        JUPYTER_CONFIG_DIR=str(root / "config"),
    )
    return {"env": env, "prefix": prefix, "envs": envs}


def kp(jupyter, *args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "kernel_provider", "env", *args],
        env=jupyter["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def create_args(jupyter, name, *packages):
    args = ["create", name, "--prefix", str(jupyter["prefix"]), "--envs-dir", str(jupyter["envs"])]
    return [*args, "--system-site-packages", *(a for p in packages for a in ("--package", p))]


def spec_dir(jupyter, name):
    return jupyter["prefix"] / "share" / "jupyter" / "kernels" / f"qntx-{name}"


@pytest.fixture(scope="module")
def built(jupyter):
    for python in (sys.executable, sys._base_executable):
        probe = subprocess.run([python, "-c", f"import {MODULE}"], capture_output=True)
        assert probe.returncode != 0, f"{MODULE} is already importable from {python}; the import proof would lie"
    done = kp(jupyter, *create_args(jupyter, "tiny", PACKAGE))
    assert done.returncode == 0, done.stderr
    return done


def test_create_installs_kernelspec_with_our_metadata(jupyter, built):
    assert f"[pip {PACKAGE}] " in built.stderr  # pip's progress is streamed, prefixed
    spec = json.loads((spec_dir(jupyter, "tiny") / "kernel.json").read_text())
    env_path = jupyter["envs"] / "tiny"
    assert spec["argv"] == [
        str(env_path.resolve() / "bin" / "python"),
        "-m",
        "ipykernel_launcher",
        "-f",
        "{connection_file}",
    ]
    assert spec["display_name"] == "Python (QNTX tiny)"
    assert spec["metadata"]["kernel_provider"] == {
        "environment": "tiny",
        "env_path": str(env_path.resolve()),
        "packages": [PACKAGE],
        "created_by": "kernel-provider env create",
    }


def test_kernel_from_spec_imports_the_package(jupyter, built, monkeypatch):
    for key in ("JUPYTER_PATH", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR"):
        monkeypatch.setenv(key, jupyter["env"][key])
    manager, client = start_new_kernel(kernel_name="qntx-tiny", startup_timeout=60)
    try:
        code = f"import sys, {MODULE}; print({MODULE}.__file__.startswith(sys.prefix), sys.prefix)"
        seen = []
        reply = client.execute_interactive(
            code, timeout=60, output_hook=lambda m: seen.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok"
        assert "".join(seen).startswith("True " + str((jupyter["envs"] / "tiny").resolve()))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_list_json_shows_it_starting(jupyter, built):
    done = kp(jupyter, "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    row = rows["qntx-tiny"]
    assert row["ours"] is True and row["starts"] is True, row
    assert row["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert rows["python3"]["ours"] is False
    table = kp(jupyter, "list", "--no-check")
    assert table.returncode == 0 and "qntx-tiny" in table.stdout and "KERNELSPEC" in table.stdout


def test_failed_package_leaves_nothing(jupyter):
    done = kp(jupyter, *create_args(jupyter, "broken", MISSING))
    assert done.returncode == 1
    assert MISSING in done.stderr.splitlines()[-1]
    assert not spec_dir(jupyter, "broken").exists()
    assert not (jupyter["envs"] / "broken").exists()


def test_bad_name_exits_2(jupyter):
    done = kp(jupyter, *create_args(jupyter, "no good!", PACKAGE))
    assert done.returncode == 2 and "letters, digits" in done.stderr
    assert not (jupyter["envs"] / "no good!").exists()


def test_glyph_runs_on_the_environment_through_grpc(jupyter, built, fresh_provider):
    """As QNTX would: the provider serves the default and the new kernelspec; only the latter has the package."""
    env = {
        k: jupyter["env"][k] for k in ("JUPYTER_PATH", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR")
    }
    plugin = fresh_provider("--kernel", "python3", "--kernel", "qntx-tiny", env=env)
    there = plugin.run(f"#| kernel: qntx-tiny\nimport {MODULE}\n{MODULE}.dumps({{'a': 1}})", "bio-glyph")
    assert there["success"], there["error"]
    assert there["result"] == repr("a = 1\n")
    not_here = plugin.run(f"import {MODULE}", "plain-glyph")
    assert not not_here["success"]
    assert not_here["error"].startswith("ModuleNotFoundError")


def test_remove_deletes_kernelspec_and_env(jupyter, built):
    unknown = kp(jupyter, "remove", "nope")
    assert unknown.returncode == 1 and "tiny" in unknown.stderr
    done = kp(jupyter, "remove", "tiny")
    assert done.returncode == 0, done.stderr
    assert not spec_dir(jupyter, "tiny").exists()
    assert not (jupyter["envs"] / "tiny").exists()


def test_a_prefix_needs_jupyter_path_and_list_and_remove_take_it(jupyter, tmp_path):
    """The README's path: create under a prefix, then list, serve and remove without JUPYTER_PATH set."""
    prefix = tmp_path / "elsewhere"
    env = {k: v for k, v in jupyter["env"].items() if k != "JUPYTER_PATH"}

    def run(*args):
        command = [sys.executable, "-m", "kernel_provider", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    create = ["env", "create", "pfx", "--prefix", str(prefix), "--envs-dir", str(jupyter["envs"])]
    done = run(*create, "--system-site-packages", "--package", PACKAGE)
    assert done.returncode == 0, done.stderr
    data_dir = prefix.resolve() / "share" / "jupyter"
    assert f"JUPYTER_PATH={data_dir}" in done.stdout  # the success message says what else is needed

    unseen = run("env", "list", "--no-check", "--json")
    assert "qntx-pfx" not in {row["name"] for row in json.loads(unseen.stdout)}
    refused = run("serve", "--kernel", "qntx-pfx", "--port", "0")
    assert refused.returncode == 2 and "JUPYTER_PATH" in refused.stderr

    listed = run("env", "list", "--prefix", str(prefix), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["qntx-pfx"]["ours"] and rows["qntx-pfx"]["starts"], rows["qntx-pfx"]

    assert run("env", "remove", "pfx").returncode == 1  # not found without the prefix
    removed = run("env", "remove", "pfx", "--prefix", str(prefix))
    assert removed.returncode == 0, removed.stderr
    assert not (data_dir / "kernels" / "qntx-pfx").exists()
    assert not (jupyter["envs"] / "pfx").exists()


def test_list_exits_1_when_a_kernelspec_does_not_start(jupyter, tmp_path):
    data_dir = tmp_path / "broken-jupyter"
    spec_folder = data_dir / "kernels" / "wont-start"
    spec_folder.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-c", "raise SystemExit(3)", "{connection_file}"], "language": "python"}
    (spec_folder / "kernel.json").write_text(json.dumps(spec))
    env = {**jupyter["env"], "JUPYTER_PATH": str(data_dir)}
    command = [sys.executable, "-m", "kernel_provider", "env", "list", "--timeout", "30"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "wont-start" in done.stdout
    # Every spec is still listed, and the working one says so.
    line = next(line for line in done.stdout.splitlines() if line.startswith("python3 "))
    assert " yes " in line.replace("  ", " ")
