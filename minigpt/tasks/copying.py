"""A toy task whose solution is one attention pattern: copy a random sequence after a separator.

``c a f b | c a f b``: the first half is random, so no model can predict it. From the separator
on, the next token is always the input token exactly ``length`` positions back, and nothing in a
token's own embedding says what it is: a model must *look back* that far. One attention layer
learns it in a few hundred steps, and its attention map shows a stripe ``length`` positions below
the diagonal. Chapter 2 trains on it to see a head do a job.

:class:`CopyTask` is also a batch source for :class:`minigpt.train.Trainer` (targets are -100 up
to the separator: the random half is not learned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minigpt.train import SeededBatches

__all__ = ["CopyTask"]

SYMBOLS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class CopyTask(SeededBatches):
    """Rows of ``length`` random symbols, a separator, and the same symbols again.

    Symbols are ids ``0 .. vocab_size - 2`` (shown as letters), the separator is ``vocab_size - 1``
    (shown as ``|``). A row of inputs has :attr:`block_size` = ``2 * length`` tokens. Its targets
    (the next tokens) are -100 up to the separator; from the separator on, the target of input
    position ``p`` is the input token at ``p - length`` (see :meth:`copy_weight`). Batch ``i`` is
    drawn from a generator seeded with ``(seed, i)``, so a run is reproducible and resumes where
    it stopped.
    """

    length: int = 8
    vocab_size: int = 16
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.length < 1 or self.batch_size < 1:
            raise ValueError(f"length={self.length} and batch_size={self.batch_size} must be at least 1")
        if not 3 <= self.vocab_size <= len(SYMBOLS) + 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be between 3 and {len(SYMBOLS) + 1} "
                             "(symbols plus the separator)")
        self.index = 0

    @property
    def separator(self) -> int:
        """The separator's id: the last of the vocabulary."""
        return self.vocab_size - 1

    @property
    def block_size(self) -> int:
        """Length of a row of inputs: ``length`` symbols, the separator, ``length - 1`` copies
        (the last copy is only a target)."""
        return 2 * self.length

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows as ``(inputs, targets)``, each ``(n, block_size)``; targets -100 up to the
        separator."""
        symbols = torch.randint(0, self.separator, (n, self.length), generator=generator)
        row = torch.cat([symbols, torch.full((n, 1), self.separator), symbols], dim=1)
        inputs, targets = row[:, :-1], row[:, 1:].clone()
        targets[:, : self.length] = -100
        return inputs, targets

    def queries(self) -> torch.Tensor:
        """The input positions that copy, ``length .. 2 * length - 1`` (the separator and the copies
        before the last): the answer of query ``p`` is the input token at ``p - length``."""
        return torch.arange(self.length, 2 * self.length)

    def copy_weight(self, attention: torch.Tensor) -> torch.Tensor:
        """The mean attention weight that the copying queries put on the token they copy.

        ``attention`` is ``(..., T, T)`` (a layer's ``(B, H, T, T)``, or a view's
        ``(n_layer, n_head, T, T)``); the result is ``(...)``: for each query ``p`` of
        :meth:`queries`, the weight on key ``p - length``, averaged over those queries.
        """
        p = self.queries()
        return attention[..., p, p - self.length].mean(-1)

    def labels(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Readable labels: a letter per symbol, ``|`` for the separator."""
        return ["|" if i == self.separator else SYMBOLS[i] for i in torch.as_tensor(ids).tolist()]

