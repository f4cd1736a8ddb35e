"""One JavaScript module, two hosts: a live anywidget and a self-contained ``text/html`` page.

The widget's state is a JSON payload (``_data``) plus a few small synced traits (``layer``,
``temperature`` ...). In a notebook with a kernel, anywidget runs the module and syncs the traits
both ways. For a static page (the book, nbviewer, a notebook opened without its kernel) the
mime bundle also carries ``text/html``: the same module inlined as a string, imported from a
``blob:`` URL, and handed a tiny stand-in for anywidget's model (get/set/on/off/save_changes on
a plain object). No CDN, no network: the page stays interactive on its own.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, ClassVar

import anywidget
import ipywidgets
import traitlets

_IPYWIDGETS_MAJOR = int(ipywidgets.__version__.split(".")[0])

# The bootstrap of the static copy. The module source and the state are JSON strings with "<"
# escaped, so neither can close the <script> element early.
_BOOT = """<div class="minigpt-viz" id="{uid}" data-minigpt-widget="{name}"></div>
<script type="module">
const el = document.getElementById("{uid}");
try {{
  const src = {src};
  const state = {state};
  const cache = (globalThis.__minigptViz ??= {{}});
  const mod = await (cache["{name}:{digest}"] ??=
    import(URL.createObjectURL(new Blob([src], {{ type: "text/javascript" }}))));
  // A stand-in for anywidget's model: the state lives in this plain object, and a change made
  // in the page notifies the module's own listeners, like Backbone's "change:name" events.
  const listeners = {{}};
  const model = {{
    get: (key) => state[key],
    set(key, value) {{
      if (state[key] === value) return;
      state[key] = value;
      for (const cb of listeners["change:" + key] || []) cb(model, value);
    }},
    on(names, cb) {{ for (const n of names.split(" ")) (listeners[n] ??= []).push(cb); }},
    off(names, cb) {{
      for (const n of (names || Object.keys(listeners).join(" ")).split(" ")) {{
        listeners[n] = cb ? (listeners[n] || []).filter((f) => f !== cb) : [];
      }}
    }},
    save_changes() {{}},
    send() {{}},
  }};
  await mod.default.render({{ model, el }});
}} catch (err) {{
  el.textContent = "minigpt widget failed to load: " + err;
  throw err;
}}
</script>"""


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element (no "</script>", no "<!--")."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def read_module(name: str) -> str:
    """A widget's ES module shipped next to this file, behind ``prelude.js`` (the helpers both
    widgets share): one self-contained text, so neither host has an import to resolve."""
    here = Path(__file__).parent
    return "\n".join((here / f).read_text(encoding="utf-8") for f in ("prelude.js", name))


class StaticHTMLWidget(anywidget.AnyWidget):
    """An anywidget whose mime bundle also holds a kernel-free ``text/html`` copy of itself.

    Subclasses set ``_esm`` (the module text) and ``_static_traits`` (the synced traits the
    static copy starts from); ``_data`` is the payload both hosts read.
    """

    _data = traitlets.Dict().tag(sync=True)
    _static_traits: ClassVar[tuple[str, ...]] = ()
    _widget_name: ClassVar[str] = "widget"

    def static_state(self) -> dict[str, Any]:
        """What the static copy's model starts with: the payload and the current trait values."""
        state = {name: getattr(self, name) for name in self._static_traits}
        state["_data"] = self._data
        return state

    def to_html(self) -> str:
        """The self-contained HTML fragment: container, inlined module, payload, model shim."""
        src = str(self._esm)
        return _BOOT.format(
            uid=f"minigpt-viz-{uuid.uuid4().hex[:12]}",
            name=self._widget_name,
            digest=hashlib.sha1(src.encode("utf-8")).hexdigest()[:12],
            src=_script_json(src),
            state=_script_json(self.static_state()),
        )

    def save_html(self, path: str | Path, title: str | None = None) -> Path:
        """Write a standalone HTML page with this widget (open it in any browser, offline)."""
        path = Path(path)
        head = f"<title>{title or self._widget_name}</title>"
        path.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'>{head}</head>"
                        f"<body>\n{self.to_html()}\n</body></html>\n", encoding="utf-8")
        return path

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """anywidget's bundle (the live view) plus ``text/html`` (the static copy).

        Front ends pick the richest type they can render: a live kernel shows the widget; a
        static renderer (Jupyter Book with ``nb_mime_priority_overrides``, nbviewer, or
        JupyterLab when the widget model is gone) falls back to the HTML.
        """
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle or {}, {})
        data = {**data, "text/html": self.to_html(), "text/plain": repr(self)}
        return data, metadata

    if _IPYWIDGETS_MAJOR < 8:  # pragma: no cover - ipywidgets 7 (Colab)
        # ipywidgets 7 displays widgets through _ipython_display_, which IPython prefers over
        # _repr_mimebundle_; route it through our bundle so the text/html copy is included.
        def _ipython_display_(self, **kwargs: Any) -> None:
            from IPython.display import display

            data, metadata = self._repr_mimebundle_()
            display(data, metadata=metadata, raw=True)
            handle = getattr(self, "_handle_displayed", None)
            if handle is not None:
                handle(**kwargs)
