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
    # Chapter 4: pretraining
    corpus: str  # a name in minigpt.data.CORPORA
    tokenizer: str  # "bpe" (trained on the corpus to vocab_size) or "gpt2"
    batch_size: int  # sequences per micro-batch per process
    total_batch_tokens: int  # tokens per optimizer step across processes (sets grad_accum)
    max_steps: int
    warmup_steps: int
    learning_rate: float
    eval_interval: int


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci", device="cpu", dtype="float32", compile=False,
        corpus_chars=200_000, vocab_size=512,
        n_layer=2, n_head=2, n_embd=64, block_size=64,
        corpus="shakespeare", tokenizer="bpe", batch_size=8, total_batch_tokens=8 * 64,
        max_steps=100, warmup_steps=10, learning_rate=3e-3, eval_interval=50,
    ),
    "cpu": Profile(
        name="cpu", device="cpu", dtype="float32", compile=False,
        corpus_chars=2_000_000, vocab_size=2048,
        n_layer=4, n_head=4, n_embd=128, block_size=128,
        corpus="shakespeare", tokenizer="bpe", batch_size=16, total_batch_tokens=16 * 128,
        # 2000 steps. At 1000 the whole book built in 23 minutes on 2 cores instead of 27, but the
        # weaker model (held-out 4.87 nats against 4.63) cost the later chapters: sentiment macro F1
        # 0.780 against 0.925 (chapter 8), and LoRA ended 25 points behind full SFT (chapter 5).
        max_steps=2000, warmup_steps=100, learning_rate=2e-3, eval_interval=250,
    ),
    "gpu": Profile(
        name="gpu", device="cuda", dtype="bfloat16", compile=True,
        corpus_chars=20_000_000, vocab_size=8192,
        n_layer=6, n_head=6, n_embd=384, block_size=256,
        corpus="tinystories", tokenizer="bpe", batch_size=64, total_batch_tokens=64 * 256,
        max_steps=5000, warmup_steps=200, learning_rate=1e-3, eval_interval=250,
    ),
    "full": Profile(
        name="full", device="cuda", dtype="bfloat16", compile=True,
        corpus_chars=100_000_000, vocab_size=50304,
        n_layer=12, n_head=12, n_embd=768, block_size=1024,
        # GPT-3 paper's 125M recipe: 0.5M-token batches, 10B tokens, 375M-token warmup.
        corpus="fineweb-edu", tokenizer="gpt2", batch_size=64, total_batch_tokens=524_288,
        max_steps=19073, warmup_steps=715, learning_rate=6e-4, eval_interval=250,
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
