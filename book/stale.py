"""Re-execute a chapter when the package code or the recipe it runs changed, not only when its cells did.

The book's execution cache (jupyter-cache, ``_build/.jupyter_cache``) is keyed on a notebook's
code cells. A chapter whose cells are unchanged would show old outputs after a change to, say,
``minigpt/sft.py``. ``python book/stale.py`` (``make book`` runs it first) computes each
chapter's code digest: the ``minigpt`` modules its cells import and, for a chapter that uses
cached runs (:mod:`minigpt.runs`), every stage's code too; and the recipe the book is built with
(``$MINIGPT_PROFILE``, ``cpu`` for ``make book``), since every chapter reads it and a changed
setting changes what the chapter prints, though no code changed. It drops the cached execution of
each chapter whose digest changed since the last build and touches the notebook (Sphinx reads
again only what changed), and says why. The build then re-executes that chapter, and
:func:`minigpt.runs.find_or_make` retrains the runs whose code changed.

A chapter whose last execution failed has no cached execution, but Sphinx, seeing an unchanged
source, would keep the page the failed run left and report success. Such a chapter is touched
too, so every build executes it until it succeeds.

The digests of the last build are kept in ``_build/.minigpt-chapter-digests.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "_build" / ".jupyter_cache"
DIGESTS = ROOT / "_build" / ".minigpt-chapter-digests.json"


def chapter_digest(notebook: Path) -> tuple[str, list[str]]:
    """The code digest of the package code a chapter runs, and the modules it covers."""
    from minigpt.runs import STAGES, code_digest, imported_modules, module_closure

    cells = json.loads(notebook.read_text())["cells"]
    source = "\n".join(
        "\n".join(line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))
        for c in cells if c["cell_type"] == "code")
    modules = imported_modules(source)
    if "minigpt.runs" in module_closure(modules):  # the chapter may load (or train) any cached stage
        modules |= {module for module, _, _ in STAGES.values()}
    return code_digest(*modules) if modules else ("", [])


def recipe_digest() -> str:
    """A digest of every setting of the recipe the book is built with."""
    from minigpt.recipe import flatten, recipe

    settings = list(flatten(recipe(os.environ.get("MINIGPT_PROFILE", "cpu"))))
    return hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:16]


def main() -> int:
    from jupyter_cache import get_cache

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    old = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    digests = {nb.name: chapter_digest(nb) for nb in notebooks}
    settings = recipe_digest()
    new = {name: f"{digest}:{settings}" for name, (digest, _) in digests.items()}
    stale = [nb for nb in notebooks if nb.name in old and old[nb.name] != new[nb.name]]
    if CACHE.exists():  # an earlier build ran: its cached executions and pages may be out of date
        cache = get_cache(CACHE)
        for nb in notebooks:
            try:
                record = cache.match_cache_file(nb)
            except KeyError:  # never executed at these cells, or its execution failed
                record = None
            if nb in stale:
                if record is not None:
                    cache.remove_cache(record.pk)
                if old[nb.name].split(":")[0] != digests[nb.name][0]:
                    print(f"{nb.name}: the package code it runs changed since the last build "
                          f"({', '.join(digests[nb.name][1][:6])}, ...): it runs again")
                else:
                    print(f"{nb.name}: the recipe changed since the last build (`minigpt recipe` prints it): "
                          "it runs again")
            elif record is None:
                print(f"{nb.name}: no successful execution of it is cached (the last one failed or "
                      "never ran): it runs again")
            else:
                continue
            nb.touch()  # Sphinx reads again only sources newer than its last build
    DIGESTS.parent.mkdir(parents=True, exist_ok=True)
    DIGESTS.write_text(json.dumps(new, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
