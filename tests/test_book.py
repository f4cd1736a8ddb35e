"""The book as readers get it: built with warnings as errors, every link and resource on disk,
every page clean in headless Chromium opened from file:// with no network, and every chapter
notebook ready for Colab.

The build executes every chapter at the `ci` profile (a few minutes on 2 cores), once per run,
into a temporary folder with its own execution cache: the cache is keyed on the notebooks' code,
not on the profile, so it must never mix with the `cpu` cache of `make book`. To check a build
that already exists instead (the `cpu` book after `make book`, say):
    MINIGPT_BOOK_HTML=_build/html pytest tests/test_book.py
A screenshot of every page goes to $MINIGPT_SHOTS (else a pytest temporary folder).
"""

from __future__ import annotations

import html.parser
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 1800  # seconds, for executing every chapter at `ci` and rendering
# The flags of `make book`: warnings are errors, and every cross-reference must resolve.
BUILD_FLAGS = ["-W", "-n", "--keep-going"]


def _load(name: str) -> types.ModuleType:
    """A script of book/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "book" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab = _load("colab")
stale = _load("stale")
quoted = _load("quoted")


def test_a_chapter_runs_again_when_the_package_code_it_runs_changes(tmp_path, monkeypatch, capsys) -> None:
    """A chapter's digest covers what it imports and, if it uses cached runs, every stage's code,
    and the recipe; book/stale.py drops the cached execution of a chapter whose digest changed, and
    makes a chapter whose last execution failed run again."""
    _, tokenization = stale.chapter_digest(ROOT / "notebooks" / "01_tokenization.ipynb")
    _, rlhf = stale.chapter_digest(ROOT / "notebooks" / "06_rlhf.ipynb")
    assert "minigpt.tokenizer" in tokenization and "minigpt.sft" not in tokenization
    assert {"minigpt.sft", "minigpt.pretrain", "minigpt.rlhf.run"} <= set(rlhf)
    removed, failed = [], {"04_pretraining.ipynb"}

    class Cache:
        def match_cache_file(self, path):
            if Path(path).name in failed:
                raise KeyError(path)
            return types.SimpleNamespace(pk=Path(path).name)

        def remove_cache(self, pk):
            removed.append(pk)

    monkeypatch.setattr(stale, "ROOT", tmp_path)  # a copy of the chapters: main() touches the stale ones
    (tmp_path / "notebooks").mkdir()
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        (tmp_path / "notebooks" / nb.name).write_bytes(nb.read_bytes())
    monkeypatch.setattr(stale, "DIGESTS", tmp_path / "digests.json")
    monkeypatch.setattr(stale, "CACHE", tmp_path)  # exists: there is a cache to clean
    monkeypatch.setitem(sys.modules, "jupyter_cache", types.SimpleNamespace(get_cache=lambda path: Cache()))
    assert stale.main() == 0 and removed == []  # the first build: nothing to compare with
    digests = json.loads(stale.DIGESTS.read_text())
    stale.DIGESTS.write_text(json.dumps({**digests, "05_sft.ipynb": "0" * 16}))
    before = (tmp_path / "notebooks" / "05_sft.ipynb").stat().st_mtime_ns
    os.utime(tmp_path / "notebooks" / "05_sft.ipynb", ns=(before - 10**9, before - 10**9))
    assert stale.main() == 0 and removed == ["05_sft.ipynb"]
    assert (tmp_path / "notebooks" / "05_sft.ipynb").stat().st_mtime_ns > before - 10**9  # Sphinx reads it again
    printed = capsys.readouterr().out
    assert "05_sft.ipynb: the package code it runs changed since the last build" in printed
    # a chapter whose execution failed has no cache record: every build runs it again, never
    # keeping the page the failed run left
    assert "04_pretraining.ipynb: no successful execution of it is cached" in printed
    failed.clear()
    stale.main()
    assert "no successful execution" not in capsys.readouterr().out
    # a changed setting re-runs every chapter, though no code changed
    monkeypatch.setattr(stale, "recipe_digest", lambda: "f" * 16)
    removed.clear()
    assert stale.main() == 0 and sorted(removed) == sorted(nb.name for nb in (ROOT / "notebooks").glob("*.ipynb"))
    assert "05_sft.ipynb: the recipe changed since the last build" in capsys.readouterr().out


def toc_docnames() -> list[str]:
    """Every page of _toc.yml, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    names = [toc["root"]]

    def walk(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("chapters", []) + entry.get("sections", []))

    walk(toc.get("parts", []) + toc.get("chapters", []))
    return names


CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# -- What every chapter teaches with ---------------------------------------------------------------

def _cells(path: Path) -> list[dict[str, Any]]:
    return [{**cell, "text": "".join(cell["source"])} for cell in json.loads(path.read_text())["cells"]]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_ends_with_a_summary_and_exercises_solved_in_hidden_cells(path: Path) -> None:
    """A summary, then 3 to 5 exercises, each with its solution in a code cell that the book
    hides behind a toggle (tag hide-cell) and that CI executes with the chapter."""
    cells = _cells(path)
    headings = [(i, line.strip()) for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                for line in c["text"].splitlines() if line.startswith("## ")]
    titles = [title for _, title in headings]
    assert "## Summary" in titles and "## Exercises" in titles, f"{path.name}: headings {titles}"
    assert titles.index("## Summary") < titles.index("## Exercises") == len(titles) - 1, \
        f"{path.name}: the exercises come last, after the summary"
    start = headings[-1][0]
    asked = re.findall(r"^(\d+)\. ", cells[start]["text"], re.M)
    assert 3 <= len(asked) <= 5 and asked == [str(n) for n in range(1, len(asked) + 1)], \
        f"{path.name}: 3 to 5 numbered exercises, found {asked}"
    solutions = [c for c in cells[start:] if c["cell_type"] == "code"]
    for n, cell in enumerate(solutions, 1):
        assert cell["text"].startswith(f"# Solution to exercise {n}"), f"{path.name}: solution {n} starts with its name"
        assert "hide-cell" in cell["metadata"].get("tags", []), f"{path.name}: solution {n} is hidden (tag hide-cell)"
        assert cell["metadata"].get("mystnb", {}).get("code_prompt_show") == f"Solution to exercise {n}", \
            f"{path.name}: solution {n}'s toggle names it (metadata mystnb.code_prompt_show)"
        assert "assert" in cell["text"], f"{path.name}: solution {n} checks its answer with an assert"
    assert len(solutions) == len(asked), f"{path.name}: {len(asked)} exercises, {len(solutions)} solutions"


IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def test_figures_have_alt_text_and_every_drawing_is_used() -> None:
    """Each figure of the prose names what it shows (alt text, for screen readers and for the
    reader whose image did not load) and lies in the repository; no drawing lies unused."""
    used = set()
    pages = [*CHAPTERS, *(ROOT / "book").glob("*.md")]
    for page in pages:
        text = page.read_text() if page.suffix == ".md" else "\n".join(
            c["text"] for c in _cells(page) if c["cell_type"] == "markdown")
        for alt, target in IMAGE.findall(text):
            assert len(alt.split()) >= 5, f"{page.name}: the figure {target} needs alt text that says what it shows"
            assert (page.parent / target).is_file(), f"{page.name}: {target} is not in the repository"
            used.add((page.parent / target).resolve())
    drawings = set((ROOT / "book" / "figures").glob("*.svg"))
    assert drawings, "book/figures holds the book's drawings"
    assert not drawings - used, f"drawings no page shows: {sorted(p.name for p in drawings - used)}"
    for drawing in drawings:  # an <img> SVG runs no script, but a stray link or font would load nothing offline
        svg = re.sub(r'xmlns(:\w+)?="[^"]*"', "", drawing.read_text())
        assert "<script" not in svg and "http" not in svg and "viewBox" in svg, f"{drawing.name}: self-contained, with a viewBox"


# -- Colab -------------------------------------------------------------------------------------

def test_every_chapter_has_the_colab_install_cell() -> None:
    assert len(CHAPTERS) == 15
    assert colab.main(["--check", *map(str, CHAPTERS)]) == 0, "run: python book/colab.py"
    assert {f"notebooks/{path.stem}" for path in CHAPTERS} <= set(toc_docnames())


def test_colab_cell_installs_only_in_colab(monkeypatch: pytest.MonkeyPatch) -> None:
    url, branch = colab.repository()
    source = "".join(colab.install_cell(url, branch)["source"])
    compile(source, "<colab cell>", "exec")  # plain Python, no IPython syntax

    calls: list[tuple[str, str]] = []
    import IPython

    shell = types.SimpleNamespace(run_line_magic=lambda magic, line: calls.append((magic, line)))
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(source, {})
    assert calls == []  # outside Colab: nothing
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(source, {})
    assert calls == [("pip", f"install --quiet 'minigpt @ git+{url}@{branch}'")]


def test_colab_cell_tool_is_idempotent(tmp_path: Path) -> None:
    nb = tmp_path / "nb.ipynb"
    original = CHAPTERS[0].read_text(encoding="utf-8")
    nb.write_text(original, encoding="utf-8")
    old = colab.install_cell("https://github.com/someone/old", "main")
    new = colab.install_cell(*colab.repository())
    assert colab.update(nb, new) is False  # already there: nothing written
    assert nb.read_text(encoding="utf-8") == original
    assert colab.update(nb, old) is True  # a changed URL rewrites the cell, in place
    assert colab.update(nb, old) is False
    assert colab.update(nb, new) is True
    assert nb.read_text(encoding="utf-8") == original  # every other cell byte for byte


def test_colab_links() -> None:
    link = colab.colab_link("https://colab.research.google.com/", "https://github.com/a/b.git", "dev",
                            "notebooks/01_tokenization.ipynb")
    assert link == "https://colab.research.google.com/github/a/b/blob/dev/notebooks/01_tokenization.ipynb"
    assert colab.colab_link("https://colab.research.google.com", "https://example.org/a/b", "main", "x") is None


# -- The build ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built HTML: $MINIGPT_BOOK_HTML, else the book built now at `ci` with `make book`'s flags."""
    if os.environ.get("MINIGPT_BOOK_HTML"):
        return Path(os.environ["MINIGPT_BOOK_HTML"]).resolve()
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    env = {**os.environ, "MINIGPT_PROFILE": "ci"}
    start = time.perf_counter()
    proc = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(out), *BUILD_FLAGS],
                          env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    log = proc.stdout + proc.stderr
    print(f"book built at ci in {time.perf_counter() - start:.0f} s")
    if proc.returncode != 0:
        warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
        # A cell that failed: myst-nb saves its traceback under reports/.
        tracebacks = [f"{p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in (out / "_build" / "html" /
                      "reports").rglob("*.log")]
        pytest.fail("the book does not build cleanly:\n" + "\n".join(warnings[-40:] or log.splitlines()[-60:])
                    + "\n" + "\n".join(tracebacks))
    return out / "_build" / "html"


class _Refs(html.parser.HTMLParser):
    """Every link and resource of one page, and every id it defines."""

    RESOURCE_TAGS = {"script", "img", "iframe", "source", "audio", "video", "embed", "track", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []  # <a href>: may leave the book
        self.resources: list[str] = []  # loaded with the page: must be local
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v for k, v in attrs if v is not None}
        for key in ("id", "name"):
            if key in a:
                self.ids.add(a[key])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "link" and "href" in a:
            self.resources.append(a["href"])
        elif tag in self.RESOURCE_TAGS and "src" in a:
            self.resources.append(a["src"])
        elif tag == "object" and "data" in a:
            self.resources.append(a["data"])


def _parse(path: Path) -> _Refs:
    refs = _Refs()
    refs.feed(path.read_text(encoding="utf-8"))
    return refs


def _is_remote(url: str) -> bool:
    return url.startswith("//") or urlsplit(url).scheme not in ("", "data", "blob")


@pytest.mark.slow
def test_every_page_of_the_toc_is_built(book: Path) -> None:
    for name in toc_docnames():
        assert (book / f"{name}.html").is_file(), name


@pytest.mark.slow
def test_links_and_resources_resolve_on_disk(book: Path) -> None:
    pages = {p: _parse(p) for p in book.rglob("*.html") if "_static" not in p.relative_to(book).parts}
    assert len(pages) >= len(toc_docnames())
    problems = []
    for page, refs in pages.items():
        where = page.relative_to(book)
        problems += [f"{where}: loads {url} from the network" for url in refs.resources if _is_remote(url)]
        for url in refs.links + refs.resources:
            parts = urlsplit(url)
            if _is_remote(url) or parts.scheme in ("data", "blob") or url.startswith(("mailto:", "javascript:")):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{where}: {url} -> no such file")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in pages[target].ids:
                problems.append(f"{where}: {url} -> no such anchor")
    assert problems == []


@pytest.mark.slow
def test_stylesheets_fetch_nothing_remote(book: Path) -> None:
    """Fonts and imports in CSS must come from _static too."""
    remote = re.compile(r"""(?:url\(\s*["']?|@import\s+["'])(?:https?:)?//""", re.IGNORECASE)
    bad = [str(css.relative_to(book)) for css in book.rglob("*.css") if remote.search(css.read_text("utf-8", "replace"))]
    assert bad == []


@pytest.mark.slow
def test_chapters_carry_the_colab_badge_and_launch_button(book: Path) -> None:
    url, branch = colab.repository()
    owner_repo = urlsplit(url).path.strip("/")
    for path in CHAPTERS:
        text = (book / "notebooks" / f"{path.stem}.html").read_text(encoding="utf-8")
        link = f"/github/{owner_repo}/blob/{branch}/notebooks/{path.name}"
        assert text.count(link) >= 2, path.name  # the badge and the launch button
        assert 'class="minigpt-colab-badge"' in text
        assert "google.colab" not in text  # the install cell is hidden in the book


# -- In the browser ----------------------------------------------------------------------------

WAIT_FOR_PAGE = """async () => {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
    const deadline = Date.now() + 20000;
    const pending = () => [...document.querySelectorAll('.minigpt-viz')].filter(el => !el.children.length);
    while (pending().length && Date.now() < deadline) await new Promise(r => setTimeout(r, 50));
    return {
        widgets: document.querySelectorAll('.minigpt-viz').length,
        pending: pending().length,
        failed: [...document.querySelectorAll('.minigpt-viz')].filter(el => /failed to load/.test(el.textContent)).length,
        math: document.querySelectorAll('.math').length,
        typeset: document.querySelectorAll('mjx-container').length,
        mathErrors: document.querySelectorAll('mjx-merror').length,
        images: document.querySelectorAll('article img').length,
        broken: [...document.querySelectorAll('img')].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
        title: (document.querySelector('article h1') || {}).textContent || '',
    };
}"""


def _executed(book: Path, source: Path) -> dict[str, Any]:
    """``source`` with the outputs of its execution in this build, or with none if it has none.

    From the build's jupyter-cache (keyed on the code cells, so a prose edit still matches): a
    rebuild that only re-renders prose rewrites ``jupyter_execute`` without outputs. Then from
    ``jupyter_execute`` (a build without the cache)."""
    cache = book.parent / ".jupyter_cache"
    if cache.is_dir():
        import nbformat
        from jupyter_cache import get_cache

        try:
            return get_cache(cache).merge_match_into_notebook(nbformat.read(source, as_version=4))[1]
        except KeyError:  # this code was not executed in this build
            pass
    done = book.parent / "jupyter_execute" / "notebooks" / source.name
    return json.loads(done.read_text()) if done.exists() else {"cells": []}


@pytest.mark.slow
def test_quoted_figures_are_what_the_chapter_printed(book: Path) -> None:
    """Every decimal or percentage a chapter's prose quotes is one its own execution printed, or
    one its code writes (book/quoted.py says what counts); measured figures are glued into the
    prose from the execution, so this holds at any profile and on any machine."""
    stale, executed = [], 0
    for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
        run = _executed(book, source)
        if not any(cell.get("outputs") for cell in run["cells"]):
            continue
        executed += 1
        if missing := quoted.unprinted(json.loads(source.read_text()), run):
            stale.append(f"{source.name}: {', '.join(missing)}")
    if not executed:
        pytest.skip(f"no chapter of the book at {book} has its execution at hand")
    assert not stale, "figures the prose quotes but its chapter did not print (glue them: minigpt.viz.glue):\n" + \
        "\n".join(stale)


@pytest.mark.slow
def test_every_page_in_chromium(book: Path, browser: Any, shots_dir: Path) -> None:
    base = book.as_uri()
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    summary = {}
    try:
        for name in toc_docnames():
            page = context.new_page()
            errors: list[str] = []
            remote: list[str] = []
            page.on("pageerror", lambda e, errors=errors: errors.append(f"pageerror: {e}"))
            page.on("console", lambda m, errors=errors: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("request", lambda r, remote=remote: remote.append(r.url)
                    if not r.url.startswith((base, "data:", "blob:", "about:")) else None)
            page.route(re.compile(r"^(https?|wss?)://"), lambda route: route.abort())
            page.goto(f"{base}/{name}.html", wait_until="load")
            state = page.evaluate(WAIT_FOR_PAGE)
            page.screenshot(path=str(shots_dir / f"{name.replace('/', '__')}.png"), full_page=True)
            summary[name] = state
            assert remote == [], f"{name} tried to reach the network: {remote}"
            assert errors == [], f"{name}: {errors}"
            assert state["pending"] == state["failed"] == 0, (name, state)
            assert state["broken"] == [], (name, state["broken"])
            assert state["mathErrors"] == 0 and (state["typeset"] > 0) == (state["math"] > 0), (name, state)
            assert state["title"], name
            page.close()
    finally:
        context.close()
    print("\n".join(f"{name}: {s['images']} images, {s['widgets']} widgets, {s['typeset']} formulas"
                    for name, s in summary.items()))
    chapters = {name: s for name, s in summary.items() if name.startswith("notebooks/")}
    assert all(s["images"] > 0 for s in chapters.values()), "every chapter has figures"
    assert sum(s["widgets"] for s in chapters.values()) > 0, "the widgets are on the pages"
