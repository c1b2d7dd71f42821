"""A glyph's session as a notebook: GET /kernels/{glyph}/notebook, `kernel-provider notebook`, and the bounds.

Real provider and kernels; the exported notebook is checked with nbformat.validate and
re-executed with nbclient on a fresh kernel, whose outputs must equal the recorded ones
for the deterministic cells.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import http
from kernel_provider.history import SessionHistory
from kernel_provider.results import ExecutionResult

CELLS = [
    "numbers = [3, 1, 2]\nprint('sorted:', sorted(numbers))",
    "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))\nsum(numbers)",
    "import sys\nprint('to stderr', file=sys.stderr)\n{'total': sum(numbers) * 2}",
    "numbers[10]",
    "'after the error', len(numbers)",
]


def glyph() -> str:
    return f"nb-{uuid.uuid4().hex[:8]}"


def comparable(output: dict) -> dict:
    """What must be the same when the cell runs again (not the traceback's colours or line noise)."""
    if output["output_type"] == "error":
        return {"output_type": "error", "ename": output["ename"], "evalue": output["evalue"]}
    return {key: output[key] for key in ("output_type", "name", "text", "data") if key in output}


def test_a_glyphs_runs_export_as_a_valid_notebook_that_reruns_to_the_same_outputs(provider):
    glyph_id = glyph()
    for code in CELLS:
        provider.run(code, glyph_id)
    status, headers, answer = http(provider, "GET", f"/kernels/{glyph_id}/notebook")
    assert status == 200
    notebook = nbformat.from_dict(answer)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.kernelspec.language == "python"
    assert [cell.source for cell in notebook.cells] == CELLS
    assert [cell.execution_count for cell in notebook.cells] == [1, 2, 3, 4, 5]
    assert [cell.id for cell in notebook.cells] == [f"run-{n}" for n in range(1, 6)]
    recorded = [[comparable(o) for o in cell.outputs] for cell in notebook.cells]
    assert recorded[0] == [{"output_type": "stream", "name": "stdout", "text": "sorted: [1, 2, 3]\n"}]
    assert recorded[1][0]["data"]["text/html"] == "<b>bold</b>"
    assert recorded[3] == [{"output_type": "error", "ename": "IndexError", "evalue": "list index out of range"}]

    rerun = nbformat.from_dict(json.loads(json.dumps(answer)))
    NotebookClient(rerun, timeout=120, kernel_name="python3", allow_errors=True).execute()
    assert [[comparable(o) for o in cell.outputs] for cell in rerun.cells] == recorded
    assert [cell.execution_count for cell in rerun.cells] == [1, 2, 3, 4, 5]


def test_runs_over_the_stream_are_recorded_and_a_deleted_glyph_is_forgotten(provider):
    from kernel_provider.proto import python_pb2

    glyph_id = glyph()
    request = python_pb2.PythonExecuteRequest(code="print('streamed')", glyph_id=glyph_id)
    list(provider.python.ExecuteStream(request, timeout=120))
    status, _, answer = http(provider, "GET", f"/kernels/{glyph_id}/notebook")
    assert status == 200 and answer["cells"][0]["outputs"][0]["text"] == "streamed\n"

    assert http(provider, "DELETE", f"/kernels/{glyph_id}")[0] == 200
    status, _, answer = http(provider, "GET", f"/kernels/{glyph_id}/notebook")
    assert status == 404 and answer == {
        "error": f"glyph {glyph_id!r} has no runs on record (none yet, or the provider restarted)."
    }


def test_a_glyph_that_never_ran_has_no_notebook(provider):
    status, _, answer = http(provider, "GET", "/kernels/never-ran/notebook")
    assert status == 404 and "never-ran" in answer["error"]


def kernel_provider(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernel_provider", *args], capture_output=True, text=True, timeout=120)


def test_the_notebook_command_saves_a_glyphs_session(provider, tmp_path):
    glyph_id = glyph() + " with/odd chars"
    provider.run("x = 6 * 7\nx", glyph_id)
    target = f"127.0.0.1:{provider.port}"
    saved = tmp_path / "session.ipynb"
    done = kernel_provider("notebook", glyph_id, "-o", str(saved), "--target", target)
    assert done.returncode == 0, done.stderr
    notebook = nbformat.read(saved, as_version=4)  # validates
    assert notebook.cells[0].source == "x = 6 * 7\nx"
    assert notebook.cells[0].outputs[0]["data"]["text/plain"] == "42"

    printed = kernel_provider("notebook", glyph_id, "--target", target)
    assert printed.returncode == 0 and nbformat.reads(printed.stdout, as_version=4) == notebook

    missing = kernel_provider("notebook", "no-such-glyph", "-o", str(tmp_path / "none.ipynb"), "--target", target)
    assert missing.returncode == 1
    assert "glyph 'no-such-glyph' has no runs on record" in missing.stderr
    assert not (tmp_path / "none.ipynb").exists()


# ---------------------------------------------------------------- the bounds (history.py on its own)


def result(text: str, count: int) -> ExecutionResult:
    return ExecutionResult.from_outputs(
        [{"output_type": "stream", "name": "stdout", "text": text}], execution_count=count, duration_ms=1
    )


def test_history_keeps_the_last_runs_of_a_glyph():
    history = SessionHistory(max_runs=3)
    for count in range(1, 6):
        history.record("g", "python3", f"print({count})", result(f"{count}\n", count))
    assert [run.execution_count for run in history.runs("g")] == [3, 4, 5]


def test_history_keeps_a_glyph_within_its_byte_bound():
    history = SessionHistory(max_bytes=2000)
    for count in range(1, 11):
        history.record("g", "python3", "x", result("y" * 500, count))
    runs = history.runs("g")
    assert sum(run.size for run in runs) <= 2000
    assert runs[-1].execution_count == 10 and len(runs) < 10


def test_a_run_too_large_to_keep_keeps_its_code_and_a_note():
    history = SessionHistory(max_bytes=1000)
    history.record("g", "python3", "print('y' * 5000)", result("y" * 5000, 1))
    (run,) = history.runs("g")
    assert run.code == "print('y' * 5000)"
    assert "too large to keep" in run.outputs[0]["text"]


def test_history_forgets_the_glyph_that_ran_longest_ago():
    history = SessionHistory(max_glyphs=2)
    for glyph_id in ("a", "b", "a", "c"):
        history.record(glyph_id, "python3", "1", result("", 1))
    assert history.runs("b") == [] and len(history.runs("a")) == 2 and len(history.runs("c")) == 1


@pytest.mark.parametrize("bad", ["/kernels//notebook", "/kernels/a/b/notebook"])
def test_malformed_notebook_paths_are_404(provider, bad):
    status, _, answer = http(provider, "GET", bad)
    assert status == 404 and answer["error"]
