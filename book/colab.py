"""Colab for every chapter, from the one repository setting in ``_config.yml``.

``repository.url`` and ``repository.branch`` in ``_config.yml`` say where the notebooks are
published. Two things follow from them, both here so they cannot drift apart:

* a Sphinx extension (``sphinx.local_extensions`` in ``_config.yml``) puts an "Open in Colab"
  badge under each chapter's title. The badge is drawn inline, so the page fetches nothing;
* ``python book/colab.py`` gives every notebook in ``notebooks/`` a first cell, hidden in the book
  (tag ``remove-cell``), that installs minigpt when the notebook runs in Colab and does nothing
  anywhere else. Running it again changes nothing; after the URL changes it rewrites the cell.
  ``--check`` only reports notebooks whose cell is missing or stale (tests/test_book.py runs it).

Notebooks are edited as JSON with the layout Jupyter writes (one-space indent, UTF-8, a final
newline), so every other cell stays byte for byte as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
CELL_ID = "colab-install"
CELL_TAG = "remove-cell"


def repository(config: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """The repository URL and branch that ``_config.yml`` names."""
    import yaml  # jupyter-book's own dependency; only this tool and the build need it

    repo = yaml.safe_load(config.read_text(encoding="utf-8"))["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def install_cell(url: str, branch: str) -> dict[str, Any]:
    """The notebook cell that installs minigpt in Colab, from the repository at ``branch``.

    ``run_line_magic`` rather than ``%pip`` keeps the cell plain Python, valid in any kernel.
    """
    spec = f"minigpt @ git+{url}@{branch}"
    source = (
        "# In Google Colab: install minigpt (Colab's own torch and ipywidgets stay as they are).\n"
        "# Anywhere else this cell does nothing.\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        "    from IPython import get_ipython\n"
        "\n"
        f"    get_ipython().run_line_magic(\"pip\", {json.dumps('install --quiet ' + repr(spec))})"
    )
    return {"cell_type": "code", "execution_count": None, "id": CELL_ID,
            "metadata": {"tags": [CELL_TAG]}, "outputs": [], "source": source.splitlines(keepends=True)}


def with_install_cell(nb: dict[str, Any], cell: dict[str, Any]) -> bool:
    """Put ``cell`` first in ``nb`` (replacing an older copy in place); True if ``nb`` changed."""
    cells = nb["cells"]
    old = next((i for i, c in enumerate(cells) if c.get("id") == CELL_ID), None)
    if old is None:
        cells.insert(0, cell)
        return True
    if cells[old] == cell and old == 0:
        return False
    del cells[old]
    cells.insert(0, cell)
    return True


def update(path: Path, cell: dict[str, Any], *, write: bool = True) -> bool:
    """Give the notebook at ``path`` the install cell; True if it lacked it or had a stale one."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    if _dump(nb) != text:  # writing would reformat the other cells too
        raise ValueError(f"{path} is not in Jupyter's own layout; open and save it in Jupyter first")
    changed = with_install_cell(nb, cell)
    if changed and write:
        path.write_text(_dump(nb), encoding="utf-8")
    return changed


def _dump(nb: dict[str, Any]) -> str:
    """A notebook as Jupyter writes it."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def colab_link(colab_url: str, repository_url: str, branch: str, path: str) -> str | None:
    """Colab's address for a notebook of a GitHub repository (None for other hosts)."""
    parts = urlparse(repository_url)
    owner_repo = parts.path.strip("/").removesuffix(".git")
    if parts.netloc != "github.com" or owner_repo.count("/") != 1:
        return None
    return f"{colab_url.rstrip('/')}/github/{owner_repo}/blob/{branch}/{path}"


BADGE = (
    '<p class="minigpt-colab-badge"><a href="{href}" title="Open this chapter in Google Colab">'
    '<svg width="117" height="20" role="img" aria-label="Open in Colab">'
    '<rect width="117" height="20" rx="3" fill="#555"/>'
    '<rect x="60" width="57" height="20" rx="3" fill="#f9ab00"/><rect x="60" width="6" height="20" fill="#f9ab00"/>'
    '<g font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" text-anchor="middle">'
    '<text x="30" y="14" fill="#fff">Open in</text><text x="88" y="14" fill="#1a1a1a">Colab</text></g>'
    "</svg></a></p>"
)


def _add_badge(app: Any, doctree: Any, docname: str) -> None:
    """Sphinx ``doctree-resolved`` handler: the badge after the title of each notebook page.

    At write time rather than read time, so a changed URL reaches every page on the next build.
    """
    from docutils import nodes

    if app.builder.format != "html" or not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    opts = app.config.html_theme_options
    colab_url = opts.get("launch_buttons", {}).get("colab_url", "")
    prefix = opts.get("path_to_docs", "").strip("/")
    path = f"{prefix}/{docname}.ipynb" if prefix else f"{docname}.ipynb"
    href = colab_url and colab_link(colab_url, opts.get("repository_url", ""),
                                    opts.get("repository_branch", "main"), path)
    if not href:
        from sphinx.util import logging

        logging.getLogger(__name__).warning("no Colab badge for %s: launch_buttons.colab_url and a "
                                            "github.com repository.url are needed in _config.yml", docname)
        return
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None or not isinstance(section[0], nodes.title):
        return
    section.insert(1, nodes.raw("", BADGE.format(href=href), format="html"))


def setup(app: Any) -> dict[str, Any]:
    """Register the badge with Sphinx."""
    app.connect("doctree-resolved", _add_badge)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: list[str] | None = None) -> int:
    """Add or refresh the install cell of every chapter notebook; with ``--check``, only report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook needs the cell")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        default=sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    args = parser.parse_args(argv)
    cell = install_cell(*repository())
    stale = [p for p in args.notebooks if update(p, cell, write=not args.check)]
    for p in stale:
        print(f"{'needs' if args.check else 'updated'} the Colab install cell: {p}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
