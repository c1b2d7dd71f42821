"""Several kernelspecs in one provider: a glyph picks one with `#| kernel: NAME` on its first line."""

from __future__ import annotations

import json

import grpc
import pytest

from conftest import http, install_copy_of_python3
from kernel_provider.sessions import requested_kernel

# The kernel reports which kernelspec started it through its connection file's kernel_name.
WHICH_SPEC = (
    "import json\nfrom ipykernel.connect import get_connection_info\njson.loads(get_connection_info())['kernel_name']"
)


@pytest.fixture
def two_spec_provider(fresh_provider, tmp_path):
    env = install_copy_of_python3(tmp_path / "jupyter", "python3-copy")
    return fresh_provider("--kernel", "python3", "--kernel", "python3-copy", env=env)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("#| kernel: qntx-bio\nimport Bio", "qntx-bio"),
        ("\n  #|kernel:qntx-bio  \nx", "qntx-bio"),
        ("x = 1\n#| kernel: qntx-bio", None),
        ("# kernel: qntx-bio\n", None),
        ("#| kernel: two words\n", None),
    ],
)
def test_directive_is_read_from_the_first_line_only(code, expected):
    assert requested_kernel(code) == expected


def test_glyph_without_directive_gets_the_default(two_spec_provider):
    assert two_spec_provider.run(WHICH_SPEC, "plain")["result"] == "'python3'"


def test_directive_picks_the_kernelspec(two_spec_provider):
    result = two_spec_provider.run("#| kernel: python3-copy\n" + WHICH_SPEC, "picky")
    assert result["success"] and result["result"] == "'python3-copy'"
    kernels = json.loads(two_spec_provider.health().details["glyph_kernelspecs"])
    assert kernels == {"picky": "python3-copy"}
    assert two_spec_provider.health().details["kernelspecs"] == "python3,python3-copy"
    (entry,) = http(two_spec_provider, "GET", "/kernels")[2]["kernels"]
    assert entry["kernel_name"] == "python3-copy"


def test_changing_the_directive_moves_the_glyph_and_says_its_state_was_reset(two_spec_provider):
    plugin = two_spec_provider
    plugin.run("kept = 1", "mover")
    result = plugin.run("#| kernel: python3-copy\n'kept' in dir()", "mover")
    assert result["success"] and result["result"] == "False"
    assert "moved from kernelspec 'python3' to 'python3-copy'" in result["stderr"]
    assert "state was reset" in result["stderr"]
    # Staying on the same kernelspec keeps state and says nothing.
    plugin.run("#| kernel: python3-copy\nkept = 2", "mover")
    again = plugin.run("#| kernel: python3-copy\nkept", "mover")
    assert again["result"] == "2" and again["stderr"] == ""


def test_asking_for_a_kernelspec_not_served_fails_with_the_list(two_spec_provider):
    result = two_spec_provider.run("#| kernel: qntx-bio\n1", "lost")
    assert not result["success"]
    assert "does not serve the kernelspec 'qntx-bio'" in result["error"]
    assert "python3, python3-copy" in result["error"]


def test_config_kernels_key_sets_the_served_list(fresh_provider, tmp_path):
    env = install_copy_of_python3(tmp_path / "jupyter", "python3-copy")
    plugin = fresh_provider(env=env)
    plugin.initialize(kernels='["python3-copy", "python3"]')
    assert plugin.run(WHICH_SPEC, "g")["result"] == "'python3-copy'"
    assert plugin.run("#| kernel: python3\n" + WHICH_SPEC, "h")["result"] == "'python3'"
    with pytest.raises(grpc.RpcError) as caught:
        plugin.initialize(kernels='["python3", "missing-spec"]')
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing-spec" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        plugin.initialize(kernels="[]")
    assert "non-empty list" in caught.value.details()
