"""Log-probabilities of responses: how likely a model finds given tokens after given prompts.

RLHF's losses, a model's confidence in its own answer and HellaSwag's ending scores all ask the
same question, so they share these two functions. :func:`pack` right-pads prompt + response rows
into one batch; with causal attention, padding after a row's last real token cannot change
anything before it, so no attention mask is needed and a padded row scores exactly as it would alone.

Positions are *target* positions: ``logprobs[:, t]`` is log p(ids[t + 1] | ids[:t + 1]). The
response mask marks the targets that are response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.model import GPT

__all__ = ["Packed", "pack", "token_logprobs"]


@dataclass
class Packed:
    """Prompt + response rows, right-padded: ``ids`` (B, T); ``mask`` (B, T - 1) is True at the
    target positions that are response tokens; ``last`` (B,) is the index of each row's last
    real token (where a reward model reads its score)."""

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor

    def __len__(self) -> int:
        return self.ids.size(0)

    def rows(self, index: torch.Tensor | slice) -> Packed:
        """A sub-batch (for minibatches)."""
        return Packed(self.ids[index], self.mask[index], self.last[index])


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int = 0,
         device: torch.device | str = "cpu") -> Packed:
    """Right-pad ``prompt + response`` rows into one :class:`Packed` batch."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack needs as many responses as prompts, at least one; got {len(prompts)} prompts "
                         f"and {len(responses)} responses")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), max(width - 1, 1), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"row {i} has an empty prompt; a response is always written after a prompt")
        ids[i, :len(p) + len(r)] = torch.tensor(rows[i])
        mask[i, len(p) - 1:len(p) + len(r) - 1] = True  # target t predicts ids[t + 1]
    last = torch.tensor([len(r) - 1 for r in rows])
    return Packed(ids.to(device), mask.to(device), last.to(device))


def token_logprobs(model: GPT, ids: torch.Tensor, temperature: float = 1.0,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[:, t + 1] | ids[:, :t + 1]) for every t, (B, T - 1), under ``logits / temperature``:
    the distribution responses were sampled from, so ratios and KL compare like with like.

    With ``mask`` (B, T - 1) (a :class:`Packed` batch's), the output head runs at the masked
    targets only and the rest is 0: every loss here reads response tokens alone, and the head at
    the prompt's positions would be most of its cost. Without it, every target is computed."""
    targets = ids[:, 1:]
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    # The last position predicts nothing here: it is only ever a target (so a row may be one token
    # longer than the model's context).
    logp = F.log_softmax(model.lm_head(model.hidden(ids[:, :-1])[mask]).float() / temperature, dim=-1)
    picked = logp.gather(-1, targets[mask][:, None]).squeeze(-1)
    return torch.zeros(mask.shape, dtype=picked.dtype, device=ids.device).masked_scatter(mask, picked)
