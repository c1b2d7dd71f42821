"""`kernel-provider variant ...`: launchers written, then launched exactly as QNTX launches a plugin."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from conftest import http, install_copy_of_python3
from kernel_provider import cli
from kernel_provider.kernels.local import connection_file_name
from kernel_provider.proto import domain_pb2

EMPTY = domain_pb2.Empty()


@pytest.fixture
def jupyter_env(tmp_path, monkeypatch):
    """Kernelspecs python3 and python3-copy, seen both by this process (install checks) and by launches."""
    env = install_copy_of_python3(tmp_path / "jupyter", "python3-copy")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def variant(*args: str) -> int:
    return cli.main(["variant", *args])


def kernels(plugin) -> list[dict]:
    return http(plugin, "GET", "/kernels")[2]["kernels"]


def test_install_writes_an_executable_launcher_marked_as_ours(tmp_path, jupyter_env, capsys):
    plugins = tmp_path / "plugins" / "not-yet"
    assert variant("install", "bio", "--kernel", "python3-copy", "--dir", str(plugins)) == 0
    launcher = plugins / "qntx-bio-plugin"
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755
    text = launcher.read_text()
    assert text.startswith("#!/bin/sh\n# made by kernel-provider variant install")
    assert text.rstrip().endswith('--name bio --kernel python3-copy "$@"')
    assert "installed" in capsys.readouterr().out


def test_two_variants_side_by_side(tmp_path, jupyter_env, fresh_provider):
    plugins = tmp_path / "plugins"
    assert variant("install", "bio", "--kernel", "python3", "--dir", str(plugins)) == 0
    assert variant("install", "data", "--kernel", "python3-copy", "--dir", str(plugins)) == 0
    bio = fresh_provider(executable=plugins / "qntx-bio-plugin", env=jupyter_env)
    data = fresh_provider(executable=plugins / "qntx-data-plugin", env=jupyter_env)
    assert bio.process.pid != data.process.pid

    for plugin, name, spec in ((bio, "bio", "python3"), (data, "data", "python3-copy")):
        assert plugin.domain.Metadata(EMPTY, timeout=60).name == name
        assert plugin.health().details["kernelspec"] == spec
        assert plugin.initialize().handler_names == [f"{name}.script"]

    assert bio.run("secret = 'bio only'; secret", "g")["result"] == "'bio only'"
    seen = data.run("'secret' in globals()", "g")
    assert seen["success"] and seen["result"] == "False"

    # Separate kernels, each from its own kernelspec, each with its files in its own folder only.
    (bio_kernel,) = kernels(bio)
    (data_kernel,) = kernels(data)
    assert (bio_kernel["kernel_name"], data_kernel["kernel_name"]) == ("python3", "python3-copy")
    assert bio_kernel["kernel_id"] != data_kernel["kernel_id"]
    assert bio.connection_dir != data.connection_dir
    for plugin, entry in ((bio, bio_kernel), (data, data_kernel)):
        # (beside it only the kernel's own ipc sockets, named after its connection file)
        assert [p.name for p in plugin.connection_dir.glob("*.json")] == [connection_file_name("g")]
        assert os.path.dirname(entry["connection_file"]) == str(plugin.connection_dir)
    bio_pids, data_pids = set(bio.kernel_pids()), set(data.kernel_pids())
    assert len(bio_pids) == 1 and len(data_pids) == 1 and not bio_pids & data_pids


def test_flags_given_at_launch_come_after_the_bound_ones(tmp_path, jupyter_env, fresh_provider):
    plugins = tmp_path / "plugins"
    assert variant("install", "bio", "--kernel", "python3-copy", "--dir", str(plugins)) == 0
    launcher = plugins / "qntx-bio-plugin"
    # A single-valued flag given at launch wins (argparse keeps the last one) ...
    plugin = fresh_provider("--name", "renamed", executable=launcher, env=jupyter_env, initialize=False)
    assert plugin.domain.Metadata(EMPTY, timeout=60).name == "renamed"
    # ... while --kernel is repeatable: the bound kernelspec stays the default, a later one is served besides it.
    plugin = fresh_provider("--kernel", "python3", executable=launcher, env=jupyter_env, initialize=False)
    assert plugin.domain.Metadata(EMPTY, timeout=60).name == "bio"
    assert plugin.health().details["kernelspec"] == "python3-copy"
    refused = subprocess.run(
        [str(launcher), "--port", "0", "--kernel", "nope"],
        capture_output=True,
        text=True,
        env={**os.environ, **jupyter_env},
        timeout=60,
    )
    assert refused.returncode == 2 and "No kernelspec named 'nope'" in refused.stderr


def test_list_and_remove(tmp_path, jupyter_env, capsys):
    plugins = tmp_path / "plugins"
    assert variant("list", "--dir", str(plugins)) == 0
    assert "no variants" in capsys.readouterr().out
    assert variant("install", "bio", "--kernel", "python3", "--dir", str(plugins)) == 0
    assert variant("install", "data-2", "--kernel", "python3-copy", "--dir", str(plugins)) == 0
    (plugins / "qntx-other-plugin").write_text("#!/bin/sh\nexec true\n")
    (plugins / "README").write_text("not a plugin\n")
    capsys.readouterr()

    assert variant("list", "--dir", str(plugins)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KERNELSPEC", "PATH"]
    assert [line.split() for line in lines[1:]] == [
        ["bio", "python3", str(plugins / "qntx-bio-plugin")],
        ["data-2", "python3-copy", str(plugins / "qntx-data-2-plugin")],
    ]
    assert len({line.index(str(plugins)) for line in lines[1:]}) == 1  # the path column is aligned

    assert variant("list", "--dir", str(plugins), "--json") == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "bio", "kernelspec": "python3", "path": str(plugins / "qntx-bio-plugin")},
        {"name": "data-2", "kernelspec": "python3-copy", "path": str(plugins / "qntx-data-2-plugin")},
    ]

    assert variant("remove", "bio", "--dir", str(plugins)) == 0
    assert not (plugins / "qntx-bio-plugin").exists()
    assert variant("remove", "bio", "--dir", str(plugins)) == 1
    assert "No variant named 'bio'" in capsys.readouterr().err
    assert variant("remove", "other", "--dir", str(plugins)) == 1
    assert "not made by kernel-provider" in capsys.readouterr().err
    assert (plugins / "qntx-other-plugin").exists()


def test_reinstall_needs_force_and_a_foreign_file_is_never_replaced(tmp_path, jupyter_env, capsys):
    plugins = tmp_path / "plugins"
    launcher = plugins / "qntx-bio-plugin"
    assert variant("install", "bio", "--kernel", "python3", "--dir", str(plugins)) == 0
    assert variant("install", "bio", "--kernel", "python3-copy", "--dir", str(plugins)) == 1
    assert "--force" in capsys.readouterr().err
    assert "kernel python3 " in launcher.read_text()
    assert variant("install", "bio", "--kernel", "python3-copy", "--dir", str(plugins), "--force") == 0
    assert "kernel python3-copy " in launcher.read_text()

    foreign = plugins / "qntx-mine-plugin"
    foreign.write_text("#!/bin/sh\necho mine\n")
    for extra in ([], ["--force"]):
        assert variant("install", "mine", "--kernel", "python3", "--dir", str(plugins), *extra) == 1
        assert "not made by kernel-provider" in capsys.readouterr().err
        assert foreign.read_text() == "#!/bin/sh\necho mine\n"
    assert sorted(p.name for p in plugins.iterdir()) == ["qntx-bio-plugin", "qntx-mine-plugin"]


@pytest.mark.parametrize("name", ["b o", "a/b", "", "x;rm", "../up"])
def test_bad_name_exits_2_with_a_sentence(tmp_path, jupyter_env, capsys, name):
    assert variant("install", name, "--kernel", "python3", "--dir", str(tmp_path)) == 2
    assert "letters, digits" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["jupyter"]


def test_unknown_kernelspec_exits_2_listing_installed_ones(tmp_path, jupyter_env, capsys):
    assert variant("install", "bio", "--kernel", "nope", "--dir", str(tmp_path / "plugins")) == 2
    err = capsys.readouterr().err
    assert "No kernelspec named 'nope'" in err and "python3" in err and "python3-copy" in err
    assert not (tmp_path / "plugins" / "qntx-bio-plugin").exists()


def test_a_kernelspec_under_a_prefix_is_found_when_qntx_launches_the_variant(
    tmp_path, jupyter_env, fresh_provider, monkeypatch
):
    # python3-copy is visible only through JUPYTER_PATH (as one made with `env create --prefix` is).
    plugins = tmp_path / "plugins"
    assert variant("install", "prefixed", "--kernel", "python3-copy", "--dir", str(plugins)) == 0
    assert variant("install", "plain", "--kernel", "python3", "--dir", str(plugins)) == 0
    assert f"JUPYTER_PATH={jupyter_env['JUPYTER_PATH']}" in (plugins / "qntx-prefixed-plugin").read_text()
    assert "JUPYTER_PATH" not in (plugins / "qntx-plain-plugin").read_text()  # python3 needs no help
    # QNTX's environment knows nothing of that folder.
    monkeypatch.delenv("JUPYTER_PATH")
    plugin = fresh_provider(executable=plugins / "qntx-prefixed-plugin")
    assert plugin.run("1 + 1", "g")["result"] == "2"
    (kernel,) = kernels(plugin)
    assert kernel["kernel_name"] == "python3-copy"
