"""Hand a figure a cell computed to the prose of the rendered book.

A chapter's text quotes its own measurements (a loss, an exact-match rate). Written as literal
digits they are right only on the machine that wrote them; glued, the book's build inserts the
number this execution computed, wherever it ran, with myst-nb's ``{glue:text}`` role::

    glue("sft_em", em)                      # in a code cell, after printing em
    Exact match reaches {glue:text}`sft_em:.3f`.   # in the markdown

Outside a Jupyter Book build (Colab, a bare Jupyter without myst-nb) it does nothing: the cell
prints the number anyway.
"""

from __future__ import annotations

from typing import Any

__all__ = ["glue"]


def glue(name: str, value: Any) -> None:
    """Store ``value`` under ``name`` for the page's ``{glue:text}`name:fmt``` roles, not shown
    in the cell's output; a no-op where myst-nb is not installed."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=False)
