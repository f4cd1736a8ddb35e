"""PPO for language models (Schulman et al. 2017; Ouyang et al. 2022), with the details that matter.

One iteration: the policy answers a batch of prompts (KV-cached sampling, temperature ``T``); the
frozen reward model scores each whole response at its last real token, minus
``missing_eos_penalty`` if the response never ended its turn; every token pays
``kl_coef * (log pi - log pi_ref)``, the KL to the frozen SFT model, so the policy cannot drift
far to please the reward model. Generalised advantage estimation (GAE, gamma 1, lambda 0.95)
turns these rewards and the critic's values into per-token advantages, whitened per batch; then
``num_ppo_epochs`` passes of ``num_mini_batches`` minibatches update policy and critic with the
clipped objectives. Log-probs are always taken at the sampling temperature, so the first
minibatch's ratio is exactly 1.

The critic is a second network initialised from the reward model (InstructGPT): it already
scores finished answers, and the per-position values start close to the returns it must learn.

Metric names follow TRL's ``PPOTrainer``; the chapter maps the knobs to TRL's as well.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from minigpt.chat import Conversation
from minigpt.model import GPT
from minigpt.rlhf.core import (
    Packed,
    RewardFn,
    Stepper,
    draw,
    finished,
    masked_mean,
    pack,
    prompt_ids,
    response_text,
    sample_responses,
    token_logprobs,
    whiten,
)
from minigpt.rlhf.reward import RewardModel
from minigpt.tokenizer import BPETokenizer

__all__ = ["PPOConfig", "PolicyAndValue", "gae", "ppo", "ppo_losses"]


@dataclass(frozen=True)
class PPOConfig:
    """PPO's knobs, named as in TRL's ``PPOConfig`` where it has them."""

    steps: int = 100  # iterations: rollout, then num_ppo_epochs of updates
    batch_size: int = 64  # prompts per rollout
    num_ppo_epochs: int = 4
    num_mini_batches: int = 4
    learning_rate: float = 3e-5
    kl_coef: float = 0.05
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 0.7
    response_length: int = 8
    missing_eos_penalty: float = 1.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.num_mini_batches < 1:
            raise ValueError(f"num_mini_batches={self.num_mini_batches} must be at least 1")
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of "
                             f"num_mini_batches={self.num_mini_batches}")
        if self.temperature <= 0:
            raise ValueError("PPO samples: temperature must be > 0 (the log-probs are taken at it)")


class PolicyAndValue(torch.nn.Module):
    """Policy and critic as one module, so one optimizer (and one checkpoint) holds both."""

    def __init__(self, policy: GPT, critic: RewardModel) -> None:
        super().__init__()
        self.policy, self.critic = policy, critic


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked positions of each row; returns
    ``(advantages, returns)``, both zero outside ``mask``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` = 0 after a row's last response token (the episode ends there).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.size(1)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               cliprange: float = 0.2, cliprange_value: float = 0.2
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """PPO's clipped policy loss and clipped value loss on one minibatch; returns
    ``(policy_loss, value_loss, stats)``. All tensors are (B, T - 1), read at the True entries of
    ``mask`` (a :class:`~minigpt.rlhf.core.Packed` batch's response targets).

    ``logprobs`` and ``values`` come from the networks being trained (with gradients);
    ``old_logprobs``, ``old_values``, ``advantages`` (whitened) and ``returns`` were stored at the
    rollout. With ``rho = exp(logprobs - old_logprobs)``::

        policy_loss = mean over mask of max(-A * rho, -A * clip(rho, 1 - cliprange, 1 + cliprange))
        V_clip      = old_values + clip(values - old_values, -cliprange_value, cliprange_value)
        value_loss  = 0.5 * mean over mask of max((values - returns)^2, (V_clip - returns)^2)

    (the max of the negated terms is PPO's pessimistic min of the objective). The means run over
    every masked token of the minibatch at once. ``stats`` (floats, no gradient), TRL's metrics:
    ``clipfrac`` (share of tokens whose ratio left ``[1 - cliprange, 1 + cliprange]``),
    ``vf_clipfrac`` (share where the clipped value term is the larger), ``approxkl``
    (``0.5 * mean(log rho ^ 2)``) and ``ratio`` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = masked_mean(pg_losses, mask)
    vclipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses = torch.max((values - returns) ** 2, (vclipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean(((ratio - 1).abs() > cliprange).float(), mask)),
            "vf_clipfrac": float(masked_mean(((values - returns) ** 2 < (vclipped - returns) ** 2).float(), mask)),
            "approxkl": float(0.5 * masked_mean(log_ratio ** 2, mask)),
            "ratio": float(masked_mean(ratio, mask)),
        }
    return pg_loss, vf_loss, stats


@dataclass
class _Rollout:
    batch: Packed
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def ppo(policy: GPT, reference: GPT, reward_model: RewardModel, tokenizer: BPETokenizer,
        prompts: Sequence[Conversation], cfg: PPOConfig, *, true_reward: RewardFn | None = None,
        log_interval: int = 1, seed: int = 0) -> tuple[GPT, list[dict[str, Any]]]:
    """Optimise ``policy`` (in place) against ``reward_model`` with a KL leash to ``reference``;
    returns it and the history (one record per ``log_interval`` iterations, TRL's metric names,
    plus ``objective/true_reward`` when a ``true_reward(conversation, text)`` rule is given)."""
    device = policy.transformer.wte.weight.device
    torch.manual_seed(seed)
    # Dropout off throughout (as TRL does): sampling, the stored log-probs and the update must all
    # see the same network, or the first minibatch's ratio is not 1.
    model = PolicyAndValue(policy, copy.deepcopy(reward_model).requires_grad_(True)).eval()
    reference.eval(), reward_model.eval()  # both used under no_grad only
    stepper = Stepper(model, learning_rate=cfg.learning_rate, max_steps=cfg.steps, grad_clip=cfg.grad_clip)
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    history: list[dict[str, Any]] = []
    for it in range(1, cfg.steps + 1):
        convs = draw(prompts, cfg.batch_size, rng)
        rollout, record = _rollout(model, reference, reward_model, tokenizer, convs, cfg, gen, true_reward)
        record.update(_update(model, stepper, rollout, cfg))
        record["step"] = it
        if it % log_interval == 0 or it == cfg.steps:
            history.append(record)
    return policy, history


@torch.no_grad()
def _rollout(model: PolicyAndValue, reference: GPT, reward_model: RewardModel, tokenizer: BPETokenizer,
             convs: list[Conversation], cfg: PPOConfig, gen: torch.Generator,
             true_reward: RewardFn | None) -> tuple[_Rollout, dict[str, Any]]:
    device = model.policy.transformer.wte.weight.device
    prompts = prompt_ids(convs, tokenizer)
    responses = sample_responses(model.policy, prompts, tokenizer, max_new_tokens=cfg.response_length,
                                 temperature=cfg.temperature, generator=gen)
    batch = pack(prompts, responses, device=device)
    logprobs = token_logprobs(model.policy, batch.ids, cfg.temperature, batch.mask)
    ref_logprobs = token_logprobs(reference, batch.ids, cfg.temperature, batch.mask)
    values = model.critic.values(batch.ids)[:, :-1]
    scores = reward_model.score(batch)
    done = finished(tokenizer, responses).to(device)
    scores = torch.where(done, scores, scores - cfg.missing_eos_penalty)
    kl = (logprobs - ref_logprobs) * batch.mask
    rewards = -cfg.kl_coef * kl
    last_target = batch.last - 1  # the target position of each row's last token
    rows = torch.arange(len(batch), device=device)
    rewards[rows, last_target] += scores
    advantages, returns = gae(rewards, values, batch.mask, gamma=cfg.gamma, lam=cfg.lam)
    advantages = whiten(advantages, batch.mask)
    kl_sum = kl.sum(-1)
    record: dict[str, Any] = {
        "objective/kl": float(kl_sum.mean()),
        "objective/entropy": float(-(logprobs * batch.mask).sum(-1).mean()),  # sampled estimate, nats/response
        "objective/scores": float(scores.mean()),
        "objective/rlhf_reward": float((scores - cfg.kl_coef * kl_sum).mean()),
        "val/num_eos_tokens": float(done.float().sum()),
        "val/response_length": float(batch.mask.sum(-1).float().mean()),
    }
    if true_reward is not None:
        record["objective/true_reward"] = sum(true_reward(c, response_text(tokenizer, r))
                                              for c, r in zip(convs, responses)) / len(convs)
    return _Rollout(batch, logprobs, values, advantages, returns), record


def _update(model: PolicyAndValue, stepper: Stepper, r: _Rollout, cfg: PPOConfig) -> dict[str, float]:
    size = len(r.batch) // cfg.num_mini_batches
    stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clipfrac", "vf_clipfrac", "approxkl", "ratio")}
    for _ in range(cfg.num_ppo_epochs):
        order = torch.randperm(len(r.batch), device=r.batch.ids.device)
        for start in range(0, len(r.batch), size):
            idx = order[start:start + size]
            mb, mask = r.batch.rows(idx), r.batch.mask[idx]
            new_logprobs = token_logprobs(model.policy, mb.ids, cfg.temperature, mask)
            vpred = model.critic.values(mb.ids)[:, :-1]
            pg_loss, vf_loss, mb_stats = ppo_losses(new_logprobs, r.logprobs[idx], r.advantages[idx], vpred,
                                                    r.values[idx], r.returns[idx], mask, cliprange=cfg.cliprange,
                                                    cliprange_value=cfg.cliprange_value)
            stepper.step(pg_loss + cfg.vf_coef * vf_loss)
            stats["pg"].append(float(pg_loss.detach()))
            stats["vf"].append(float(vf_loss.detach()))
            for key in ("clipfrac", "vf_clipfrac", "approxkl", "ratio"):
                stats[key].append(mb_stats[key])

    def avg(key: str) -> float:
        return sum(stats[key]) / len(stats[key])

    return {"loss/policy_avg": avg("pg"), "loss/value_avg": avg("vf"), "policy/clipfrac_avg": avg("clipfrac"),
            "val/clipfrac_avg": avg("vf_clipfrac"), "policy/approxkl_avg": avg("approxkl"),
            "val/ratio": avg("ratio"), "policy/first_ratio": stats["ratio"][0]}
