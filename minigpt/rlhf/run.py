"""The RLHF stages as runs: per-profile settings, the starting policy, and what ``minigpt rlhf`` does.

Every stage starts from the same policy: chapter 5's full fine-tuning on arithmetic
(:func:`minigpt.sft.finetuned`) as it was at step :attr:`RLHFSettings.sft_steps`, part way through
its schedule, so it has the chat format and part of the skill (0.58 exact match at ``cpu``), and RL
has room to show an effect.
That run keeps this checkpoint; without it, the run is trained that far (and later continued).

* ``reward``: sample the policy, label pairs with the rule (:func:`minigpt.tasks.even_digits`),
  train the reward model, report held-out pair accuracy, normalise on policy samples;
* ``ppo``: optimise the policy against that reward model (true rule reward and KL reported);
* ``dpo``: pairs of right and wrong answers sampled from the policy, DPO with or without RPO's
  NLL term, exact match and held-out pair accuracy reported;
* ``grpo``: the verifiable reward (:func:`minigpt.tasks.correct`), exact match reported.

Each writes ``checkpoint.safetensors`` (the policy; ``minigpt chat`` talks to it), the chat
tokenizer, ``metrics.jsonl`` and ``summary.json`` with the before/after numbers to ``out_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigpt.chat import Conversation
from minigpt.checkpoint import save_checkpoint
from minigpt.model import GPT
from minigpt.profiles import Profile
from minigpt.rlhf.core import RewardFn, pack, prompt_ids, response_text, sample_responses, sequence_kl
from minigpt.rlhf.dpo import DPOConfig, dpo, implicit_accuracy
from minigpt.rlhf.grpo import GRPOConfig, grpo
from minigpt.rlhf.ppo import PPOConfig, ppo
from minigpt.rlhf.reward import (
    RewardModel,
    correction_pairs,
    load_reward_model,
    pair_accuracy,
    preference_pairs,
    save_reward_model,
    train_reward_model,
)
from minigpt.sft import finetuned_model, sft_settings
from minigpt.tasks import arithmetic, correct, even_digits, exact_match
from minigpt.tokenizer import BPETokenizer

__all__ = ["RLHF_SETTINGS", "RLHFSettings", "Stage", "problems", "run_dpo", "run_grpo", "run_ppo", "run_reward",
           "rlhf_settings", "start_policy"]


@dataclass(frozen=True)
class RLHFSettings:
    """Per-profile knobs of the stages (the model's size comes from the profile)."""

    sft_steps: int  # the starting policy: the full SFT run's checkpoint at this step (one it keeps)
    n_test: int | None  # held-out problems for exact match, KL and pair accuracy (None: all)
    pair_samples: int  # responses per prompt labelled to make a pair
    pair_prompts: int  # prompts turned into pairs (train split)
    reward_steps: int
    reward_learning_rate: float
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    max_new_tokens: int = 6  # answers are a few digits and <|end|>


RLHF_SETTINGS: dict[str, RLHFSettings] = {
    "ci": RLHFSettings(sft_steps=120, n_test=None, pair_samples=4, pair_prompts=400, reward_steps=60,
                       reward_learning_rate=1e-3,
                       ppo=PPOConfig(steps=30, batch_size=64, learning_rate=1e-4, kl_coef=0.05, response_length=6),
                       # 600 steps: at 300, held-out pair accuracy sat at 0.83-0.85 over seeds 0-2 (0.90-0.95 at 600)
                       dpo=DPOConfig(steps=600, batch_size=32, learning_rate=5e-4, rpo_alpha=1.0),
                       grpo=GRPOConfig(steps=100, prompts_per_step=16, learning_rate=1e-4, max_completion_length=6)),
    # From SFT step 1,200 (exact match 0.576) on 2 threads, these sizes gave: reward model 0.997 held-out
    # pair accuracy; PPO true reward 0.437 -> 0.873 at KL 2.55; DPO + NLL pair accuracy 0.933, exact
    # match 0.736; GRPO 0.576 -> 0.760 (150 steps: 0.794; 0.778 and 0.794 at seeds 1 and 2, 1 thread).
    # From step 800 (0.450), GRPO gained 0.10-0.13 whatever the knob (seeds, group 16, 32 prompts,
    # RLOO, temperature 0.5 or 0.7, no KL, 2 updates per batch, 300 steps); from step 1,000 (0.566)
    # +0.106. GRPO can only reinforce right answers the policy samples: pass@8 at temperature 1 was
    # 0.69 at step 800 and 0.83 at step 1,200, and from the later start GRPO came closer to it.
    "cpu": RLHFSettings(sft_steps=1200, n_test=500, pair_samples=4, pair_prompts=2000, reward_steps=200,
                        reward_learning_rate=1e-3,
                        ppo=PPOConfig(steps=40, batch_size=64, learning_rate=1e-4, kl_coef=0.1, response_length=6),
                        dpo=DPOConfig(steps=200, batch_size=32, learning_rate=5e-4, rpo_alpha=1.0),
                        grpo=GRPOConfig(steps=100, prompts_per_step=16, learning_rate=1e-4, max_completion_length=6)),
}
RLHF_SETTINGS["gpu"] = RLHF_SETTINGS["full"] = RLHF_SETTINGS["cpu"]


def rlhf_settings(profile: Profile) -> RLHFSettings:
    if profile.name not in RLHF_SETTINGS:
        raise ValueError(f"no RLHF settings for profile {profile.name!r}; add them to minigpt.rlhf.run.RLHF_SETTINGS")
    return RLHF_SETTINGS[profile.name]


def problems(profile: Profile, split: str, n: int | None = None) -> list[Conversation]:
    """Arithmetic problems of the SFT task's size; the held-out ones are the SFT test split, except
    at ``ci``, whose one-digit task holds out only 17 problems: there every problem is evaluated
    (RL trains on the train split all the same)."""
    max_operand = sft_settings(profile).max_operand
    found = arithmetic(None, split=split, max_operand=max_operand)
    if split == "test" and profile.name == "ci":
        found += arithmetic(None, split="train", max_operand=max_operand)
    return found if n is None or n >= len(found) else random.Random(0).sample(found, n)


def start_policy(profile: Profile) -> tuple[GPT, BPETokenizer]:
    """The policy every stage starts from (see module docstring), trained on first use and cached."""
    steps, keep = rlhf_settings(profile).sft_steps, sft_settings(profile).keep_steps
    if steps not in keep:
        raise ValueError(f"RLHF starts from the full SFT run's checkpoint at step {steps}, but that run keeps "
                         f"only {keep}; add {steps} to minigpt.sft.SFT_SETTINGS[{profile.name!r}].keep_steps")
    return finetuned_model(profile, step=steps)


def _write(out: Path, policy: GPT, tok: BPETokenizer, stage: str, history: list[dict[str, Any]],
           summary: dict[str, Any], profile: Profile) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.safetensors", policy, step=history[-1]["step"], stage=stage)
    tok.save(out / "tokenizer.bpe")
    # The same metadata as an SFT run, so `minigpt chat OUT` and load_sft read an RLHF policy too.
    (out / "sft.json").write_text(json.dumps({"profile": profile.name, "task": "arithmetic", "lora": None,
                                              "stage": stage}, indent=1))
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


@dataclass
class Stage:
    """What a stage returns: the trained model, its history and the before/after numbers."""

    model: Any
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def run_reward(profile: Profile, out_dir: str | os.PathLike) -> Stage:
    """Train the reward model on the rule's preferences between the start policy's own answers."""
    s = rlhf_settings(profile)
    policy, tok = start_policy(profile)
    test = problems(profile, "test", s.n_test)
    pairs = preference_pairs(policy, tok, problems(profile, "train", s.pair_prompts), even_digits,
                             samples=s.pair_samples, max_new_tokens=s.max_new_tokens)
    test_pairs = preference_pairs(policy, tok, test, even_digits,
                                  samples=s.pair_samples, max_new_tokens=s.max_new_tokens, seed=1)
    rm, history = train_reward_model(policy, pairs, steps=s.reward_steps, learning_rate=s.reward_learning_rate)
    accuracy, margin = pair_accuracy(rm, test_pairs)
    prompts = prompt_ids(test, tok)
    responses = sample_responses(policy, prompts, tok, max_new_tokens=s.max_new_tokens,
                                 generator=torch.Generator(device=profile.device).manual_seed(2))
    mean, std = rm.normalize(pack(prompts, responses, device=profile.device))
    summary = {"train_pairs": len(pairs), "test_pairs": len(test_pairs), "pair_accuracy": accuracy,
               "margin": margin, "raw_mean": mean, "raw_std": std}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_reward_model(rm, out / "reward_model.safetensors")
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return Stage(rm, history, summary)


def _start(profile: Profile) -> tuple[GPT, GPT, BPETokenizer, list[Conversation], float]:
    """What every RL stage begins with: the start policy (the frozen reference), a copy to train,
    the tokenizer, the held-out problems and the start policy's exact match on them."""
    reference, tok = start_policy(profile)
    test = problems(profile, "test", rlhf_settings(profile).n_test)
    return reference, copy.deepcopy(reference), tok, test, exact_match(reference, tok, test)


def _after(profile: Profile, policy: GPT, reference: GPT, tok: BPETokenizer,
           test: list[Conversation]) -> dict[str, float]:
    """The trained policy's exact match on ``test`` and its KL to the reference."""
    return {"exact_match": exact_match(policy, tok, test),
            "kl": sequence_kl(policy, reference, prompt_ids(test, tok), tok,
                              max_new_tokens=rlhf_settings(profile).max_new_tokens)}


def mean_reward(policy: GPT, tok: BPETokenizer, problems: list[Conversation], reward: RewardFn, *,
                max_new_tokens: int, temperature: float, samples: int = 1, seed: int = 3) -> float:
    """The mean ``reward`` of ``samples`` sampled answers per problem: the rule a reward model
    stands in for (PPO), or sampled accuracy with :func:`~minigpt.tasks.correct` (GRPO)."""
    prompts = [p for p in prompt_ids(problems, tok) for _ in range(samples)]
    responses = sample_responses(policy, prompts, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                                 generator=torch.Generator(device=policy.transformer.wte.weight.device).manual_seed(seed))
    return sum(reward(problems[i // samples], response_text(tok, r)) for i, r in enumerate(responses)) / len(responses)


def run_ppo(profile: Profile, out_dir: str | os.PathLike, reward_model: RewardModel | str | os.PathLike,
            **overrides: Any) -> Stage:
    """PPO against ``reward_model`` (a model or a ``reward_model.safetensors`` path)."""
    s = rlhf_settings(profile)
    cfg = dataclasses.replace(s.ppo, **overrides)
    if not isinstance(reward_model, RewardModel) and not Path(reward_model).exists():
        raise FileNotFoundError(f"reward model {reward_model} does not exist; train one first with "
                                f"`minigpt rlhf reward --profile {profile.name}` (or pass --reward PATH)")
    rm = reward_model if isinstance(reward_model, RewardModel) else load_reward_model(reward_model)
    rm = rm.to(profile.device)
    reference, policy, tok, test, em_before = _start(profile)
    before = mean_reward(policy, tok, test, even_digits, max_new_tokens=s.max_new_tokens, temperature=cfg.temperature)
    policy, history = ppo(policy, reference, rm, tok, problems(profile, "train"), cfg, true_reward=even_digits)
    summary = {"true_reward_before": before,
               "true_reward_after": mean_reward(policy, tok, test, even_digits, max_new_tokens=s.max_new_tokens,
                                                temperature=cfg.temperature),
               "exact_match_before": em_before, **_after(profile, policy, reference, tok, test)}
    _write(Path(out_dir), policy, tok, "ppo", history, summary, profile)
    return Stage(policy, history, summary)


def run_dpo(profile: Profile, out_dir: str | os.PathLike, **overrides: Any) -> Stage:
    """DPO on pairs of the right answer (chosen) and wrong answers sampled from the start policy."""
    s = rlhf_settings(profile)
    cfg = dataclasses.replace(s.dpo, **overrides)
    reference, policy, tok, test, em_before = _start(profile)
    pairs = correction_pairs(reference, tok, problems(profile, "train", s.pair_prompts),
                             samples=s.pair_samples, max_new_tokens=s.max_new_tokens)
    test_pairs = correction_pairs(reference, tok, test, samples=s.pair_samples, max_new_tokens=s.max_new_tokens,
                                  seed=1)
    policy, history = dpo(policy, reference, pairs, cfg)
    summary = {"train_pairs": len(pairs), "test_pairs": len(test_pairs), "exact_match_before": em_before,
               "pair_accuracy": implicit_accuracy(policy, reference, test_pairs), "rpo_alpha": cfg.rpo_alpha,
               **_after(profile, policy, reference, tok, test)}
    _write(Path(out_dir), policy, tok, "dpo", history, summary, profile)
    return Stage(policy, history, summary)


def run_grpo(profile: Profile, out_dir: str | os.PathLike, **overrides: Any) -> Stage:
    """GRPO (or RLOO: ``advantage="rloo"``) with the verifiable reward: is the answer right?"""
    s = rlhf_settings(profile)
    cfg = dataclasses.replace(s.grpo, **overrides)
    reference, policy, tok, test, em_before = _start(profile)

    def sampled(m: GPT) -> float:  # accuracy of answers sampled at the training temperature, 4 per problem
        return mean_reward(m, tok, test, correct, max_new_tokens=s.max_new_tokens, temperature=cfg.temperature,
                           samples=4)

    sampled_before = sampled(policy)
    policy, history = grpo(policy, reference, tok, problems(profile, "train"), correct, cfg)
    summary = {"exact_match_before": em_before, "sampled_accuracy_before": sampled_before,
               "sampled_accuracy": sampled(policy), **_after(profile, policy, reference, tok, test)}
    _write(Path(out_dir), policy, tok, "grpo", history, summary, profile)
    return Stage(policy, history, summary)

