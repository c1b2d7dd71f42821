"""Runs without a glyph (QNTX's watcher actions) on runner kernels that reset between runs.

QNTX's watcher engine sends Execute with an empty glyph_id and the attestation injected into
the code; these tests send exactly that, through a real provider, and hold the promises of
the README's "Runs without a glyph": a clean namespace for every run, crashes and hangs that
harm no later run, runs that never see each other's output, glyphs left alone.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from conftest import LAUNCH_TIMEOUT, http


def watcher_code(attestation: dict, body: str) -> str:
    """The code QNTX's watcher engine sends (ats/watcher/engine_execute.go, executePython)."""
    encoded = json.dumps(json.dumps(attestation))
    return f"import json\n_attestation_json = {encoded}\nattestation = json.loads(_attestation_json)\n{body}"


def test_a_name_bound_in_one_run_is_gone_in_the_next(provider):
    first = provider.run("import os as imported_module\nleft = 41\ndef helper(): return 1\nleft + 1", "")
    assert first["success"] and first["result"] == "42"
    for name in ("left", "helper", "imported_module", "attestation"):
        result = provider.run(name, "")
        assert not result["success"]
        assert result["error"].startswith(f"NameError: name '{name}' is not defined")


def test_the_working_folder_path_and_environment_come_back(provider):
    setup = "import os, sys\nos.chdir('/')\nsys.path.insert(0, '/nowhere')\nos.environ['LEFT_BEHIND'] = '1'"
    assert provider.run(setup, "")["success"]
    for _ in range(8):  # every runner, whichever took the run above
        result = provider.run(
            "import os, sys\n(os.getcwd() != '/', '/nowhere' in sys.path, 'LEFT_BEHIND' in os.environ)", ""
        )
        assert result["result"] == "(True, False, False)"


def test_watcher_code_sees_its_attestation_and_upstream(provider):
    attestation = {"id": "as-1", "subjects": ["BRCA1"], "predicates": ["expressed_in"]}
    code = watcher_code(attestation, "print(attestation['subjects'][0], upstream['id'], repr(__glyph_id__))")
    result = json.loads(provider.execute(code, "", upstream=json.dumps(attestation).encode()).result)
    assert result["success"], result["error"]
    assert result["stdout"] == "BRCA1 as-1 ''\n"


@pytest.mark.parametrize(
    "crash",
    ["import os; os._exit(1)", "import ctypes; ctypes.string_at(0)"],
    ids=["os._exit", "segfault"],
)
def test_a_run_that_kills_its_kernel_harms_no_later_run(provider, crash):
    died = provider.run(crash, "")
    assert not died["success"] and "KernelDied" in died["error"]
    for index in range(6):
        result = provider.run(f"{index} * 2", "")
        assert result["success"], result["error"]
        assert result["result"] == str(index * 2)


def test_a_run_that_hangs_is_stopped_and_the_next_runs(fresh_provider):
    plugin = fresh_provider("--execute-timeout", "2", "--watcher-kernels", "1")
    hung = plugin.run("while True: pass", "")
    assert not hung["success"] and "TimeoutError" in hung["error"]
    result = plugin.run("'after the hang'", "")
    assert result["success"] and result["result"] == "'after the hang'"


def test_concurrent_runs_never_see_each_others_output(provider):
    results: dict[int, dict] = {}

    def run(index: int) -> None:
        code = f"import time\nfor i in range(20):\n    print('run-{index}', i)\n    time.sleep(0.001)\n'done-{index}'"
        results[index] = provider.run(code, "")

    threads = [threading.Thread(target=run, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, result in results.items():
        assert result["success"], result["error"]
        assert result["stdout"] == "".join(f"run-{index} {i}\n" for i in range(20))
        assert result["result"] == f"'done-{index}'"


def test_watcher_runs_leave_glyph_state_alone(provider):
    assert provider.run("kept = 'glyph value'", "watched-glyph")["success"]
    for _ in range(5):
        provider.run("kept = 'watcher value'\nglobals().clear()", "")
    assert provider.run("kept", "watched-glyph")["result"] == "'glyph value'"


def test_the_runners_and_queue_show_in_health_and_kernels(fresh_provider):
    plugin = fresh_provider("--watcher-kernels", "1", "--watcher-queue", "1")
    details = plugin.health().details
    assert details["watcher_runners"] == "1" and details["watcher_queue_limit"] == "1"
    results: list[dict] = []
    threads = [
        threading.Thread(target=lambda: results.append(plugin.run("import time; time.sleep(2)", ""))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One runs, one waits, the third finds the queue full and is told so at once.
    assert sorted(r["success"] for r in results) == [False, True, True]
    (refused,) = [r for r in results if not r["success"]]
    assert refused["error"].startswith("CapacityError: capacity:") and "already waiting" in refused["error"]
    status = http(plugin, "GET", "/kernels")[2]["watcher_runs"]
    assert status["mode"] == "reset" and status["runners"] == 1 and status["queue_limit"] == 1
    assert status["runs"] == 2 and status["busy"] == 0 and status["queued"] == 0


def test_the_fresh_mode_gives_every_run_its_own_kernel(fresh_provider):
    plugin = fresh_provider("--watcher-mode", "fresh")
    assert plugin.run("marker = 1", "")["success"]
    started = int(plugin.health().details["kernels_started"])
    result = plugin.run("marker", "")
    assert result["error"].startswith("NameError")
    assert int(plugin.health().details["kernels_started"]) == started + 1
    assert plugin.health().details["watcher_mode"] == "fresh"


def test_last_values_and_history_bindings_are_gone_too(provider):
    provider.run("'secret value'", "")
    provider.run("'secret value'", "")  # whichever runners took it
    for _ in range(6):
        result = provider.run("(_, __, ___, list(Out.values()), In[1:])", "")
        assert result["success"], result["error"]
        assert "secret" not in result["result"]
    leftover = provider.run("[n for n in dir() if 'kernel_provider' in n or n == '_attestation_functions']", "")
    assert leftover["result"] == "[]"


def test_what_a_run_printed_is_not_kept_for_the_next(fresh_provider):
    """IPython 9 keeps each cell's printed text in its history; a reset empties that too."""
    plugin = fresh_provider("--watcher-kernels", "1")
    assert plugin.run("print('secret printed text')", "")["stdout"] == "secret printed text\n"
    result = plugin.run("print(dict(getattr(get_ipython().history_manager, 'outputs', {})) or 'nothing kept')", "")
    assert result["stdout"] == "nothing kept\n"


def _wait_for_health(plugin, key: str, value: str) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while plugin.health().details.get(key) != value:
        assert time.monotonic() < deadline, f"Health never said {key}={value}"
        time.sleep(0.05)


def _spans(results: list[dict]) -> list[tuple[float, float]]:
    for result in results:
        assert result["success"], result["error"]
    return sorted(tuple(map(float, r["stdout"].split())) for r in results)


def _run_side_by_side(plugin, code: str, count: int) -> list[dict]:
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(plugin.run(code, ""))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _start_a_glyph_that_runs_until(plugin, release) -> threading.Thread:
    code = f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.01)\n'released'"
    glyph = threading.Thread(target=lambda: plugin.run(code, "long-glyph"))
    glyph.start()
    _wait_for_health(plugin, "watcher_glyphs_active", "true")
    return glyph


def test_beside_a_running_glyph_watcher_runs_take_turns_and_rest_but_go_on(fresh_provider, tmp_path):
    """Glyphs first: while a glyph runs, runs without a glyph go one at a time, each runner
    resting as long as it worked; and they still run while the glyph never ends."""
    plugin = fresh_provider()
    release = tmp_path / "release-the-glyph"
    glyph = _start_a_glyph_that_runs_until(plugin, release)
    try:
        code = "import time\nstarted = time.time()\ntime.sleep(0.3)\nprint(started, time.time())"
        spans = _spans(_run_side_by_side(plugin, code, 4))
    finally:
        release.touch()
        glyph.join()
    # All four ran while the glyph was still running (it ends only once released, after them):
    # watchers slow down, they do not stop.
    for (start, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert next_start >= end, f"two watcher runs overlapped beside a running glyph: {spans}"
        # The provider counts a runner busy from before the code starts until its reset is
        # done, and rests it as long: the gap is at least the run itself.
        assert next_start - end >= (end - start) * 0.95, f"no rest between watcher runs: {spans}"
    assert int(plugin.health().details["watcher_paced_for_glyphs"]) >= 3


@pytest.mark.parametrize("glyph_active", [False, True], ids=["no-glyph-active", "pacing-off-by-share-1"])
def test_watcher_runs_go_side_by_side_with_no_glyph_active_or_pacing_off(fresh_provider, tmp_path, glyph_active):
    """Pacing is only beside glyphs, and --watcher-share 1 turns it off: two runs that each wait
    for the other both finish."""
    release = tmp_path / "release-the-glyph"
    if glyph_active:
        plugin = fresh_provider("--watcher-share", "1")
        glyph = _start_a_glyph_that_runs_until(plugin, release)
    else:
        plugin = fresh_provider()
        assert plugin.run("1", "a-glyph")["success"]
        _wait_for_health(plugin, "watcher_glyphs_active", "false")
    # Each run marks its arrival and waits (up to a minute) for the other's mark: runs that
    # went one at a time would not both succeed.
    marks = tmp_path / "marks"
    marks.mkdir()
    code = (
        f"import os, time, uuid\nfolder = {str(marks)!r}\n"
        "open(os.path.join(folder, uuid.uuid4().hex), 'w').close()\n"
        "deadline = time.time() + 60\n"
        "while len(os.listdir(folder)) < 2 and time.time() < deadline:\n    time.sleep(0.01)\n"
        "print(len(os.listdir(folder)), time.time())"
    )
    try:
        results = _run_side_by_side(plugin, code, 2)
    finally:
        if glyph_active:
            release.touch()
            glyph.join()
    assert [r["success"] for r in results] == [True, True], [r["error"] for r in results]
    assert [r["stdout"].split()[0] for r in results] == ["2", "2"]
    assert plugin.health().details["watcher_paced_for_glyphs"] == "0"


def test_every_thread_of_a_runner_yields_the_cpu_to_glyphs(provider):
    """os.nice() lowers one thread on Linux; a runner lowers all of its threads, ipykernel's own too."""
    code = (
        "import os\n"
        "tids = [int(t) for t in os.listdir('/proc/self/task')]\n"
        "print(len(tids), min(os.getpriority(os.PRIO_PROCESS, t) for t in tids))"
    )
    threads, niceness = provider.run(code, "")["stdout"].split()
    assert int(threads) >= 3 and int(niceness) >= 10
    threads, niceness = provider.run(code, "a-glyph-at-normal-priority")["stdout"].split()
    assert int(niceness) == os.getpriority(os.PRIO_PROCESS, 0)  # the provider's, which the tests' is
