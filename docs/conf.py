"""Sphinx configuration of the documentation site (make docs).

The pages are Markdown (MyST), so that they read the same on a code host
as on the site.  The API reference takes its text from the extension's
own docstrings (what help() shows) and its signatures, with types, from
the stub src/aiorun/_aiorun.pyi: autodoc cannot see the annotations of a
C function, so the hook below reads them from the stub.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUB = ROOT / "src" / "aiorun" / "_aiorun.pyi"

project = "aiorun, in C"
author = "the aiorun-in-C authors"
copyright = "the aiorun-in-C authors"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "aiorun, in C"
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
# Every reference must resolve, except to the standard library and typing
# names of the signatures (there is no network here for intersphinx).
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(asyncio|concurrent|typing|logging|weakref|collections|socket|os)\b.*"),
    ("py:class", r"FileDescriptorLike"),
    ("py:class", r"(Optional|Union|Awaitable|Callable|Coroutine|Generator|Any|List|_T)\b.*"),
    ("py:class", r"(int|float|bool|str|None|BaseException|Executor)"),
    # A typing alias: documented as data below, which a class reference cannot name.
    ("py:class", r"ShutdownCallback"),
]
autodoc_typehints = "signature"


def stub_signatures():
    """name -> (parameters, return annotation) from the stub."""
    found = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = ("(" + ast.unparse(node.args) + ")",
                                ast.unparse(node.returns) if node.returns else None)
    return found


def signature_from_stub(app, what, name, obj, options, signature, return_annotation):
    short = name.rsplit(".", 1)[-1]
    if what == "function" and short in SIGNATURES:
        return SIGNATURES[short]
    return None


SIGNATURES = stub_signatures()


def setup(app):
    app.connect("autodoc-process-signature", signature_from_stub)
