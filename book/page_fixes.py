"""A fix to the pages Jupyter Book 1 writes: each inline script once.

sphinx-togglebutton and sphinx-thebe add inline scripts after the HTML builder has started, and
Sphinx 7 then lists every such script twice on each page. Twice ``var togglebuttonSelector`` is
harmless; twice ``const THEBE_JS_URL`` is a SyntaxError in the console of every page (thebe
itself stays off: it would load from a CDN). tests/test_book.py opens every page and fails on
console errors, so it notices when an upgrade makes this unnecessary or insufficient.
"""

from __future__ import annotations

from typing import Any


def _script_key(js: Any) -> tuple[str, str]:
    attrs = getattr(js, "attributes", {}) or {}
    return str(getattr(js, "filename", js) or ""), repr(sorted((k, str(v)) for k, v in attrs.items()))


def _once_each(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """``html-page-context`` handler: drop repeated entries from the page's script list."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for js in context.get("script_files", []):
        key = _script_key(js)
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app: Any) -> dict[str, Any]:
    """Register the handler with Sphinx, after the extensions that add scripts to the page."""
    app.connect("html-page-context", _once_each, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
