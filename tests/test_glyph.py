"""The Jupyter glyph: its GlyphDef, its files over HandleHTTP, and the module itself in a real browser.

The browser tests load the module in Debian's headless chromium, driven by Playwright, in a
page that implements QNTX's GlyphUI and bridges pluginFetch/pluginWebSocket to the launched
provider's HandleHTTP and HandleWebSocket over real gRPC (tests/qntx_canvas.py), with real
kernels behind it. Nothing waits on a clock to prove an order of events: live output is
shown by code that prints, then waits for a file the test creates only after the browser
shows the print.
"""

from __future__ import annotations

import base64
import struct
import uuid
import zlib
from pathlib import Path

import nbformat
import pytest
from qntx_canvas import Canvas, open_glyph, run_code, wait_until_idle

from kernel_provider.proto import domain_pb2

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
EMPTY = domain_pb2.Empty()


def glyph() -> str:
    return f"glyph-{uuid.uuid4().hex[:8]}"


def get(plugin, path: str, headers: dict[str, str] | None = None) -> domain_pb2.HTTPResponse:
    request = domain_pb2.HTTPRequest(
        method="GET",
        path=path,
        headers=[domain_pb2.HTTPHeader(name=k, values=[v]) for k, v in (headers or {}).items()],
    )
    return plugin.domain.HandleHTTP(request, timeout=60)


def header(response: domain_pb2.HTTPResponse, name: str) -> str | None:
    values = [v for h in response.headers if h.name.lower() == name.lower() for v in h.values]
    return values[0] if values else None


# ------------------------------------------------------------------ GlyphDef and files


def test_register_glyphs_announces_the_jupyter_glyph_whose_files_are_served(provider):
    (definition,) = provider.domain.RegisterGlyphs(EMPTY, timeout=60).glyphs
    assert definition.title == "Jupyter" and definition.symbol and definition.label
    assert definition.module_path == "/glyph/jupyter.js" and definition.css_path == "/glyph/jupyter.css"
    assert definition.default_width > 0 and definition.default_height > 0

    module = get(provider, definition.module_path)
    assert module.status_code == 200
    assert header(module, "Content-Type") == "text/javascript; charset=utf-8"
    assert b"export async function render(glyph, ui)" in module.body
    css = get(provider, definition.css_path)
    assert css.status_code == 200 and header(css, "Content-Type") == "text/css; charset=utf-8"
    assert b".kp-jupyter" in css.body
    # The libraries the module imports by relative URL are served beside it.
    for library in (b"./ansi_up.js", b"./marked.esm.js", b"./purify.es.mjs"):
        assert library in module.body
        answer = get(provider, "/glyph/" + library[2:].decode())
        assert answer.status_code == 200 and header(answer, "Content-Type").startswith("text/javascript")


def test_glyph_files_are_revalidated_by_etag(provider):
    first = get(provider, "/glyph/jupyter.js")
    etag = header(first, "ETag")
    assert header(first, "Cache-Control") == "no-cache" and etag
    again = get(provider, "/glyph/jupyter.js", {"If-None-Match": etag})
    assert again.status_code == 304 and again.body == b"" and header(again, "ETag") == etag
    stale = get(provider, "/glyph/jupyter.js", {"If-None-Match": '"something-else"'})
    assert stale.status_code == 200 and stale.body == first.body


@pytest.mark.parametrize(
    "path",
    ["/glyph/nothing.js", "/glyph/ansi_up.LICENSE", "/glyph/..%2Fglyph.py", "/glyph/%2E%2E%2F__init__.py"],
)
def test_only_the_glyphs_own_files_are_served(provider, path):
    answer = get(provider, path)
    assert answer.status_code == 404
    assert header(answer, "Content-Type").startswith("application/json")
    assert b"the glyph has no file" in answer.body


# ------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def canvas(provider):
    with Canvas(provider.port) as started:
        yield started


def tiny_png(width: int = 3, height: int = 2, pixel=lambda x, y: (255, 0, 0)) -> bytes:
    """A real PNG (by default red), made here so the kernel needs no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))
    header_data = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header_data) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def test_the_glyph_runs_code_live_and_shows_what_a_notebook_shows(browser, canvas, tmp_path):
    from playwright.sync_api import expect

    glyph_id = glyph()
    page = open_glyph(browser, canvas, glyph_id)
    outputs = page.locator(".kp-outputs")
    expect(page.locator(".kp-kernelspec")).to_have_text("python3")

    # Live: the first print is on the page while the code still waits for the go-ahead file.
    go = tmp_path / "go"
    run_code(
        page,
        "import os, time\n"
        "print('first', flush=True)\n"
        "deadline = time.monotonic() + 60\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        f"print('second' if os.path.exists({str(go)!r}) else 'gave up', flush=True)\n",
    )
    expect(outputs.locator(".kp-stdout")).to_have_text("first\n")
    expect(page.locator(".kp-state")).to_have_text("busy")
    go.touch()
    wait_until_idle(page, 1)
    expect(outputs.locator(".kp-stdout")).to_have_text("first\nsecond\n")  # one block, as a notebook joins them

    # A PNG from bytes (no matplotlib) is an <img> the browser decoded.
    png = base64.b64encode(tiny_png()).decode()
    run_code(
        page, f"from IPython.display import Image, display\nimport base64\ndisplay(Image(base64.b64decode({png!r})))"
    )
    wait_until_idle(page, 2)
    image = outputs.locator("img.kp-image")
    expect(image).to_have_attribute("src", f"data:image/png;base64,{png}")
    assert image.evaluate("img => img.complete && [img.naturalWidth, img.naturalHeight]") == [3, 2]

    # HTML goes into a sandboxed iframe where neither its script nor its event handlers run.
    run_code(
        page,
        "from IPython.display import HTML, display\n"
        "display(HTML('<table><tr><th>k</th></tr><tr><td>cell-42</td></tr></table>'\n"
        "             '<script>parent.document.title = \"pwned\"</script>'\n"
        "             '<img src=\"data:,\" onerror=\"parent.document.title = \\'pwned\\'\">'))\n"
        "40 + 2",
    )
    wait_until_idle(page, 3)
    frame = outputs.locator("iframe.kp-html")
    expect(frame).to_have_attribute("sandbox", "allow-same-origin")
    expect(page.frame_locator("iframe.kp-html").locator("td")).to_have_text("cell-42")
    expect(outputs.locator(".kp-execute_result")).to_contain_text("Out[3]:42")
    assert page.title() != "pwned"

    # A traceback in colour: ansi_up turns IPython's escape codes into coloured spans.
    run_code(page, "def inner():\n    return 1 / 0\ninner()")
    wait_until_idle(page, 4)
    error = outputs.locator(".kp-error")
    expect(error).to_contain_text("ZeroDivisionError")
    assert "\x1b[" not in error.inner_text()
    assert error.locator("span[style*='color']").count() > 0

    # Markdown is rendered and sanitized; JSON is shown as JSON.
    run_code(
        page,
        "from IPython.display import Markdown, JSON, display\n"
        "display(Markdown('# Title\\n\\n*em* <img src=x onerror=alert(1)>'))\n"
        "display(JSON({'answer': 42}))",
    )
    wait_until_idle(page, 5)
    expect(outputs.locator("[data-mime='text/markdown'] h1")).to_have_text("Title")
    expect(outputs.locator("[data-mime='text/markdown'] em")).to_have_text("em")
    assert outputs.locator("[data-mime='text/markdown'] img").get_attribute("onerror") is None
    expect(outputs.locator("[data-mime='application/json']")).to_contain_text('"answer": 42')

    # Everything at once, for the screenshot (the README shows a copy of it).
    picture = tmp_path / "gradient.png"
    picture.write_bytes(tiny_png(160, 48, lambda x, y: (40 + x, 90 + y * 2, 220 - x)))
    run_code(
        page,
        "from IPython.display import HTML, Image, display\n"
        "print('live output, then a table, a picture and a traceback')\n"
        "display(HTML('<table><tr><th>glyph</th><th>runs</th></tr><tr><td>ax-1</td><td>3</td></tr></table>'))\n"
        f"display(Image(filename={str(picture)!r}))\n"
        "{'a': 1}['b']",
    )
    wait_until_idle(page, 6)
    expect(outputs.locator(".kp-error")).to_contain_text("KeyError")
    expect(page.frame_locator("iframe.kp-html").locator("td").first).to_have_text("ax-1")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#canvas").screenshot(path=str(ARTIFACTS / "jupyter-glyph.png"))
    assert page.evaluate("window.canvas.errors") == []
    page.close()


def test_clear_output_and_display_updates_are_honoured_while_live(browser, canvas, tmp_path):
    from playwright.sync_api import expect

    page = open_glyph(browser, canvas, glyph())
    outputs = page.locator(".kp-outputs")
    go = tmp_path / "go"
    run_code(
        page,
        "import os, time\n"
        "from IPython.display import clear_output, display, update_display\n"
        "print('cleared away', flush=True)\n"
        "clear_output(wait=True)\n"
        "handle = display('version 1', display_id=True)\n"
        "handle.update('version 2')\n"
        "print('after the update', flush=True)\n"
        "deadline = time.monotonic() + 60\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n",
    )
    expect(outputs.locator(".kp-stdout")).to_have_text("after the update\n")
    expect(outputs).not_to_contain_text("cleared away")
    expect(outputs.locator(".kp-display_data")).to_have_text("'version 2'")
    go.touch()
    wait_until_idle(page, 1)
    page.close()


def test_interrupt_restart_upstream_and_the_code_survives_a_reload(browser, canvas):
    from playwright.sync_api import expect

    glyph_id = glyph()
    page = open_glyph(browser, canvas, glyph_id)
    outputs = page.locator(".kp-outputs")

    # The glyph's upstream (a meld) reaches the kernel as `upstream`.
    page.evaluate("window.canvas.meld({glyphId: 'ax-1', symbol: '⋈', direction: 'right', content: 'melded'})")
    expect(page.locator(".kp-upstream")).to_contain_text("ax-1")
    run_code(page, "kept = 7\nprint(upstream['content'], upstream['glyph_id'])")
    wait_until_idle(page, 1)
    expect(outputs.locator(".kp-stdout")).to_have_text("melded ax-1\n")

    # Interrupt a long sleep: had the interrupt not worked, the run would end without KeyboardInterrupt.
    run_code(page, "import time\nprint('sleeping', flush=True)\ntime.sleep(60)\nprint('slept through')")
    expect(outputs.locator(".kp-stdout")).to_have_text("sleeping\n")
    page.get_by_role("button", name="Interrupt").click()
    wait_until_idle(page, 2)
    expect(outputs.locator(".kp-error")).to_contain_text("KeyboardInterrupt")
    expect(outputs.locator(".kp-stdout")).to_have_text("sleeping\n")  # never "slept through"
    run_code(page, "print(kept)")
    wait_until_idle(page, 3)
    expect(outputs.locator(".kp-stdout")).to_have_text("7\n")

    # Restart: a fresh kernel, without the old variables.
    page.get_by_role("button", name="Restart").click()
    expect(page.locator(".canvas-status")).to_have_text("restarted: a fresh kernel")
    run_code(page, "print(kept)")
    wait_until_idle(page, 1)
    expect(outputs.locator(".kp-error")).to_contain_text("NameError")

    # The session downloads as a notebook: every run so far, the one before the restart too.
    with page.expect_download() as download:
        page.get_by_role("button", name="Notebook").click()
    assert download.value.suggested_filename == f"{glyph_id}.ipynb"
    notebook = nbformat.reads(Path(download.value.path()).read_text(), as_version=4)
    assert [cell.source for cell in notebook.cells][-1] == "print(kept)"
    assert len(notebook.cells) == 4  # the meld, the sleep, and print(kept) before and after the restart

    # The code is kept in the glyph's config: a reload shows it again.
    final_code = "# kept across reloads\nprint('hello')"
    run_code(page, final_code)
    wait_until_idle(page, 2)
    page.reload()
    page.wait_for_selector("body[data-ready=yes]", state="attached")
    expect(page.locator(".kp-code")).to_have_value(final_code)
    expect(page.locator(".kp-prompt")).to_have_text("[2]:")  # the kernel's count, from GET /kernels
    assert page.evaluate("window.canvas.errors") == []
    page.close()
