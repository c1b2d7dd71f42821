"""The Jupyter glyph: what RegisterGlyphs announces and the files HandleHTTP serves for it.

QNTX imports the ES module at ``/api/{plugin}{MODULE_PATH}`` and loads the stylesheet at
``/api/{plugin}{CSS_PATH}``; both, and the libraries the module imports by relative URL,
are package data in kernel_provider/glyph_assets/, served from memory with an ETag so a
browser revalidates instead of fetching them again.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files

from kernel_provider.proto import domain_pb2

ASSETS_PREFIX = "/glyph/"
MODULE_PATH = ASSETS_PREFIX + "jupyter.js"
CSS_PATH = ASSETS_PREFIX + "jupyter.css"
SYMBOL = "⌬"

CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def glyph_defs() -> list[domain_pb2.GlyphDef]:
    return [
        domain_pb2.GlyphDef(
            symbol=SYMBOL,
            title="Jupyter",
            label="jupyter",
            # QNTX builds content_url from content_path too; the module renders everything.
            content_path=MODULE_PATH,
            css_path=CSS_PATH,
            module_path=MODULE_PATH,
            default_width=640,
            default_height=480,
        )
    ]


@cache
def _assets() -> dict[str, tuple[bytes, str, str]]:
    """Every served file of glyph_assets: name -> (content, content type, ETag)."""
    served = {}
    for resource in files("kernel_provider").joinpath("glyph_assets").iterdir():
        suffix = resource.name[resource.name.rfind(".") :]
        if resource.is_file() and suffix in CONTENT_TYPES:
            content = resource.read_bytes()
            etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
            served[resource.name] = (content, CONTENT_TYPES[suffix], etag)
    return served


def asset(name: str) -> tuple[bytes, str, str] | None:
    """(content, content type, ETag) of a served file by its name, or None when there is none."""
    return _assets().get(name)
