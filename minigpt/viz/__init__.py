"""Interactive views of a GPT that work live in a notebook and in the static book.

* :class:`AttentionView` -- per layer and head, which earlier tokens each token attends to.
* :class:`SamplingExplorer` -- how temperature, top-k, top-p and min-p reshape the next-token
  distribution, and a seeded generation to step through token by token.
* :class:`ChatWidget` -- a text box and a transcript that streams the model's reply (live), or
  the conversation recorded in the notebook (static).
* :func:`plot_attention`, :func:`plot_sampling` -- their matplotlib twins, for print.
* :func:`glue` -- a figure a cell computed, quoted in the rendered page's prose.

Each widget is one JavaScript module fed a JSON payload that Python computes: anywidget runs it
with a kernel, and the widget's ``text/html`` output inlines the same module, so a static page
stays interactive with no kernel and no network (see ``_widget.py``).

``import minigpt`` does not import this package, and this package imports anywidget and
matplotlib only when one of its names is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minigpt.viz._common import token_label
    from minigpt.viz.attention import (
        AttentionView,
        attention_maps,
        decode_attention,
        encode_attention,
        plot_attention,
    )
    from minigpt.viz.chat import ChatWidget
    from minigpt.viz.glue import glue
    from minigpt.viz.sampling import SamplingExplorer, plot_sampling, trace_logits

__all__ = [
    "AttentionView", "attention_maps", "decode_attention", "encode_attention", "plot_attention",
    "SamplingExplorer", "plot_sampling", "trace_logits",
    "ChatWidget",
    "token_label",
    "glue",
]

# Where each public name lives, imported on first use (PEP 562).
_WHERE = {name: "attention" for name in __all__[:5]} | {name: "sampling" for name in __all__[5:8]}
_WHERE["token_label"] = "_common"
_WHERE["ChatWidget"] = "chat"
_WHERE["glue"] = "glue"


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(f"minigpt.viz.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minigpt.viz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
