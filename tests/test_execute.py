"""PythonService.Execute against a real provider and real ipykernel kernels."""

from __future__ import annotations

import base64
import itertools
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kernel_provider.proto import python_pb2

# A 1x1 PNG, made here so the test needs no image library.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def glyph() -> str:
    return f"glyph-{uuid.uuid4().hex[:8]}"


def test_variables_persist_within_a_glyph(provider):
    g = glyph()
    assert provider.run("counter = 41", g)["success"]
    result = provider.run("counter += 1\ncounter", g)
    assert result["success"]
    assert result["result"] == "42"


def test_glyphs_do_not_share_state(provider):
    a, b = glyph(), glyph()
    provider.run("secret = 'a'", a)
    result = provider.run("secret", b)
    assert not result["success"]
    assert result["error"].startswith("NameError: name 'secret' is not defined")
    assert provider.run("secret", a)["result"] == "'a'"


def test_glyph_id_is_visible_in_the_kernel(provider):
    g = glyph()
    assert provider.run("__glyph_id__", g)["result"] == repr(g)


def test_run_without_glyph_starts_from_a_clean_slate(provider):
    provider.run("left_behind = 1")
    result = provider.run("'left_behind' in dir()")
    assert result["result"] == "False"
    # Every live kernel is a glyph's or one of the few runner kernels of runs without a glyph.
    details = provider.health().details
    glyphs = json.loads(details["glyph_kernelspecs"])
    assert len(glyphs) <= int(details["live_kernels"]) <= len(glyphs) + int(details["watcher_runners"])


def test_result_json_shape_and_stream_order(provider):
    code = "import sys\nprint('one')\nprint('warn', file=sys.stderr)\nprint('two')\n6 * 7"
    response = provider.execute(code, glyph())
    result = json.loads(response.result)
    assert set(result) >= {
        "success",
        "stdout",
        "stderr",
        "result",
        "error",
        "duration_ms",
        "execution_count",
        "outputs",
    }
    assert response.success and result["error"] is None and response.error == ""
    assert response.output == "one\ntwo\n"
    assert result["stderr"] == "warn\n"
    assert result["result"] == "42"
    assert result["execution_count"] == 1
    assert isinstance(result["duration_ms"], float) and result["duration_ms"] > 0
    kinds = [(o["output_type"], o.get("name")) for o in result["outputs"]]
    assert kinds[-1] == ("execute_result", None)
    assert ("stream", "stdout") in kinds and ("stream", "stderr") in kinds
    assert result["outputs"][-1]["data"]["text/plain"] == "42"


def test_execution_count_increases_per_glyph(provider):
    g = glyph()
    counts = [provider.run("1", g)["execution_count"] for _ in range(3)]
    assert counts == [1, 2, 3]


def test_no_value_gives_null_result(provider):
    assert provider.run("x = 1", glyph())["result"] is None


def test_upstream_attestation_becomes_a_dict(provider):
    upstream = b'{"id": "att-1", "subjects": ["GENE"], "attributes": {"score": 0.5}}'
    result = provider.run("type(upstream).__name__, upstream", glyph(), upstream=upstream)
    assert result["result"] == "('dict', {'id': 'att-1', 'subjects': ['GENE'], 'attributes': {'score': 0.5}})"


def test_empty_upstream_is_none(provider):
    assert provider.run("upstream is None", glyph())["result"] == "True"


def test_upstream_is_replaced_on_each_run(provider):
    g = glyph()
    assert provider.run("upstream['id']", g, upstream=b'{"id": "first"}')["result"] == "'first'"
    assert provider.run("upstream is None", g)["result"] == "True"


@pytest.mark.parametrize(
    ("code", "upstream", "message"),
    [
        ("", b"", "code is empty"),
        ("   \n ", b"", "code is empty"),
        ("1", b"{not json", "not valid JSON"),
        ("1", b"\xff\xfe", "not valid UTF-8"),
        ("1", b"[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_requests_are_invalid_argument(provider, code, upstream, message):
    with pytest.raises(grpc.RpcError) as caught:
        provider.execute(code, glyph(), upstream=upstream)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert provider.run("1 + 1", glyph())["result"] == "2"


@pytest.mark.parametrize("glyph_id", ["x" * 257, "bad\x00id", "line\nbreak"])
def test_unusable_glyph_ids_are_invalid_argument(provider, glyph_id):
    with pytest.raises(grpc.RpcError) as caught:
        provider.execute("1", glyph_id)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_path_like_glyph_id_stays_inside_the_connection_dir(provider):
    g = "../../escape/" + glyph()
    assert provider.run("1", g)["success"]
    files = list(provider.connection_dir.iterdir())
    assert files and all(f.parent == provider.connection_dir for f in files)
    assert not (provider.connection_dir.parent.parent / "escape").exists()


def test_rich_display_outputs_keep_their_mime_bundles(provider):
    code = f"""
from IPython.display import display, HTML, SVG, JSON, Image
import base64
display(Image(data=base64.b64decode({base64.b64encode(PNG_1X1).decode()!r})))
display(HTML('<b>bold</b>'))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>'))
display(JSON({{'k': [1, 2]}}))
"""
    result = provider.run(code, glyph())
    bundles = [o["data"] for o in result["outputs"] if o["output_type"] == "display_data"]
    assert len(bundles) == 4
    assert base64.b64decode(bundles[0]["image/png"]) == PNG_1X1
    assert bundles[1]["text/html"] == "<b>bold</b>"
    assert "<svg" in bundles[2]["image/svg+xml"]
    assert bundles[3]["application/json"] == {"k": [1, 2]}


def test_clear_output_and_update_display_are_honoured(provider):
    code = """
from IPython.display import display, clear_output, HTML
print('gone')
clear_output()
print('kept')
handle = display(HTML('<p>first</p>'), display_id=True)
handle.update(HTML('<p>second</p>'))
print('waiting')
clear_output(wait=True)
print('after wait')
"""
    result = provider.run(code, glyph())
    assert [o["output_type"] for o in result["outputs"]] == ["stream"]
    assert result["stdout"] == "after wait\n"

    code = """
from IPython.display import display, HTML
handle = display(HTML('<p>first</p>'), display_id=True)
print('between')
handle.update(HTML('<p>second</p>'))
"""
    result = provider.run(code, glyph())
    assert result["outputs"][0]["data"]["text/html"] == "<p>second</p>"
    assert result["outputs"][1]["text"] == "between\n"


def test_error_text_is_name_value_and_plain_traceback(provider):
    response = provider.execute("def f():\n    return 1 / 0\nf()", glyph())
    result = json.loads(response.result)
    assert not response.success
    assert response.error.startswith("ZeroDivisionError: division by zero\n")
    assert "\x1b" not in response.error
    assert "return 1 / 0" in response.error
    error_outputs = [o for o in result["outputs"] if o["output_type"] == "error"]
    assert error_outputs[0]["ename"] == "ZeroDivisionError"


def test_syntax_error_is_a_failed_run(provider):
    result = provider.run("def (:", glyph())
    assert not result["success"]
    assert result["error"].startswith("SyntaxError")


def test_input_fails_at_once(provider):
    result = provider.run("input('name? ')", glyph())
    assert not result["success"]
    assert result["error"].startswith("StdinNotImplementedError")
    assert "input requests" in result["error"]


def test_huge_output_is_cut_to_fit_grpc_and_the_glyph_goes_on(provider):
    g = glyph()
    response = provider.execute("print('x' * 5_000_000)\nafter = 'ran'", g)
    assert response.ByteSize() < 4 * 1024 * 1024
    assert response.success
    assert "output truncated" in response.output
    assert "bytes dropped" in response.output
    assert response.output.count("x") <= 1_000_000
    # The code after the print ran, and the glyph still works.
    assert provider.run("after", g)["result"] == "'ran'"


def test_huge_output_of_control_characters_still_fits(provider):
    # JSON escapes each control character as six bytes: the answer must still fit.
    response = provider.execute("print('\\x01' * 1_000_000)", glyph())
    assert response.ByteSize() < 4 * 1024 * 1024
    assert response.success


def test_grpc_deadline_interrupts_and_keeps_state(provider):
    g = glyph()
    provider.run("kept = 'yes'", g)
    response = provider.execute("import time\nwhile True: time.sleep(0.05)", g, timeout=3)
    assert not response.success
    assert "timed out after" in response.error
    assert "kept its kernel and state" in response.error
    assert provider.run("kept", g)["result"] == "'yes'"


def test_kernel_death_is_reported_and_the_glyph_recovers(provider):
    g = glyph()
    provider.run("doomed = 1", g)
    result = provider.run("import os\nprint('before', flush=True)\nos._exit(3)", g)
    assert not result["success"]
    assert "kernel died" in result["error"] and "restarted" in result["error"]
    after = provider.run("'doomed' in dir()", g)
    assert after["success"] and after["result"] == "False"


def test_segfault_does_not_take_the_provider_down(provider):
    g, bystander = glyph(), glyph()
    provider.run("alive = True", bystander)
    result = provider.run("import ctypes\nctypes.string_at(0)", g)
    assert not result["success"] and "kernel died" in result["error"]
    assert provider.run("alive", bystander)["result"] == "True"
    assert provider.run("1 + 1", g)["result"] == "2"


def test_different_glyphs_run_at_the_same_time(provider):
    code = "import time\nstart = time.time()\ntime.sleep(1.5)\n(start, time.time())"
    glyphs = [glyph() for _ in range(3)]
    for g in glyphs:  # start the kernels first, so the runs themselves overlap
        provider.run("1", g)
    with ThreadPoolExecutor(len(glyphs)) as pool:
        results = list(pool.map(lambda g: provider.run(code, g), glyphs))
    spans = [eval(r["result"]) for r in results]
    latest_start = max(start for start, _ in spans)
    earliest_end = min(end for _, end in spans)
    assert latest_start < earliest_end, f"runs did not overlap: {spans}"


def test_runs_of_one_glyph_go_one_at_a_time_in_arrival_order(provider):
    g = glyph()
    provider.run("import time\nlog = []", g)
    code = "start = time.time(); time.sleep(0.2); log.append(({n}, start, time.time()))"
    futures = []
    for n in range(5):
        request = python_pb2.PythonExecuteRequest(code=code.format(n=n), glyph_id=g)
        futures.append(provider.python.Execute.future(request, timeout=60))
        # Each call reaches the server before the next is sent, so arrival order is n.
        time.sleep(0.05)
    assert all(f.result().success for f in futures)
    log = eval(provider.run("log", g)["result"])
    assert [entry[0] for entry in log] == list(range(5))
    for earlier, later in itertools.pairwise(log):
        assert earlier[2] <= later[1], "two runs of one glyph overlapped"


def test_outputs_are_valid_nbformat_v4(provider):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    code = """
import sys
from IPython.display import display, HTML
print('out'); print('err', file=sys.stderr)
display(HTML('<b>x</b>'), metadata={'isolated': True})
42
"""
    outputs = provider.run(code, glyph())["outputs"]
    failing = provider.run("raise KeyError('k')", glyph())["outputs"]
    cell = new_code_cell(source=code, outputs=outputs + failing, execution_count=1)
    nbformat.validate(new_notebook(cells=[cell]))  # raises ValidationError on a bad output
    assert [o["output_type"] for o in outputs] == ["stream", "stream", "display_data", "execute_result"]
