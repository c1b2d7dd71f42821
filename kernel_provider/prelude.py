"""Set-up code the provider runs inside every kernel it starts.

This file is sent to the kernel as source text and never imported by the
provider, so it may use only the standard library and IPython: the kernelspec
can be any Python that has ipykernel. It makes ``upstream`` hold the attestation
that QNTX sent with each run, and defines ``attest``, ``last`` and
``AttestationError``, which reach QNTX's attestation store through the provider
(kernel_provider/attestations.py). The provider runs it once per kernel, before
the kernel is any glyph's; ``__glyph_id__`` is set when a glyph claims the kernel.

attest() and last() ask the provider on the kernel's own stdin channel: an
input_request whose prompt is a marker and a JSON request, answered with a JSON
input_reply. That channel needs no network (a sandboxed kernel has none) and reaches
the provider wherever the kernel runs; and the provider knows whose kernel asked,
so a kernel cannot speak for another glyph.
"""


def _kernel_provider_setup(memory_limit_mb=None, prelude_names=()):
    ip = get_ipython()  # noqa: F821 - defined inside an IPython kernel
    if memory_limit_mb:
        # Data memory (heap and private mappings), not address space: an idle kernel
        # maps far more than it uses. Past it, allocations raise MemoryError in the glyph.
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    ip.user_ns["upstream"] = None
    kernel = ip.kernel
    _quiet_pipe(kernel)
    ask_provider = type(kernel).raw_input.__get__(kernel)  # before input() is turned off below

    def provider_request():
        # Only the provider's own requests carry this metadata: a person attached from
        # JupyterLab runs code without touching `upstream`, and cannot call the provider.
        get_parent = getattr(kernel, "get_parent", None)  # ipykernel >= 6
        parent = (get_parent() if get_parent else getattr(ip, "parent_header", None)) or {}
        request = (parent.get("metadata") or {}).get("kernel_provider")
        return request if isinstance(request, dict) else None

    def set_upstream(info):
        request = provider_request()
        if request is not None:
            ip.user_ns["upstream"] = request.get("upstream")

    def set_glyph_id():
        # The glyph whose kernel this is comes with each of its runs (silent ones too, hence
        # pre_execute): claiming a pooled kernel then costs the kernel no run of its own.
        request = provider_request()
        if request is not None and request.get("glyph_id"):
            ip.user_ns["__glyph_id__"] = request["glyph_id"]

    ip.events.register("pre_run_cell", set_upstream)
    ip.events.register("pre_execute", set_glyph_id)
    functions = _attestation_functions(ask_provider, provider_request)
    ip.user_ns.update(functions)
    _install_reset(ip, functions, prelude_names)
    __import__("sys").modules["_kernel_provider"].lower_priority = _lower_priority

    # Nobody answers input() in a glyph: fail at once, as with a front end without stdin.
    from IPython.core.error import StdinNotImplementedError

    def no_input(prompt="", *args, **kwargs):
        __tracebackhide__ = True
        raise StdinNotImplementedError("a glyph does not support input requests: nobody is there to answer.")

    kernel.raw_input = no_input
    kernel.getpass = no_input
    _keep_lone_surrogates(ip)
    _skip_empty_flushes()
    # IPython builds its display formatters at the first value a cell shows: do it now, while
    # the kernel waits in the pool, not in a glyph's first run (1-2 ms).
    ip.display_formatter.format(0)


def _skip_empty_flushes():
    """Let sys.stdout.flush() and sys.stderr.flush() return at once when nothing was written.

    ipykernel flushes both streams twice around every execute_request, and each flush waits
    for a round trip through its IOPub thread even when the stream holds nothing: about a
    fifth of a short run. That wait also keeps the order of output: text the IOPub thread
    is packing on its own is queued for sending only once packed, and the wait lets it in
    ahead of the status and reply that follow. So a flush is skipped only when no text at
    all was written since the last flush that waited; looking at ipykernel's buffers would
    not do, as text being packed has already left them.
    """
    import itertools
    import sys

    for stream in (sys.stdout, sys.stderr):
        if not hasattr(stream, "_schedule_flush"):  # not ipykernel's OutStream, or another version
            continue
        marks = itertools.count(2)
        # The mark of the last write, and the mark the last waiting flush saw. ipykernel's
        # write() calls _schedule_flush() once its text is in (IPython swaps write() itself in
        # and out around each cell, so that is the place to hook); next() is atomic, so a
        # flush that saw a mark has sent every text written before it. The first one waits.
        last_write, flushed = [1], [0]

        def mark_write(schedule=stream._schedule_flush, last_write=last_write, marks=marks):
            last_write[0] = next(marks)
            schedule()

        def flush(flush_all=stream.flush, last_write=last_write, flushed=flushed):
            seen = last_write[0]
            if seen != flushed[0]:
                flush_all()
                flushed[0] = seen

        stream._schedule_flush = mark_write
        stream.flush = flush


def _keep_lone_surrogates(ip):
    """print("\\ud800x") must not lose the output: send U+FFFD where a lone surrogate was.

    jupyter_client's packer cannot encode a lone surrogate as UTF-8, so ipykernel drops
    the whole message (and logs a traceback to stderr); such a message is sent again
    with each lone surrogate replaced.
    """
    import json
    import re
    import sys

    from jupyter_client.jsonutil import json_default

    surrogate = re.compile("[\\ud800-\\udfff]")

    def wrap(pack):
        def pack_keeping_text(obj):
            try:
                return pack(obj)
            except UnicodeEncodeError:
                text = json.dumps(obj, default=json_default, ensure_ascii=False, allow_nan=False)
                return surrogate.sub("\ufffd", text).encode("utf-8")

        return pack_keeping_text

    sessions = (ip.kernel.session, getattr(sys.stdout, "session", None), ip.display_pub.session)
    for session in {id(s): s for s in sessions if s is not None}.values():
        session.pack = wrap(session.pack)


def _quiet_pipe(kernel):
    """Drop junk sent to ipykernel's subprocess-output pipe instead of printing each piece.

    ipykernel listens on a TCP port of 127.0.0.1 for the output of forked subprocesses and
    prints every message without its secret to stderr, which is the provider's: anyone on the
    machine could flood the provider's log. Messages with the secret are handled as before.
    """
    thread = getattr(kernel, "iopub_thread", None)
    pipe, secret = getattr(thread, "_pipe_in", None), getattr(thread, "_pipe_uuid", None)
    if pipe is None or secret is None:
        return
    handle = thread._handle_pipe_msg

    def only_ours(msg):
        if msg and msg[0] == secret:
            handle(msg)

    pipe.on_recv(only_ours)


def _install_reset(ip, functions, prelude_names):
    """``_kernel_provider.reset()``: a clean namespace for the next run of a runner kernel.

    Runs without a glyph share runner kernels (kernel_provider/watchers.py); between two runs
    the provider calls this. It empties the user namespace (variables, functions, imported
    names, In/Out) and puts back what the prelude gives every run, the working folder,
    sys.path and the environment variables as they were when the kernel started. Modules
    stay imported (and keep their state) and threads a run started keep running: that is
    what the README promises, no more.
    """
    import os
    import sys
    import types

    cwd, path, environ = os.getcwd(), list(sys.path), dict(os.environ)
    ip.user_ns.update(functions)
    ip.user_ns.update(upstream=None, __glyph_id__="")
    # What a run starts from: the namespace as IPython and the prelude made it, without the
    # prelude's own functions (deleted once set-up is done). In, Out, _oh and _ih in it are
    # IPython's own history containers, emptied in place below.
    baseline = {name: value for name, value in ip.user_ns.items() if name not in prelude_names}
    history, displayhook = ip.history_manager, ip.displayhook

    def reset():
        # Lighter than InteractiveShell.reset() (which also collects garbage, 4-14 ms a call):
        # the bindings go, the containers IPython keeps references to are emptied in place.
        history.output_hist.clear()
        history.output_hist_reprs.clear()
        getattr(history, "outputs", {}).clear()  # IPython 9 keeps every cell's printed text here
        del history.input_hist_parsed[1:]
        del history.input_hist_raw[1:]
        for name in ("_", "__", "___"):  # the displayhook's own copies of the last values
            setattr(displayhook, name, "")
        ip.user_ns.clear()
        ip.user_ns.update(baseline)
        os.chdir(cwd)
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(environ)

    home = types.ModuleType("_kernel_provider", "Set-up of kernel_provider (see its prelude.py).")
    home.reset = reset
    sys.modules["_kernel_provider"] = home


def _lower_priority(niceness):
    """``_kernel_provider.lower_priority(n)``: every thread of this kernel at niceness n.

    os.nice() changes only the calling thread on Linux, and ipykernel does a third of a short
    run's work in its other threads (IOPub, shell channel, zmq's own); threads started later
    inherit the niceness of the thread that starts them.
    """
    import os

    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread at least
        threads = [0]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
        except OSError:
            pass  # a thread that ended meanwhile


def _attestation_functions(ask_provider, provider_request):
    """attest(), last() and AttestationError, asking the provider over the kernel's stdin channel."""
    import json
    import math

    service_prompt = "\x00kernel_provider:"  # execution.SERVICE_PROMPT
    # Keeps a request well under QNTX's 4 MB gRPC limit once the provider forwards it.
    max_request_bytes = 1_000_000
    max_exact_int = 2**53  # the store keeps numbers as doubles
    max_depth = 100

    class AttestationError(Exception):
        """attest() or last() failed: no attestation store, the store said no, or it is unreachable."""

    AttestationError.__qualname__ = "AttestationError"  # not "_attestation_functions.<locals>...."

    # __tracebackhide__: IPython leaves these frames out of the glyph's traceback, which
    # then ends at the glyph's own call.
    def strings(name, value, required):
        __tracebackhide__ = True
        if value is None and not required:
            return []
        if isinstance(value, str):
            raise TypeError(f"{name} must be a list of strings, such as [{value!r}], not a bare string.")
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of strings, not {type(value).__name__}.")
        for item in value:
            if not isinstance(item, str):
                raise TypeError(f"{name} must hold only strings; {item!r} is a {type(item).__name__}.")
        if required and not value:
            raise ValueError(f"{name} must name at least one.")
        return list(value)

    def check_json(value, where, depth=0):
        __tracebackhide__ = True
        # json.dumps would quietly turn 1 into "1" as a key and a tuple into a list; say so instead.
        if depth > max_depth:
            raise ValueError(f"attributes are nested more than {max_depth} levels deep (a cycle?) at {where}.")
        if value is None or isinstance(value, (str, bool)):
            return
        if isinstance(value, int):
            if abs(value) > max_exact_int:
                raise ValueError(
                    f"{where} = {value} is too large to be stored exactly (the store keeps numbers "
                    "as 64-bit floats); store it as a string."
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{where} = {value} cannot be stored: JSON has no NaN or infinity.")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(f"{where} has the key {key!r}; attribute keys must be strings.")
                check_json(item, f"{where}[{key!r}]", depth + 1)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                check_json(item, f"{where}[{index}]", depth + 1)
        else:
            raise TypeError(f"{where} is a {type(value).__name__}, which is not JSON-serialisable.")

    def call(method, params):
        __tracebackhide__ = True
        if provider_request() is None:
            raise AttestationError(
                "attest() and last() work in the glyph's own runs, not from a client attached to its kernel."
            )
        request = json.dumps({"method": method, "params": params})
        if len(request.encode()) > max_request_bytes:
            raise ValueError(f"the request is {len(request.encode())} bytes; the limit is {max_request_bytes}.")
        reply = ask_provider(service_prompt + request)
        try:
            answer = json.loads(reply)
        except ValueError:
            raise AttestationError("the kernel provider gave no answer (is it shutting down?).") from None
        if not answer.get("ok"):
            raise AttestationError(answer.get("error") or "the kernel provider gave no reason.")
        return answer.get("result")

    def attest(subjects, predicates, contexts, actors=None, attributes=None):
        """Record that subjects have predicates in contexts; return the stored attestation as a dict.

        The provider names this glyph (glyph:<id>) as the first actor; actors adds more, never
        another glyph. attributes is a JSON-serialisable dict.
        """
        __tracebackhide__ = True
        params = {
            "subjects": strings("subjects", subjects, True),
            "predicates": strings("predicates", predicates, True),
            "contexts": strings("contexts", contexts, False),
            "actors": strings("actors", actors, False),
        }
        if attributes is not None:
            if not isinstance(attributes, dict):
                raise TypeError(f"attributes must be a dict, not {type(attributes).__name__}.")
            check_json(attributes, "attributes")
            params["attributes"] = attributes
        return call("attest", params)

    def last(subjects=None, predicates=None, contexts=None, actors=None):
        """The newest attestation matching every given list (any of its items), as a dict, or None."""
        __tracebackhide__ = True
        params = {
            "subjects": strings("subjects", subjects, False),
            "predicates": strings("predicates", predicates, False),
            "contexts": strings("contexts", contexts, False),
            "actors": strings("actors", actors, False),
        }
        return call("last", params)

    return {"attest": attest, "last": last, "AttestationError": AttestationError}
