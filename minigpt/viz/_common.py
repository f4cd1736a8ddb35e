"""Helpers shared by the widgets: token labels, prompt checks, compact binary payloads.

Nothing here imports anywidget or matplotlib, so the data side of the widgets (their payloads)
can be used and tested on its own.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from minigpt.model import GPT

# Characters that are invisible or that would break a one-line label, and how to show them.
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\\r"}


class TextTokenizer(Protocol):
    """What the widgets need of a tokenizer: every tokenizer of :mod:`minigpt.tokenizer` has it."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def visible(text: str) -> str:
    """Make whitespace and control characters visible: ``" the"`` -> ``"␣the"``, ``"\\n"`` -> ``"↵"``.

    A label on an axis must show the difference between ``"the"`` and ``" the"``, which are
    different tokens."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def token_label(tokenizer: Any, token_id: int) -> str:
    """A short printable label for one token.

    Byte-level tokenizers (:class:`~minigpt.tokenizer.BPETokenizer`, tiktoken) can have tokens
    that are only part of a UTF-8 character; decoding those alone would print U+FFFD, so they are
    shown as escaped bytes (``\\xe2\\x80``) instead. Other tokenizers decode the single id.
    """
    raw: bytes | None = None
    if hasattr(tokenizer, "token_bytes"):
        raw = tokenizer.token_bytes(int(token_id))
    elif hasattr(tokenizer, "decode_single_token_bytes"):
        raw = tokenizer.decode_single_token_bytes(int(token_id))
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"\\x{b:02x}" for b in raw)
    else:
        text = tokenizer.decode([int(token_id)])
    return visible(text)


def prompt_ids(model: GPT, tokenizer: TextTokenizer | None, prompt: str | Sequence[int]) -> list[int]:
    """Encode ``prompt`` (or take its ids) and check that the model can read it in one pass."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass tokenizer=..., or token ids")
        ids = list(tokenizer.encode(prompt))
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(-1).tolist()
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token (a word, or a newline)")
    block_size = model.config.block_size
    if len(ids) > block_size:
        raise ValueError(f"the prompt has {len(ids)} tokens but the model reads at most "
                         f"block_size={block_size}; shorten it (e.g. keep its last {block_size} tokens)")
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
    return ids


def b64encode(array: np.ndarray) -> str:
    """Little-endian bytes of ``array``, base64: what ``Uint16Array``/``Float32Array`` read back."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def b64decode(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.dtype(dtype))
