"""The command line as a person meets it: `--help` texts, usage errors, and `./dev`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kernel_provider(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernel_provider", *args], capture_output=True, text=True, timeout=60)


def test_serve_help_shows_every_default():
    done = kernel_provider("serve", "--help")
    assert done.returncode == 0
    # Each option's entry: its line ("  --flag ...") and the indented lines that continue it.
    entries: dict[str, str] = {}
    for line in done.stdout.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("    ") and entries:
            entries[current] += " " + line.strip()
    for flag, default in [
        ("--port", "9000"),
        ("--execute-timeout", "60"),
        ("--max-output-bytes", "1000000"),
        ("--pool-size", "1"),
        ("--idle-timeout", "3600"),
        ("--max-kernels", "64"),
        ("--log-level", "info"),
        ("--watcher-kernels", "8"),
        ("--watcher-mode", "reset"),
        ("--watcher-share", "0.5"),
    ]:
        described = " ".join(entries[flag].split())
        assert f"(default {default})" in described, (flag, described)


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["run", "--bogus", "1"], "usage: kernel-provider run "),
        (["env", "list", "--bogus"], "usage: kernel-provider env list "),
        (["variant", "list", "--bogus"], "usage: kernel-provider variant list "),
        (["kernels", "--bogus"], "usage: kernel-provider kernels "),
    ],
)
def test_a_wrong_flag_shows_the_usage_of_the_command_it_was_given_to(args, usage):
    done = kernel_provider(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(usage), done.stderr
    assert "unrecognized arguments: --bogus" in done.stderr


def test_dev_with_an_unknown_command_lists_the_commands(tmp_path):
    # A venv path that does not exist: ./dev must answer without creating or installing anything.
    venv = tmp_path / "no-venv"
    done = subprocess.run(
        [str(ROOT / "dev"), "bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KERNEL_PROVIDER_VENV": str(venv)},
    )
    assert done.returncode == 2
    assert "no command 'bogus'" in done.stderr
    for command in ("serve", "test", "kernel-provider"):
        assert command in done.stderr
    assert "No such file" not in done.stderr
    assert not venv.exists()


def test_dev_runs_a_program_with_the_runtime_dependencies_only(tmp_path):
    # A fresh venv, as a newcomer's first `./dev kernel-provider ...` makes it (pip's cache keeps it quick).
    env = {**os.environ, "KERNEL_PROVIDER_VENV": str(tmp_path / "venv")}

    def dev(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "dev"), *args], capture_output=True, text=True, timeout=900, env=env)

    done = dev("kernel-provider", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: kernel-provider" in done.stdout
    assert "installing kernel_provider (.)" in done.stderr
    probe = "import importlib.util as u; print([m for m in ('pytest', 'jupyterlab', 'grpc_tools') if u.find_spec(m)])"
    assert dev("python", "-c", probe).stdout.strip() == "[]"
    # Installed once: the next call goes straight to the program.
    again = dev("kernel-provider", "--help")
    assert again.returncode == 0 and "installing" not in again.stderr
