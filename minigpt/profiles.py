"""Named sizes so one notebook runs in seconds in CI and at full scale on GPUs.

Notebooks never branch on scale: they read ``minigpt.profile()`` and use its fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Profile:
    """Every size knob of the book in one place."""

    name: str
    device: str
    dtype: str  # "float32" or "bfloat16" (autocast dtype on CUDA)
    compile: bool  # torch.compile the model where it pays off
    # Chapter 1: tokenization
    corpus_chars: int  # characters of Shakespeare used to train the BPE tokenizer
    vocab_size: int  # BPE vocabulary size (256 byte tokens + merges + specials)
    # Chapters 2-4: the model
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    # Training
    batch_size: int
    max_steps: int
    learning_rate: float


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci", device="cpu", dtype="float32", compile=False,
        corpus_chars=200_000, vocab_size=512,
        n_layer=2, n_head=2, n_embd=64, block_size=64,
        batch_size=8, max_steps=100, learning_rate=3e-3,
    ),
    "cpu": Profile(
        name="cpu", device="cpu", dtype="float32", compile=False,
        corpus_chars=2_000_000, vocab_size=2048,
        n_layer=4, n_head=4, n_embd=128, block_size=128,
        batch_size=12, max_steps=2000, learning_rate=1e-3,
    ),
    "gpu": Profile(
        name="gpu", device="cuda", dtype="bfloat16", compile=True,
        corpus_chars=20_000_000, vocab_size=8192,
        n_layer=6, n_head=6, n_embd=384, block_size=256,
        batch_size=64, max_steps=5000, learning_rate=1e-3,
    ),
    "full": Profile(
        name="full", device="cuda", dtype="bfloat16", compile=True,
        corpus_chars=100_000_000, vocab_size=50304,
        n_layer=12, n_head=12, n_embd=768, block_size=1024,
        batch_size=64, max_steps=19073, learning_rate=6e-4,
    ),
}


def default_profile_name() -> str:
    """``MINIGPT_PROFILE`` if set, else ``ci`` under CI, else ``gpu`` with CUDA, else ``cpu``."""
    name = os.environ.get("MINIGPT_PROFILE", "").strip().lower()
    if name:
        return name
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return "ci"
    return "gpu" if torch.cuda.is_available() else "cpu"


def profile(name: str | None = None, **overrides: object) -> Profile:
    """Return the named profile (default: see :func:`default_profile_name`), with overrides.

    >>> profile("ci", n_layer=3).n_layer
    3
    """
    name = (name or default_profile_name()).lower()
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}; choose one of {', '.join(PROFILES)} "
            "(set MINIGPT_PROFILE or pass the name)"
        )
    base = PROFILES[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Profile)}
    if unknown:
        raise ValueError(f"unknown profile field(s) {sorted(unknown)}; see minigpt.profiles.Profile")
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
