"""The reward model: the policy's trunk with a scalar head, trained on preference pairs.

Human labelers compare two answers to the same prompt; the reward model learns a score ``r``
such that the preferred one scores higher, with the Bradley-Terry likelihood
``p(chosen > rejected) = sigmoid(r_chosen - r_rejected)`` (InstructGPT). The score is read from
the hidden state of the *last real token* of prompt + response -- the only position that has seen
the whole answer (and, with right padding, never a pad).

The head starts with std ``1 / sqrt(d + 1)`` (so initial scores are O(1)); after training, the
scores are normalised to mean 0 and std 1 on responses of the policy that RL will start from, so
a KL coefficient means the same thing whatever scale the reward model happened to learn.

Here the "labeler" is a rule (:func:`minigpt.tasks.rewards.even_digits`), so the learned reward can be
checked against the truth -- and reward hacking, where the two part ways, can be seen.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.chat import Conversation
from minigpt.checkpoint import read_safetensors, write_safetensors
from minigpt.model import GPT, GPTConfig, evaluating
from minigpt.rlhf.core import (
    Packed,
    RewardFn,
    Stepper,
    draw,
    end_token,
    pack,
    prompt_ids,
    response_text,
    sample_responses,
)
from minigpt.tasks import correct
from minigpt.tokenizer import BPETokenizer

__all__ = [
    "Pair",
    "RewardModel",
    "bradley_terry_loss",
    "correction_pairs",
    "load_reward_model",
    "pair_accuracy",
    "preference_pairs",
    "save_reward_model",
    "train_reward_model",
]


@dataclass(frozen=True)
class Pair:
    """Two responses (token ids, ending with ``<|end|>`` when finished) to one prompt, the
    preferred one first."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


class RewardModel(nn.Module):
    """A GPT trunk and a linear head giving one score per sequence (or per position: :meth:`values`,
    which PPO's critic uses)."""

    def __init__(self, body: GPT) -> None:
        super().__init__()
        self.body = copy.deepcopy(body)
        d = body.config.n_embd
        self.head = nn.Linear(d, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(d + 1))
        nn.init.zeros_(self.head.bias)
        # The head's bias and ln_f's bias add the same constant to every score, and Bradley-Terry
        # sees only differences of scores: they would get no gradient, so they are frozen (the
        # normalisation sets the offset). PPO's critic, which must learn an offset, trains them.
        self.head.bias.requires_grad_(False)
        ln_f_bias = getattr(self.body.transformer.ln_f, "bias", None)  # RMSNorm has none at all
        if ln_f_bias is not None:
            ln_f_bias.requires_grad_(False)
        # Normalisation (see module docstring): score = (raw - shift) / scale.
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def values(self, ids: torch.Tensor) -> torch.Tensor:
        """The (normalised) score at every position, (B, T)."""
        return (self.head(self.body.hidden(ids)).squeeze(-1).float() - self.shift) / self.scale

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """One score per row, read at index ``last`` (B,) -- the last real token."""
        h = self.body.hidden(ids)[torch.arange(ids.size(0), device=ids.device), last]
        return (self.head(h).squeeze(-1).float() - self.shift) / self.scale

    def score(self, batch: Packed) -> torch.Tensor:
        return self(batch.ids, batch.last)

    @torch.no_grad()
    def normalize(self, batch: Packed) -> tuple[float, float]:
        """Set the normalisation so the scores of ``batch`` (samples of the starting policy) have
        mean 0 and std 1; returns the raw mean and std."""
        self.shift.zero_(), self.scale.fill_(1.0)
        raw = self.score(batch)
        self.shift.fill_(raw.mean()), self.scale.fill_(raw.std().clamp(min=1e-6))
        return float(self.shift), float(self.scale)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


def _pack_pairs(pairs: Sequence[Pair], device: torch.device | str) -> Packed:
    """Chosen rows first, then rejected rows, in one batch."""
    prompts = [p.prompt for p in pairs] * 2
    return pack(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], device=device)


def _sample_groups(policy: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation], samples: int,
                   max_new_tokens: int, temperature: float, seed: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each conversation's prompt and ``samples`` responses of the policy to it."""
    gen = torch.Generator(device=policy.transformer.wte.weight.device).manual_seed(seed)
    prompts = prompt_ids(conversations, tokenizer)
    responses = sample_responses(policy, [p for p in prompts for _ in range(samples)], tokenizer,
                                 max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
    return prompts, [responses[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def preference_pairs(policy: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation],
                     rule: RewardFn, *, samples: int = 4, max_new_tokens: int = 8, temperature: float = 1.0,
                     seed: int = 0) -> list[Pair]:
    """Label the policy's own answers with ``rule``, as labelers compare model samples: ``samples``
    responses per prompt, and the best- and worst-scored of them become a pair (prompts whose
    samples all tie give none)."""
    prompts, groups = _sample_groups(policy, tokenizer, conversations, samples, max_new_tokens, temperature, seed)
    pairs = []
    for i, (conv, group) in enumerate(zip(conversations, groups)):
        scored = sorted(((rule(conv, response_text(tokenizer, r)), j)
                         for j, r in enumerate(group)), reverse=True)
        (best, b), (worst, w) = scored[0], scored[-1]
        if best > worst:
            pairs.append(Pair(tuple(prompts[i]), tuple(group[b]), tuple(group[w])))
    return pairs


def correction_pairs(policy: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation], *,
                     samples: int = 4, max_new_tokens: int = 8, temperature: float = 1.0, seed: int = 0) -> list[Pair]:
    """Pairs for tasks with known answers: the right answer (chosen) against each distinct wrong
    answer among ``samples`` of the policy's (rejected) -- the mistakes this policy actually makes."""
    prompts, groups = _sample_groups(policy, tokenizer, conversations, samples, max_new_tokens, temperature, seed)
    end = end_token(tokenizer)
    pairs = []
    for i, (conv, group) in enumerate(zip(conversations, groups)):
        right = (*tokenizer.encode(conv.answer), end)
        wrong = {tuple(r) for r in group if not correct(conv, response_text(tokenizer, r))}
        pairs += [Pair(tuple(prompts[i]), right, w) for w in sorted(wrong)]
    return pairs


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs: Sequence[Pair], batch_size: int = 256) -> tuple[float, float]:
    """Held-out pair accuracy (chosen scores higher) and mean margin r_chosen - r_rejected."""
    device = model.head.weight.device
    hits, margin = 0.0, 0.0
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            scores = model.score(_pack_pairs(chunk, device))
            diff = scores[:len(chunk)] - scores[len(chunk):]
            hits += float((diff > 0).sum())
            margin += float(diff.sum())
    return hits / len(pairs), margin / len(pairs)


def train_reward_model(base: GPT | RewardModel, train: Sequence[Pair], *, steps: int, batch_size: int = 32,
                       learning_rate: float = 1e-3, warmup_steps: int = 10, weight_decay: float = 0.0,
                       seed: int = 0, log_interval: int = 10) -> tuple[RewardModel, list[dict[str, Any]]]:
    """Train a reward model from ``base`` (a GPT: the SFT policy) on ``train`` pairs; returns the
    model and its history (``loss``, ``rewards/accuracies``, ``rewards/margins`` per logged step)."""
    if not train:
        raise ValueError("no preference pairs to train on (did every prompt's samples tie under the rule?)")
    torch.manual_seed(seed)
    model = base if isinstance(base, RewardModel) else RewardModel(base)
    model.train()
    device = model.head.weight.device
    stepper = Stepper(model, learning_rate=learning_rate, max_steps=steps, warmup_steps=warmup_steps,
                      weight_decay=weight_decay)
    rng = random.Random(seed)
    history = []
    for step in range(1, steps + 1):
        chunk = draw(train, batch_size, rng)
        scores = model.score(_pack_pairs(chunk, device))
        chosen, rejected = scores[:len(chunk)], scores[len(chunk):]
        loss = bradley_terry_loss(chosen, rejected)
        stepper.step(loss)
        if step % log_interval == 0 or step == steps:
            diff = (chosen - rejected).detach()
            history.append({"step": step, "loss": float(loss.detach()), "rewards/accuracies": float((diff > 0).float().mean()),
                            "rewards/margins": float(diff.mean())})
    model.eval()
    return model, history


def save_reward_model(model: RewardModel, path: str | os.PathLike) -> Path:
    """Write the reward model (trunk, head, normalisation) to one safetensors file, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "body.lm_head.weight"}
    meta = {"format": "minigpt-reward-model", "config": json.dumps(model.body.config.__dict__)}
    return write_safetensors(path, state, meta)


def load_reward_model(path: str | os.PathLike) -> RewardModel:
    """A reward model saved by :func:`save_reward_model`; a damaged or foreign file is refused by name."""
    tensors, meta = read_safetensors(path, "reward model")
    if meta.get("format") != "minigpt-reward-model":
        raise ValueError(f"{path} is not a minigpt reward model (save one with minigpt.rlhf.save_reward_model)")
    model = RewardModel(GPT(GPTConfig(**json.loads(meta["config"]))))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"body.lm_head.weight"}:
        raise ValueError(f"{path} does not match a reward model of its config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.eval()
