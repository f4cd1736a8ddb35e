"""DPO (Rafailov et al. 2023): preference learning without a reward model or sampling.

With ``z = log pi(y) - log pi_ref(y)`` the *summed* log-prob of a whole answer relative to the
frozen reference, the loss of a pair is ``-log sigmoid(beta * (z_chosen - z_rejected))``: the
Bradley-Terry loss of a reward model whose reward is ``beta * z`` (the "implicit reward"). The
reference log-probs never change, so they are computed once, before training.

The pitfall: the loss only asks the chosen answer to gain on the rejected one. Both can *lose*
probability -- pair accuracy rises while the model stops producing the right answer at all. RPO
(Pang et al. 2024) adds ``rpo_alpha`` times the NLL of the chosen answer (per token), which keeps
it likely; TRL calls the knob ``rpo_alpha`` too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from minigpt.model import GPT, evaluating
from minigpt.rlhf.core import Stepper, pack, token_logprobs
from minigpt.rlhf.reward import Pair

__all__ = ["DPOConfig", "dpo", "dpo_loss", "implicit_accuracy", "sequence_logprobs"]


@dataclass(frozen=True)
class DPOConfig:
    """DPO's knobs, named as in TRL's ``DPOConfig``."""

    steps: int = 200
    batch_size: int = 32  # pairs per step
    learning_rate: float = 1e-4
    beta: float = 0.1
    rpo_alpha: float | None = None  # weight of the chosen answer's NLL; None: plain DPO
    warmup_steps: int = 10
    grad_clip: float = 1.0


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards ``beta * (log pi - log pi_ref)`` of both answers,
    from summed answer log-probs (each (B,))."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def sequence_logprobs(model: GPT, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of the chosen and the rejected answers (each (B,)) in one forward
    pass, and the number of tokens of each chosen answer."""
    device = model.transformer.wte.weight.device
    batch = pack([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], device=device)
    sums = token_logprobs(model, batch.ids, mask=batch.mask).sum(-1)
    n = len(pairs)
    return sums[:n], sums[n:], batch.mask[:n].sum(-1)


@torch.no_grad()
def _summed(model: GPT, pairs: Sequence[Pair], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r, _ = sequence_logprobs(model, pairs[start:start + batch_size])
        chosen.append(c), rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def implicit_accuracy(policy: GPT, reference: GPT, pairs: Sequence[Pair], batch_size: int = 256) -> float:
    """Fraction of ``pairs`` whose chosen answer has the larger implicit reward (held-out pair accuracy)."""
    with evaluating(policy, reference):
        ref_c, ref_r = _summed(reference, pairs, batch_size)
        pol_c, pol_r = _summed(policy, pairs, batch_size)
    return float(((pol_c - ref_c) > (pol_r - ref_r)).float().mean())


def dpo(policy: GPT, reference: GPT, train: Sequence[Pair], cfg: DPOConfig, *,
        log_interval: int = 10, seed: int = 0) -> tuple[GPT, list[dict[str, Any]]]:
    """Optimise ``policy`` (in place) on preference ``train`` pairs; returns it and the history
    (TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``nll_loss``)."""
    if not train:
        raise ValueError("DPO needs at least one preference pair")
    torch.manual_seed(seed)
    reference.eval()  # used under no_grad only
    ref_c, ref_r = _summed(reference, train)
    policy.eval()  # dropout off: the implicit reward compares the same network with its reference
    stepper = Stepper(policy, learning_rate=cfg.learning_rate, max_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                      grad_clip=cfg.grad_clip)
    rng = random.Random(seed)
    history: list[dict[str, Any]] = []
    for step in range(1, cfg.steps + 1):
        idx = [rng.randrange(len(train)) for _ in range(cfg.batch_size)]
        chosen, rejected, n_chosen = sequence_logprobs(policy, [train[i] for i in idx])
        losses, r_c, r_r = dpo_loss(chosen, rejected, ref_c[idx], ref_r[idx], cfg.beta)
        loss = losses.mean()
        nll = -(chosen / n_chosen.clamp(min=1)).mean()
        if cfg.rpo_alpha:
            loss = loss + cfg.rpo_alpha * nll
        stepper.step(loss)
        if step % log_interval == 0 or step == cfg.steps:
            history.append({
                "step": step, "loss": float(loss.detach()), "rewards/chosen": float(r_c.detach().mean()),
                "rewards/rejected": float(r_r.detach().mean()),
                "rewards/accuracies": float((r_c > r_r).float().mean()),
                "rewards/margins": float((r_c - r_r).detach().mean()), "logps/chosen": float(chosen.detach().mean()),
                "logps/rejected": float(rejected.detach().mean()), "nll_loss": float(nll.detach()),
            })
    return policy, history
