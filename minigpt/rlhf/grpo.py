"""GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024): RL with no critic.

Each prompt gets a *group* of ``group_size`` sampled answers, scored by a verifiable reward
(here: is the arithmetic right?). An answer's advantage is how much better it did than its
siblings: ``(r - mean) / std`` over the group (GRPO), or ``r`` minus the mean of the *other*
answers (RLOO, an unbiased baseline). A group whose answers all score the same teaches nothing
(advantage 0); ``frac_reward_zero_std`` reports how many there were.

The KL to the reference is a term of the loss, not of the reward, estimated per token with
Schulman's k3, ``pi_ref/pi - log(pi_ref/pi) - 1`` (>= 0, unbiased, low variance). The loss is
averaged over all answer tokens of the batch at once ("token-level" normalisation, as in DAPO;
DeepSeekMath averages each answer's tokens first), so a long answer's tokens weigh no less than a
short one's: :func:`grpo_loss`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from minigpt.chat import Conversation
from minigpt.model import GPT
from minigpt.rlhf.core import (
    RewardFn,
    Stepper,
    draw,
    masked_mean,
    pack,
    prompt_ids,
    response_text,
    sample_responses,
    token_logprobs,
)
from minigpt.tokenizer import BPETokenizer

__all__ = ["GRPOConfig", "group_advantages", "grpo", "grpo_loss", "k3_kl"]


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO's knobs, named as in TRL's ``GRPOConfig`` where it has them."""

    steps: int = 100
    prompts_per_step: int = 16
    num_generations: int = 8  # the group size G
    learning_rate: float = 1e-4
    beta: float = 0.04  # KL coefficient
    epsilon: float = 0.2  # clip range of the ratio
    num_iterations: int = 1  # updates per batch (mu); with 1 the ratio is 1 and the clip never acts
    temperature: float = 1.0
    max_completion_length: int = 8
    advantage: Literal["grpo", "rloo"] = "grpo"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: advantages compare answers within a group")
        if self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"advantage={self.advantage!r} must be 'grpo' or 'rloo'")
        if self.temperature <= 0:
            raise ValueError("GRPO samples its groups: temperature must be > 0 (the log-probs are taken at it)")


def group_advantages(rewards: torch.Tensor, kind: str = "grpo") -> torch.Tensor:
    """Advantages from rewards (prompts, G): GRPO ``(r - mean) / (std + 1e-4)`` or RLOO
    ``r - mean(others)``; zero for a group whose rewards are all equal."""
    mean = rewards.mean(dim=1, keepdim=True)
    if kind == "rloo":
        g = rewards.size(1)
        return (rewards - mean) * g / (g - 1)  # r - (sum - r) / (G - 1)
    return (rewards - mean) / (rewards.std(dim=1, keepdim=True) + 1e-4)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logprobs - logprobs
    return d.exp() - d - 1


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, epsilon: float = 0.2,
              beta: float = 0.04) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss on one batch of answers; returns ``(loss, stats)``.

    ``logprobs`` (B, T - 1) come from the policy being trained (with gradients);
    ``old_logprobs`` from the policy that sampled the answers (``logprobs.detach()`` when the
    batch serves a single update, so the ratio is exactly 1), ``ref_logprobs`` from the frozen
    reference; ``advantages`` holds one value per answer, (B,) or (B, 1), shared by its tokens
    (or one per token, (B, T - 1)). With ``rho = exp(logprobs - old_logprobs)``::

        loss = mean over mask of [-min(rho * A, clip(rho, 1 - epsilon, 1 + epsilon) * A) + beta * k3]

    where ``k3`` is :func:`k3_kl` per token. The mean runs over every answer token of the batch
    at once (token-level, as in DAPO; one of TRL's ``loss_type`` choices), not per answer and then
    over answers as in the DeepSeekMath paper. ``stats`` (floats, no gradient): ``kl`` (mean k3 per token),
    ``kl_per_completion`` (k3 summed over each answer, averaged over answers) and ``clip_ratio``
    (share of tokens whose ratio left ``[1 - epsilon, 1 + epsilon]``).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = (logprobs - old_logprobs).exp()
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = k3_kl(logprobs, ref_logprobs)
    loss = masked_mean(per_token + beta * kl, mask)
    with torch.no_grad():
        stats = {
            "kl": float(masked_mean(kl, mask)),
            "kl_per_completion": float((kl * mask).sum(-1).mean()),
            "clip_ratio": float(masked_mean(((ratio - 1).abs() > epsilon).float(), mask)),
        }
    return loss, stats


def grpo(policy: GPT, reference: GPT, tokenizer: BPETokenizer, prompts: Sequence[Conversation],
         reward: RewardFn, cfg: GRPOConfig, *, log_interval: int = 1,
         seed: int = 0) -> tuple[GPT, list[dict[str, Any]]]:
    """Optimise ``policy`` (in place) on ``reward(conversation, answer_text)``; returns it and the
    history (TRL's metric names: ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``kl``,
    ``completions/mean_length``, ``clip_ratio``)."""
    device = policy.transformer.wte.weight.device
    torch.manual_seed(seed)
    policy.eval()  # dropout off: sampling and the update see the same network
    reference.eval()  # used under no_grad only
    stepper = Stepper(policy, learning_rate=cfg.learning_rate, max_steps=cfg.steps, grad_clip=cfg.grad_clip)
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    g = cfg.num_generations
    history: list[dict[str, Any]] = []
    for step in range(1, cfg.steps + 1):
        convs = draw(prompts, cfg.prompts_per_step, rng)
        prompts_g = [p for p in prompt_ids(convs, tokenizer) for _ in range(g)]
        responses = sample_responses(policy, prompts_g, tokenizer, max_new_tokens=cfg.max_completion_length,
                                     temperature=cfg.temperature, generator=gen)
        rewards = torch.tensor([reward(convs[i // g], response_text(tokenizer, r)) for i, r in enumerate(responses)],
                               dtype=torch.float32, device=device).view(-1, g)
        advantages = group_advantages(rewards, cfg.advantage).view(-1, 1)
        batch = pack(prompts_g, responses, device=device)
        with torch.no_grad():
            ref = token_logprobs(reference, batch.ids, cfg.temperature, batch.mask)
            # With one update per batch the policy has not moved before it: its own log-probs,
            # detached, are the old ones, and a forward pass is saved.
            old = token_logprobs(policy, batch.ids, cfg.temperature, batch.mask) if cfg.num_iterations > 1 else None
        for _ in range(cfg.num_iterations):
            logprobs = token_logprobs(policy, batch.ids, cfg.temperature, batch.mask)
            loss, stats = grpo_loss(logprobs, logprobs.detach() if old is None else old, ref, advantages,
                                    batch.mask, epsilon=cfg.epsilon, beta=cfg.beta)
            stepper.step(loss)
        if step % log_interval == 0 or step == cfg.steps:
            zero_std = rewards.std(dim=1) == 0
            history.append({
                "step": step, "loss": float(loss.detach()), "reward": float(rewards.mean()),
                "reward_std": float(rewards.std(dim=1).mean()), "frac_reward_zero_std": float(zero_std.float().mean()),
                "kl": stats["kl"], "kl_per_completion": stats["kl_per_completion"],
                "completions/mean_length": float(batch.mask.sum(-1).float().mean()),
                "clip_ratio": stats["clip_ratio"],
            })
    return policy, history
