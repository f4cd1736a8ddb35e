"""Check that every figure a chapter's prose quotes is one the chapter itself computed.

A figure is a decimal number (``5.33``, ``0.896``) or a percentage (``83%``) in a markdown cell.
(A measured whole number, a parameter count say, is glued all the same; the check cannot tell it
from a fact such as GPT-2's 50,257 tokens.)
It passes when it is within rounding of a number the executed chapter printed (a percentage
also as a fraction: 83% matches 0.83), or when it is written in one of the chapter's code cells
(a recipe knob: ``learning_rate=3e-4``, ``p=0.9``). Not checked: math (``$...$``), inline code,
``{glue:text}`` roles (the build inserts this execution's value), citations, links, and a box
that opens with ``{admonition} Measured elsewhere`` (figures from a benchmark or another
machine, with the command that reproduces them).

    python book/quoted.py notebooks/05_sft.ipynb EXECUTED.ipynb

lists the figures of chapter 5's prose that its execution EXECUTED.ipynb did not print
(tests/test_book.py runs this over every chapter of the built book).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

# 0.896 or 1,234.5, or a percentage (83%, 2.5%); not part of a version (2.13.0) or a word
# (1.5B, gpt2.5). Whole numbers are not checked: most are facts or settings (50,257 tokens).
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})*\.\d+|\d+\.\d+)(?![\w]|\.\d)(%?)|(?<![\w.])(\d+)%")
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+\.\d+|-?\d+")
ELSEWHERE = re.compile(r"^(```+|:::+)\{admonition\} Measured elsewhere.*?^\1\s*$", re.M | re.S)
UNCHECKED = [
    re.compile(r"\$\$.*?\$\$", re.S),  # display math
    re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.S),  # amsmath environments
    re.compile(r"(?<!\\)\$[^$\n]+\$"),  # inline math
    re.compile(r"\{[\w:-]+\}`[^`]*`"),  # roles: {glue:text}`x:.2f`, {cite}`key`
    re.compile(r"`[^`\n]+`"),  # inline code
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"https?://\S+"),
]


def prose(cell_source: str) -> str:
    """The checkable text of a markdown cell: without math, code, roles, links or boxes of
    figures measured elsewhere."""
    text = ELSEWHERE.sub("", cell_source)
    for pattern in UNCHECKED:
        text = pattern.sub(" ", text)
    return text


def quoted(notebook: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Each figure of the markdown: (as written, value, half a unit of its last digit)."""
    figures = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for m in FIGURE.finditer(prose("".join(cell["source"]))):
            written = m.group(1) or m.group(3)
            value = float(written.replace(",", ""))
            half = 0.5 * 10.0 ** -len(written.partition(".")[2]) if "." in written else 0.5
            if m.group(2) or m.group(3):
                figures.append((written + "%", value / 100, half / 100))
            else:
                figures.append((written, value, half))
    return figures


def printed(notebook: dict[str, Any]) -> str:
    """Everything the notebook's code cells printed (streams, plain-text and HTML results)."""
    texts = []
    for cell in notebook["cells"]:
        for out in cell.get("outputs", []):
            texts.append("".join(out.get("text", "")))
            data = out.get("data", {})
            texts.append("".join(data.get("text/plain", "")))
            texts.append(re.sub(r"<[^>]+>", " ", "".join(data.get("text/html", ""))))
    return "\n".join(texts)


def unprinted(source: dict[str, Any], executed: dict[str, Any]) -> list[str]:
    """The figures of ``source``'s prose that ``executed`` did not print and no code cell writes."""
    out = printed(executed)
    values = [float(n.replace(",", "")) for n in NUMBER.findall(out)]
    percents = [float(n) / 100 for n in re.findall(r"(-?\d+(?:\.\d+)?)\s*%", out)]
    code = "\n".join("".join(c["source"]) for c in source["cells"] if c["cell_type"] == "code")
    stale = []
    for written, value, half in quoted(source):
        if re.search(rf"(?<![\w.]){re.escape(written.rstrip('%'))}(?![\w]|\.\d)", code):
            continue
        if not any(abs(w - value) <= half + 1e-9 for w in values + percents):
            stale.append(written)
    return stale


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, executed = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    missing = unprinted(source, executed)
    print(f"{len(quoted(source))} figures quoted, {len(missing)} not printed" + (": " + ", ".join(missing) if missing else ""))
    sys.exit(1 if missing else 0)
