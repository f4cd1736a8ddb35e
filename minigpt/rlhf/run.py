"""The RLHF stages as runs: the starting policy, and what ``minigpt rlhf`` does (settings: ``recipe.rlhf``).

Every stage starts from the same policy: chapter 5's full fine-tuning on arithmetic
(``find_or_make(recipe, "sft")``, :mod:`minigpt.runs`) as it was at step ``recipe.rlhf.start_step``, part way through
its schedule, so it has the chat format and part of the skill, and RL has room to show an effect.
That run keeps this checkpoint; without it, the run is trained that far (and later continued).

* ``reward``: sample the policy, label pairs with the rule (:func:`minigpt.tasks.rewards.even_digits`),
  train the reward model, report held-out pair accuracy, normalise on policy samples;
* ``ppo``: optimise the policy against that reward model (true rule reward and KL reported);
* ``dpo``: pairs of right and wrong answers sampled from the policy, DPO with or without RPO's
  NLL term, exact match and held-out pair accuracy reported;
* ``grpo``: the verifiable reward (:func:`minigpt.tasks.rewards.correct`), exact match reported.

Each writes ``checkpoint.safetensors`` (the policy; ``minigpt chat`` talks to it) and the chat
tokenizer, or the reward model, with ``metrics.jsonl``, ``summary.json`` (the before/after
numbers) and ``run.json`` to ``out_dir``: a run folder that :func:`minigpt.runs.load_run` reads.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt.chat import Conversation
from minigpt.checkpoint import save_checkpoint
from minigpt.model import GPT
from minigpt.recipe import Recipe, override
from minigpt.rlhf.core import RewardFn, pack, prompt_ids, response_text, sample_responses, sequence_kl
from minigpt.rlhf.dpo import dpo, implicit_accuracy
from minigpt.rlhf.grpo import grpo
from minigpt.rlhf.ppo import ppo
from minigpt.rlhf.reward import (
    RewardModel,
    correction_pairs,
    load_reward_model,
    pair_accuracy,
    preference_pairs,
    save_reward_model,
    train_reward_model,
)
from minigpt.runs import RUN_FILE, begin_run, find_or_make, finish_run, read_run, run_info, run_lock, trained
from minigpt.tasks import arithmetic, correct, even_digits, exact_match
from minigpt.tokenizer import BPETokenizer

__all__ = ["Stage", "problems", "run_dpo", "run_grpo", "run_ppo", "run_reward", "start_policy"]


def problems(recipe: Recipe, split: str, n: int | None = None) -> list[Conversation]:
    """Arithmetic problems of the SFT task's size; the held-out ones are the SFT test split, or
    every problem with ``rlhf.test_on_all`` (``ci``, whose one-digit task holds out only 17; RL
    trains on the train split all the same)."""
    max_operand = recipe.sft.max_operand
    found = arithmetic(None, split=split, max_operand=max_operand)
    if split == "test" and recipe.rlhf.test_on_all:
        found += arithmetic(None, split="train", max_operand=max_operand)
    return found if n is None or n >= len(found) else random.Random(0).sample(found, n)


def start_policy(recipe: Recipe) -> tuple[GPT, BPETokenizer]:
    """The policy every stage starts from (see module docstring), trained on first use and cached.
    (The recipe checks that ``rlhf.start_step`` is one of ``sft.keep_steps``.)"""
    return trained(recipe, "sft", step=recipe.rlhf.start_step)


def _own_folder(out_dir: str | os.PathLike, stage: str) -> None:
    """Refuse, before any training, a folder that holds a run of another stage: a stage's results
    replace what its folder held (RL stages start over), and that must never be another run."""
    if (Path(out_dir) / RUN_FILE).exists():
        held = read_run(out_dir).stage
        if held != stage:
            raise ValueError(f"{out_dir} holds a {held} run, which the {stage} stage would replace: choose another "
                             f"output folder (the default is runs/rlhf/{stage})")


def _write(out: Path, stage: str, recipe: Recipe, history: list[dict[str, Any]], summary: dict[str, Any],
           save: Callable[[Path], None]) -> None:
    """A stage's run folder: what ``save`` writes (the policy and its tokenizer, or the reward
    model), ``metrics.jsonl``, ``summary.json`` and ``run.json`` (its parent: the SFT run)."""
    info = run_info(recipe, stage, parent=read_run(find_or_make(recipe, "sft")).key, parts=("rlhf",),
                    module="minigpt.rlhf.run")
    with run_lock(out):  # a second stage writing into the same folder is refused
        _own_folder(out, stage)
        begin_run(out, info, resume=False)
        save(out)
        with open(out / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        finish_run(out, info)


def _policy(policy: GPT, tok: BPETokenizer, step: int) -> Callable[[Path], None]:
    """What :func:`_write` saves of a trained policy: its checkpoint and the chat tokenizer."""
    def save(out: Path) -> None:
        save_checkpoint(out / "checkpoint.safetensors", policy, step=step)
        tok.save(out / "tokenizer.bpe")
    return save


@dataclass
class Stage:
    """What a stage returns: the trained model, its history and the before/after numbers."""

    model: Any
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def run_reward(recipe: Recipe, out_dir: str | os.PathLike) -> Stage:
    """Train the reward model on the rule's preferences between the start policy's own answers."""
    _own_folder(out_dir, "reward")
    s = recipe.rlhf
    policy, tok = start_policy(recipe)
    test = problems(recipe, "test", s.n_test)
    pairs = preference_pairs(policy, tok, problems(recipe, "train", s.pair_prompts), even_digits,
                             samples=s.pair_samples, max_new_tokens=s.max_new_tokens, seed=recipe.seed)
    test_pairs = preference_pairs(policy, tok, test, even_digits,
                                  samples=s.pair_samples, max_new_tokens=s.max_new_tokens, seed=recipe.seed + 1)
    rm, history = train_reward_model(policy, pairs, steps=s.reward.steps, learning_rate=s.reward.learning_rate,
                                     seed=recipe.seed)
    accuracy, margin = pair_accuracy(rm, test_pairs)
    prompts = prompt_ids(test, tok)
    responses = sample_responses(policy, prompts, tok, max_new_tokens=s.max_new_tokens,
                                 generator=torch.Generator(device=recipe.device).manual_seed(recipe.seed + 2))
    mean, std = rm.normalize(pack(prompts, responses, device=recipe.device))
    summary = {"train_pairs": len(pairs), "test_pairs": len(test_pairs), "pair_accuracy": accuracy,
               "margin": margin, "raw_mean": mean, "raw_std": std}
    _write(Path(out_dir), "reward", recipe, history, summary,
           lambda out: save_reward_model(rm, out / "reward_model.safetensors"))
    return Stage(rm, history, summary)


def _start(recipe: Recipe) -> tuple[GPT, GPT, BPETokenizer, list[Conversation], float]:
    """What every RL stage begins with: the start policy (the frozen reference), a copy to train,
    the tokenizer, the held-out problems and the start policy's exact match on them."""
    reference, tok = start_policy(recipe)
    test = problems(recipe, "test", recipe.rlhf.n_test)
    return reference, copy.deepcopy(reference), tok, test, exact_match(reference, tok, test)


def _after(recipe: Recipe, policy: GPT, reference: GPT, tok: BPETokenizer,
           test: list[Conversation]) -> dict[str, float]:
    """The trained policy's exact match on ``test`` and its KL to the reference."""
    return {"exact_match": exact_match(policy, tok, test),
            "kl": sequence_kl(policy, reference, prompt_ids(test, tok), tok,
                              max_new_tokens=recipe.rlhf.max_new_tokens)}


def mean_reward(policy: GPT, tok: BPETokenizer, problems: list[Conversation], reward: RewardFn, *,
                max_new_tokens: int, temperature: float, samples: int = 1, seed: int = 3) -> float:
    """The mean ``reward`` of ``samples`` sampled answers per problem: the rule a reward model
    stands in for (PPO), or sampled accuracy with :func:`~minigpt.tasks.rewards.correct` (GRPO)."""
    prompts = [p for p in prompt_ids(problems, tok) for _ in range(samples)]
    responses = sample_responses(policy, prompts, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                                 generator=torch.Generator(device=policy.transformer.wte.weight.device).manual_seed(seed))
    return sum(reward(problems[i // samples], response_text(tok, r)) for i, r in enumerate(responses)) / len(responses)


def run_ppo(recipe: Recipe, out_dir: str | os.PathLike, reward_model: RewardModel | str | os.PathLike,
            **overrides: Any) -> Stage:
    """PPO against ``reward_model`` (a model or a ``reward_model.safetensors`` path)."""
    _own_folder(out_dir, "ppo")
    recipe = override(recipe, {f"rlhf.ppo.{k}": v for k, v in overrides.items()})
    s, cfg = recipe.rlhf, recipe.rlhf.ppo
    if not isinstance(reward_model, RewardModel) and not Path(reward_model).exists():
        raise FileNotFoundError(f"reward model {reward_model} does not exist; train one first with "
                                f"`minigpt rlhf reward --profile {recipe.name}` (or pass --reward PATH)")
    rm = reward_model if isinstance(reward_model, RewardModel) else load_reward_model(reward_model)
    rm = rm.to(recipe.device)
    reference, policy, tok, test, em_before = _start(recipe)
    before = mean_reward(policy, tok, test, even_digits, max_new_tokens=s.max_new_tokens, temperature=cfg.temperature)
    policy, history = ppo(policy, reference, rm, tok, problems(recipe, "train"), cfg, true_reward=even_digits,
                          seed=recipe.seed)
    summary = {"true_reward_before": before,
               "true_reward_after": mean_reward(policy, tok, test, even_digits, max_new_tokens=s.max_new_tokens,
                                                temperature=cfg.temperature),
               "exact_match_before": em_before, **_after(recipe, policy, reference, tok, test)}
    _write(Path(out_dir), "ppo", recipe, history, summary, _policy(policy, tok, history[-1]["step"]))
    return Stage(policy, history, summary)


def run_dpo(recipe: Recipe, out_dir: str | os.PathLike, **overrides: Any) -> Stage:
    """DPO on pairs of the right answer (chosen) and wrong answers sampled from the start policy."""
    _own_folder(out_dir, "dpo")
    recipe = override(recipe, {f"rlhf.dpo.{k}": v for k, v in overrides.items()})
    s, cfg = recipe.rlhf, recipe.rlhf.dpo
    reference, policy, tok, test, em_before = _start(recipe)
    pairs = correction_pairs(reference, tok, problems(recipe, "train", s.pair_prompts),
                             samples=s.pair_samples, max_new_tokens=s.max_new_tokens, seed=recipe.seed)
    test_pairs = correction_pairs(reference, tok, test, samples=s.pair_samples, max_new_tokens=s.max_new_tokens,
                                  seed=recipe.seed + 1)
    policy, history = dpo(policy, reference, pairs, cfg, seed=recipe.seed)
    summary = {"train_pairs": len(pairs), "test_pairs": len(test_pairs), "exact_match_before": em_before,
               "pair_accuracy": implicit_accuracy(policy, reference, test_pairs), "rpo_alpha": cfg.rpo_alpha,
               **_after(recipe, policy, reference, tok, test)}
    _write(Path(out_dir), "dpo", recipe, history, summary, _policy(policy, tok, history[-1]["step"]))
    return Stage(policy, history, summary)


def run_grpo(recipe: Recipe, out_dir: str | os.PathLike, **overrides: Any) -> Stage:
    """GRPO (or RLOO: ``advantage="rloo"``) with the verifiable reward: is the answer right?"""
    _own_folder(out_dir, "grpo")
    recipe = override(recipe, {f"rlhf.grpo.{k}": v for k, v in overrides.items()})
    s, cfg = recipe.rlhf, recipe.rlhf.grpo
    reference, policy, tok, test, em_before = _start(recipe)

    def sampled(m: GPT) -> float:  # accuracy of answers sampled at the training temperature, 4 per problem
        return mean_reward(m, tok, test, correct, max_new_tokens=s.max_new_tokens, temperature=cfg.temperature,
                           samples=4)

    sampled_before = sampled(policy)
    policy, history = grpo(policy, reference, tok, problems(recipe, "train"), correct, cfg, seed=recipe.seed)
    summary = {"exact_match_before": em_before, "sampled_accuracy_before": sampled_before,
               "sampled_accuracy": sampled(policy), **_after(recipe, policy, reference, tok, test)}
    _write(Path(out_dir), "grpo", recipe, history, summary, _policy(policy, tok, history[-1]["step"]))
    return Stage(policy, history, summary)

