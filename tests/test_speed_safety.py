"""What the speed work (issue 10) could break, checked through a real provider.

Kernels keep their history in memory and skip ipykernel's reply sleep; the warm pool hands
its booting kernel to the first run that needs one; the provider reads kernels through its
own connection, which drops what no request waits for. Each test here holds one of the
promises those changes must keep.
"""

from __future__ import annotations

import json
import threading
import time

import grpc

from conftest import LAUNCH_TIMEOUT


def wait_for(predicate, timeout: float = LAUNCH_TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_in_out_and_history_work_within_a_session(provider):
    glyph = "history-glyph"
    assert provider.run("a = 20", glyph)["success"]
    assert provider.run("a + 1", glyph)["result"] == "21"
    result = provider.run("print(In[1], '|', Out[2]); get_ipython().run_line_magic('history', '-n 1-2')", glyph)
    assert result["success"], result["error"]
    assert "a = 20 | 21" in result["stdout"]
    assert "1: a = 20" in result["stdout"] and "2: a + 1" in result["stdout"]


def test_history_is_kept_per_kernel_not_shared(provider):
    """Two glyphs' histories do not mix (IPython's shared history.sqlite is not used)."""
    provider.run("secret_line_of_glyph_one = 1", "history-one")
    result = provider.run(
        "ip = get_ipython()\nprint([line for _, _, line in ip.history_manager.search('*secret_line*')])",
        "history-two",
    )
    assert result["success"], result["error"]
    assert "secret_line_of_glyph_one" not in result["stdout"]


def test_outputs_keep_their_order_under_concurrency(provider):
    """Eight glyphs printing interleaved streams and displays at once: each answer is its own, in order."""
    code = (
        "import sys\nfrom IPython.display import display\n"
        "for i in range(40):\n"
        "    print(f'{__glyph_id__}:{i}')\n"
        "    if i % 10 == 0:\n"
        "        display({'text/plain': f'{__glyph_id__}:display:{i}'}, raw=True)\n"
        "    print(f'{__glyph_id__}:err:{i}', file=sys.stderr)\n"
    )
    glyphs = [f"order-{n}" for n in range(8)]
    results: dict[str, dict] = {}

    def run(glyph: str) -> None:
        results[glyph] = provider.run(code, glyph)

    threads = [threading.Thread(target=run, args=(g,)) for g in glyphs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for glyph in glyphs:
        result = results[glyph]
        assert result["success"], result["error"]
        assert result["stdout"] == "".join(f"{glyph}:{i}\n" for i in range(40))
        assert result["stderr"] == "".join(f"{glyph}:err:{i}\n" for i in range(40))
        displays = [o["data"]["text/plain"] for o in result["outputs"] if o["output_type"] == "display_data"]
        assert displays == [f"{glyph}:display:{i}" for i in range(0, 40, 10)]


def test_the_first_run_after_initialize_takes_the_booting_pool_kernel(fresh_provider):
    """At a ceiling of one kernel, a run that started a second kernel could not succeed at all."""
    plugin = fresh_provider("--pool-size", "1", "--max-kernels", "1", initialize=False)
    plugin.initialize()  # the pool starts booting its one kernel now
    result = plugin.run("21 * 2", "first-glyph")
    assert result["success"], result["error"]
    assert result["result"] == "42"
    details = plugin.health().details
    assert details["kernels_started"] == "1"
    # The pool cannot refill at the ceiling, so nothing else boots later either.
    time.sleep(1)
    assert plugin.health().details["kernels_started"] == "1"
    assert len(plugin.kernel_pids()) == 1


def test_a_run_that_gives_up_while_the_pool_boots_leaves_no_extra_kernel(fresh_provider):
    """The caller goes away while the kernel it claimed boots: its glyph keeps that one kernel."""
    plugin = fresh_provider("--pool-size", "1", initialize=False)
    plugin.initialize()
    try:
        plugin.execute("1", "impatient", timeout=0.05)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert plugin.run("impatient = 1; impatient", "impatient")["result"] == "1"
    assert plugin.run("1 + 1", "patient")["result"] == "2"
    wait_for(lambda: plugin.health().details["pooled_kernels"] == "1", what="the pool to refill")
    # One kernel per glyph and one in the pool, and never a boot more than that.
    assert plugin.health().details["kernels_started"] == "3"
    assert len(plugin.kernel_pids()) == 3


def test_pooled_kernels_stay_out_of_the_inspected_folder(fresh_provider):
    plugin = fresh_provider("--pool-size", "2")
    wait_for(lambda: plugin.health().details["pooled_kernels"] == "2", what="the pool to fill")
    assert list(plugin.connection_dir.glob("kernel-*.json")) == []
    plugin.run("1", "inspected")
    (only,) = plugin.connection_dir.glob("kernel-*.json")
    assert json.loads(only.read_text())["kernel_provider"]["glyph_id"] == "inspected"


def test_output_between_runs_does_not_pile_up_in_the_provider(fresh_provider):
    """A glyph's thread printing megabytes while no run waits: dropped unread, and runs still answer."""
    plugin = fresh_provider()
    start = (
        "import threading, time\nfrom IPython.display import display\n"
        "def _flood():\n"
        "    for _ in range(300):\n"
        "        display({'text/plain': 'x' * 1_000_000}, raw=True)\n"
        "threading.Thread(target=_flood, daemon=True).start()\n"
    )
    assert plugin.run(start, "flooder")["success"]
    before = rss_kib(plugin.process.pid)
    time.sleep(3)
    result = plugin.run("'still here'", "flooder")
    assert result["result"] == "'still here'"
    # 300 MB went by; what the provider grew by is nowhere near it.
    assert rss_kib(plugin.process.pid) - before < 100 * 1024


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_provider_answers_while_kernels_boot(fresh_provider):
    """Kernel boots do not hold the event loop: Health answers before any of four first runs does."""
    plugin = fresh_provider()
    finished: list[str] = []

    def first_run(glyph: str) -> None:
        assert plugin.run("1", glyph)["success"]
        finished.append(glyph)

    threads = [threading.Thread(target=first_run, args=(f"booting-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: int(plugin.health().details["kernels_started"]) >= 1, what="the first boot")
    answered_while_booting = [finished == [] for _ in range(5) if plugin.health().healthy]
    for thread in threads:
        thread.join()
    assert len(finished) == 4
    assert answered_while_booting and all(answered_while_booting)


def test_junk_on_a_kernels_subprocess_pipe_does_not_flood_the_provider(fresh_provider):
    """Issue 9, point 11: ipykernel's pipe port takes anything from anyone; it must not reach our log."""
    import zmq

    plugin = fresh_provider()
    port = int(plugin.run("get_ipython().kernel.iopub_thread._pipe_port", "piped")["result"])
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.linger = 1000
    push.connect(f"tcp://127.0.0.1:{port}")
    for n in range(500):
        push.send_multipart([b"not the secret", b"junk %d" % n])
    push.close()
    context.term()
    # Output of a forked subprocess, which travels on that pipe with the secret, still arrives.
    child = "import os\npid = os.fork()\nif pid == 0:\n    print('from the child', flush=True); os._exit(0)\n"
    forked = plugin.run(child + "os.waitpid(pid, 0); 'ok'", "piped")
    assert forked["success"] and forked["result"] == "'ok'"
    assert "from the child" in forked["stdout"]
    assert not [line for line in plugin.stderr_lines if "Bad pipe message" in line]


def test_a_pooled_kernel_whose_file_was_removed_is_stopped_not_leaked(fresh_provider):
    """Issue 9, point 11: such a kernel leaked its process and its slot."""
    plugin = fresh_provider("--pool-size", "1", "--max-kernels", "2")
    wait_for(lambda: plugin.health().details["pooled_kernels"] == "1", what="the pool to fill")
    (pool_file,) = (plugin.connection_dir / "pool").glob("kernel-pool-*.json")
    (pooled_pid,) = plugin.kernel_pids()
    pool_file.unlink()
    result = plugin.run("'a fresh kernel'", "after-the-loss")
    assert result["success"] and result["result"] == "'a fresh kernel'"
    wait_for(lambda: pooled_pid not in plugin.kernel_pids(), what="the orphaned pool kernel to stop")
    # Its slot came back: the glyph's kernel and a refilled pool fit under the ceiling of two.
    wait_for(lambda: plugin.health().details["pooled_kernels"] == "1", what="the pool to refill")
    assert len(plugin.kernel_pids()) == 2


def test_the_preludes_own_functions_are_not_left_in_a_glyphs_namespace(provider):
    """Set-up deletes every function the prelude defined; a glyph sees only what it is promised."""
    import ast
    from pathlib import Path

    import kernel_provider.prelude

    source = Path(kernel_provider.prelude.__file__).read_text()
    helpers = [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    assert len(helpers) >= 5
    result = provider.run(f"print(sorted(set({helpers!r}) & set(globals())))", "prelude-names")
    assert result["success"], result["error"]
    assert result["stdout"] == "[]\n"
    assert provider.run("print(callable(attest), callable(last))", "prelude-names")["stdout"] == "True True\n"


def test_output_without_a_newline_still_arrives_with_its_run(provider):
    """Empty flushes are skipped (prelude); a stream holding text is still flushed before the reply."""
    code = "import sys\nprint('partial', end='')\nsys.stderr.write('err-partial')\n"
    code += "sys.stdout.flush()\nprint('', end='')"
    for _ in range(3):
        result = provider.run(code, "unflushed")
        assert result["success"], result["error"]
        assert result["stdout"] == "partial" and result["stderr"] == "err-partial"


def test_output_being_sent_when_the_run_ends_still_arrives_with_its_run(provider):
    """ipykernel's IOPub thread may be packing a periodic flush of a big write just as the run
    ends. The flush at the end of the run must wait for it, or the run's idle status overtakes
    the output and the output is lost. The glyph waits until that packing has begun."""
    code = (
        "import sys, time\n"
        "sys.stderr.write('e' * 20_000_000)\n"
        "deadline = time.monotonic() + 10\n"
        "while sys.stderr._buffers and time.monotonic() < deadline:  # emptied by the IOPub thread\n"
        "    pass\n"
        "'done'"
    )
    for attempt in range(3):
        result = provider.run(code, "flush-race")
        assert result["success"], result["error"]
        assert result["result"] == "'done'"
        assert result["stderr"].startswith("eeee"), f"attempt {attempt}: the output was lost: {str(result)[:300]}"
