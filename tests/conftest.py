"""Shared fixtures.

The browser tests use Debian's Chromium driven by Playwright for Python, which cannot download a
browser of its own here (`apt-get install -y chromium`; CI installs it).

The chat, SFT, task and RLHF tests share one small BPE tokenizer, trained once per session
(modules that need another kind, such as a tokenizer of real text or of characters, define
their own ``tok``).
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import minigpt
from minigpt.chat import with_chat_tokens
from minigpt.recipe import Recipe
from minigpt.tokenizer import BPETokenizer, train_bpe

CHROMIUM = os.environ.get("MINIGPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google, which this machine refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for one test module, closed even when a test fails."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                                  "(pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$MINIGPT_SHOTS`` to keep and look at them, else a temporary folder."""
    path = Path(os.environ["MINIGPT_SHOTS"]) if os.environ.get("MINIGPT_SHOTS") else tmp_path_factory.mktemp("shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


#: What the shared tokenizer is trained on: the words of the tests' questions (any other text still
#: encodes, byte by byte).
TOKENIZER_TEXT = "What is 37 + 48? The answer is 85. Alice lives in Oslo. Reverse the word kelamo. "


def perturb_trainable(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Move every trainable parameter (adapters, token rows, prefixes, train_also modules) off its
    start by a little noise, so that a test sees them act; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="session")
def base_tok() -> BPETokenizer:
    """A small BPE tokenizer with ``<|endoftext|>`` and no chat tokens (trained in well under a second)."""
    return train_bpe(TOKENIZER_TEXT * 20, 300, special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="session")
def tok(base_tok: BPETokenizer) -> BPETokenizer:
    """:func:`base_tok` with the chat tokens: what chat, SFT, task and RLHF tests render with."""
    return with_chat_tokens(base_tok)


# -- outcome tests: their own model cache, a seed to vary, and a record of what they measured ----

#: The seed of the recipe the outcome tests run (``MINIGPT_TEST_SEED``; the book's is 1337).
#: ``bench/outcome_spread.py`` runs them over several seeds and thread counts to set their bounds.
TEST_SEED = int(os.environ.get("MINIGPT_TEST_SEED", "1337"))
_CACHE = pytest.StashKey[tuple[Path, bool]]()  # this run's model cache, and whether to remove it at the end


def pytest_configure(config: pytest.Config) -> None:
    """Every test run trains into a cache of its own, never the user's (``~/.cache/minigpt``):
    a temporary folder, removed at the end, or ``MINIGPT_TEST_CACHE`` to keep one between runs.
    Set here, before any test imports minigpt, so subprocesses (the CLI, the book build) inherit it."""
    kept = os.environ.get("MINIGPT_TEST_CACHE")
    path = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="minigpt-test-cache-"))
    path.mkdir(parents=True, exist_ok=True)
    config.stash[_CACHE] = (path, not kept)
    os.environ["MINIGPT_CACHE"] = str(path)
    # The Hugging Face libraries too: their cache in this folder, and never the Hub, so that a chapter's
    # online cells (GPT-2's weights) say in one line what they would do, as on a machine offline.
    os.environ["HF_HOME"] = str(path / "huggingface")
    os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_unconfigure(config: pytest.Config) -> None:
    path, temporary = config.stash.get(_CACHE, (None, False))
    if temporary:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ci() -> Recipe:
    """The ``ci`` recipe at :data:`TEST_SEED`."""
    return minigpt.recipe("ci", seed=TEST_SEED)


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class Outcomes:
    """What an outcome test measured, checked against its bound and, when ``MINIGPT_OUTCOMES``
    names a file, appended to it as one JSON line per check (``MINIGPT_OUTCOMES_RECORD_ONLY=1``
    records without failing, so a spread measurement sees every value).

    The comment ``# spread a .. b (n runs)`` beside a check is what ``bench/outcome_spread.py``
    measured: the lowest and highest value over seeds 1337, 1 and 2 at 1 and 2 threads (n of
    those six runs); each bound sits past the worst of them with a margin."""

    def __init__(self, test: str) -> None:
        self.test = test

    def check(self, name: str, value: float, op: str, bound: float) -> None:
        value = float(value)
        path = os.environ.get("MINIGPT_OUTCOMES")
        if path:
            row = {"test": self.test, "name": name, "value": value, "op": op, "bound": bound, "seed": TEST_SEED,
                   "threads": torch.get_num_threads()}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if os.environ.get("MINIGPT_OUTCOMES_RECORD_ONLY") != "1":
            assert _OPS[op](value, bound), f"{name}: {value:.4g} is not {op} {bound:.4g} (seed {TEST_SEED})"


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Outcomes:
    """Check (and record) a measured outcome: ``outcome.check("exact match", em, ">=", 0.4)``."""
    return Outcomes(request.node.nodeid)
