"""The Colab install path, proven without Colab.

The full check (``make test-colab``, marker ``install``): a fresh virtual env holding what Colab
ships (torch and ipywidgets 7), then the project installed the way the chapters' first cell
installs it, with no extras. Colab's torch and ipywidgets must stay as they were, and a
chapter's code (a model, the widgets' static HTML and their ipywidgets 7 view) must run. It
takes two to three minutes on 2 cores, most of it unpacking torch, and needs the package index
(ipywidgets 7 comes from PyPI), so `make test` leaves it out and runs only the quick check
below, that the requirements admit Colab's versions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TORCH = os.environ.get("MINIGPT_COLAB_TORCH", "torch==2.13.0")
IPYWIDGETS = "ipywidgets==7.*"  # Colab still ships ipywidgets 7

VERSIONS = "import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in ('torch', 'ipywidgets')}))"

# What a chapter does first, at its smallest: a model, a forward pass, both widgets as the book
# shows them (text/html) and as Colab does (an ipywidgets 7 view), and the install cell itself,
# which outside Colab must do nothing.
CHAPTER = r"""
import sys
import minigpt, torch
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.generate import generate
from minigpt.viz import AttentionView, SamplingExplorer

exec(sys.argv[1], {})
P = minigpt.recipe("ci")
tok = CharTokenizer.from_text("to be, or not to be: that is the question")
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
ids = generate(model, torch.tensor([tok.encode("to be")]), max_new_tokens=8, temperature=0.0)
for w in (AttentionView.from_model(model, tok, "to be, or"), SamplingExplorer.from_model(model, tok, "to be")):
    data, _ = w._repr_mimebundle_()
    assert '<script type="module">' in data["text/html"], sorted(data)
    assert "application/vnd.jupyter.widget-view+json" in data, sorted(data)
print("chapter code ran:", P.name, ids.shape[1], "tokens")
"""


# No newer than what Colab has shipped for years: the requirements must admit these.
COLAB = {"torch": "2.6.0", "ipywidgets": "7.7.1"}


def test_requirements_admit_colab_versions() -> None:
    tomllib = pytest.importorskip("tomllib")
    import importlib.metadata as md

    deps = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["dependencies"]]
    for req in deps:
        if req.name in COLAB:
            assert req.specifier.contains(Version(COLAB[req.name])), req
        # A dependency that itself pins torch or ipywidgets (anywidget: ipywidgets>=7.6) must admit them too.
        for sub in map(Requirement, md.requires(req.name) or []):
            if sub.name in COLAB and not sub.marker:
                assert sub.specifier.contains(Version(COLAB[sub.name])), f"{req.name} requires {sub}"


def _run(cmd: list[str], **kwargs: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.install
def test_colab_install_keeps_torch_and_ipywidgets(tmp_path: Path) -> None:
    start = time.perf_counter()
    venv = tmp_path / "colab"
    _run([sys.executable, "-m", "venv", str(venv)])  # no system site packages
    py = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("MINIGPT_PROFILE", None)
    pip = [py, "-m", "pip", "install", "--quiet"]
    _run([*pip, TORCH, IPYWIDGETS], env=env, timeout=900)
    colab = json.loads(_run([py, "-c", VERSIONS], env=env))
    assert colab["ipywidgets"].startswith("7."), colab

    # The project as a clean checkout holds it (what `pip install git+URL` builds), no extras.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "minigpt", src / "minigpt", ignore=shutil.ignore_patterns("__pycache__"))
    _run([*pip, str(src)], env=env, timeout=900)

    assert json.loads(_run([py, "-c", VERSIONS], env=env)) == colab, "installing minigpt changed Colab's packages"
    cell = "".join(_load_cell()["source"])
    out = _run([py, "-c", CHAPTER, cell], env=env, cwd=tmp_path, timeout=300)
    assert "chapter code ran: ci" in out
    print(f"Colab install path: {colab} kept, {time.perf_counter() - start:.0f} s")


def _load_cell() -> dict:
    """The install cell as the first cell of chapter 1 holds it."""
    nb = json.loads((ROOT / "notebooks" / "01_tokenization.ipynb").read_text(encoding="utf-8"))
    return nb["cells"][0]
