"""Continual learning: fine-tune on a new task, measure what the old one lost, and lose less.

Task A is arithmetic: chapter 5's fine-tuned model (``trained(recipe, "sft")``, :mod:`minigpt.runs`:
trained once per machine and cached). Task B asks of the same kind of input for another rule:
"Which is larger, 37 or 48?" (:func:`minigpt.tasks.data.comparisons`). The two compete for the
same weights, and B builds on what A taught the model about numbers, so it trains fast at every
profile. (A task in words instead, such as chapter 8's sentiment rule, is a poor B here: A's
fine-tuning has worn away the text features it needs, and B then sits for hundreds of steps
at the class frequencies.) :func:`continual` fine-tunes the A model on B in each way of
:data:`METHODS` with :func:`minigpt.sft.sft` and measures held-out exact match on both tasks
after each:

* **sequential**: B alone. Gradient descent on B has no reason to keep what A needed, and the
  shared weights move: *catastrophic forgetting* (McCloskey & Cohen 1989; French 1999).
* **replay**: a fraction of A's training conversations mixed into B's data (:func:`replay_mix`),
  so every batch still pays for forgetting A (rehearsal, Robins 1995; experience replay).
* **EWC**, elastic weight consolidation (Kirkpatrick et al. 2017): B's data alone, every weight
  trains, but the loss adds ``strength / 2 * sum_i F_i (w_i - w*_i)^2``, a spring pulling each
  weight back to A's value ``w*_i``, as stiff as A's answers are sensitive to it: ``F_i`` is the
  diagonal of the Fisher information on A's data (:func:`fisher_diagonal`). No A data is kept,
  only one number per weight.
* **LoRA**: A's weights frozen, only low-rank adapters train for B (:mod:`minigpt.lora`); no
  token rows and no ``train_also`` modules, so nothing of A's model changes, and dropping the
  adapters (:func:`without_adapters`) gives A's model back bit for bit.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from minigpt.chat import Conversation
from minigpt.lora import LoRALinear, TokenRows, trainable_fraction
from minigpt.model import GPT, evaluating
from minigpt.recipe import Recipe
from minigpt.rlhf.run import problems
from minigpt.runs import trained
from minigpt.sft import SFTRun, SFTSource, sft
from minigpt.tasks import arithmetic, comparisons, exact_match
from minigpt.tokenizer import BPETokenizer

__all__ = [
    "ContinualResult",
    "METHODS",
    "continual",
    "ewc_penalty",
    "fisher_diagonal",
    "forgetting_table",
    "replay_mix",
    "TwoTasks",
    "two_tasks",
    "without_adapters",
]

T = TypeVar("T")

#: The ways :func:`continual` learns task B, in the order it runs them.
METHODS = ("sequential", "replay", "ewc", "lora")


def replay_mix(new: Sequence[T], old: Sequence[T], fraction: float, *, seed: int = 0) -> list[T]:
    """All of ``new`` and enough of ``old`` (drawn without replacement while it lasts) that
    ``old`` makes up ``fraction`` of the result, shuffled: SFT's batches then hold about that
    share of replayed examples each."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1): the share of old examples in the mix")
    if not new:
        raise ValueError("replay_mix needs new examples to learn")
    n_old = round(len(new) * fraction / (1.0 - fraction))
    if n_old and not old:
        raise ValueError("no old examples to replay; pass fraction=0 to learn the new task alone")
    rng = random.Random(seed)
    replayed = rng.sample(list(old), n_old) if n_old <= len(old) else rng.choices(list(old), k=n_old)
    mixed = list(new) + replayed
    rng.shuffle(mixed)
    return mixed


@torch.no_grad()
def without_adapters(model: GPT) -> GPT:
    """A plain GPT with ``model``'s own weights and none of its LoRA adapters: what the model was
    before :func:`~minigpt.lora.apply_lora`, provided the adapters were never merged and nothing
    else trained (no token rows; :func:`continual` trains neither)."""
    for name, module in model.named_modules():
        if isinstance(module, TokenRows):
            raise ValueError(f"{name} has trained token rows, which are part of the weights, not an adapter; "
                             "train LoRA with token_rows=() to be able to remove it")
        if isinstance(module, LoRALinear) and module.merged:
            raise ValueError(f"{name} is merged into its base weight; unmerge(model) first")
    plain = GPT(model.config).to(model.transformer.wte.weight.device)
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(state)
    return plain.eval()


def fisher_diagonal(model: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation], *,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """The diagonal of the (empirical) Fisher information of ``model`` on a task, per parameter:
    the mean over ``conversations``, one at a time, of the squared gradient of its answer's
    log-likelihood (the sum over its answer tokens, as SFT's loss mask selects them). A large
    entry marks a weight whose change would cost the task's answers most (to second order)."""
    if not conversations:
        raise ValueError("fisher_diagonal needs at least one conversation of the old task")
    source = SFTSource(conversations, tokenizer, 1, model.config.block_size, seed=seed, too_long="drop")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    device = model.transformer.wte.weight.device
    with evaluating(model):  # no dropout: the gradient of the model that answers
        for _ in range(len(source)):
            x, y = source.next_batch()
            model.zero_grad(set_to_none=True)
            _, loss = model(x.to(device), y.to(device))
            (loss * (y != -100).sum()).backward()  # the mean over answer tokens, back to a sum
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / len(source) for name, f in fisher.items()}


def ewc_penalty(model: GPT, fisher: dict[str, torch.Tensor],
                strength: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """EWC's term for the loss of a new task, ``strength / 2 * sum_i F_i (w_i - w*_i)^2``, as a
    function of the model being trained (its parameters found by name); ``w*`` are ``model``'s
    weights now, copied, and ``F`` the old task's :func:`fisher_diagonal`."""
    if strength < 0:
        raise ValueError(f"strength={strength} must be >= 0 (0: no pull towards the old weights)")
    anchor = {name: p.detach().clone() for name, p in model.named_parameters() if name in fisher}

    def penalty(trained: torch.nn.Module) -> torch.Tensor:
        terms = [(fisher[name] * (p - anchor[name]) ** 2).sum()
                 for name, p in trained.named_parameters() if name in anchor]
        return strength / 2 * torch.stack(terms).sum()

    return penalty


@dataclass
class ContinualResult:
    """One way of learning task B: exact match on A before and after, and on B after."""

    method: str
    a_before: float
    a_after: float
    b_before: float
    b_after: float
    trainable: float  # the fraction of parameters that trained on B
    run: SFTRun

    @property
    def forgetting(self) -> float:
        """How much exact match on A was lost (negative: it improved)."""
        return self.a_before - self.a_after


@dataclass
class TwoTasks:
    """Task A's model and both tasks' data, as ``recipe.continual`` sizes them."""

    model_a: GPT
    tokenizer: BPETokenizer
    a_train: list[Conversation]
    a_test: list[Conversation]
    b_train: list[Conversation]
    b_test: list[Conversation]


def two_tasks(recipe: Recipe) -> TwoTasks:
    """Chapter 5's arithmetic model (trained on first use, then cached) and the data of tasks A and B."""
    s, seed = recipe.continual, recipe.seed
    model_a, tok = trained(recipe, "sft")
    return TwoTasks(model_a, tok, arithmetic(None, split="train", seed=seed, max_operand=recipe.sft.max_operand),
                    problems(recipe, "test", s.n_test_a),
                    comparisons(s.n_train_b, split="train", seed=seed, max_operand=s.max_operand),
                    comparisons(s.n_test_b, split="test", seed=seed, max_operand=s.max_operand))


def continual(recipe: Recipe, out_dir: str | os.PathLike, *, methods: Sequence[str] = METHODS,
              progress: bool = False) -> list[ContinualResult]:
    """Learn task B after task A by each of ``methods`` (:data:`METHODS`) with ``recipe.continual``,
    each from the same A model; runs go to folders of ``out_dir`` named by method."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    s, seed = recipe.continual, recipe.seed
    tasks = two_tasks(recipe)
    model_a, tok, a_train, a_test = tasks.model_a, tasks.tokenizer, tasks.a_train, tasks.a_test
    b_train, b_test = tasks.b_train, tasks.b_test
    a_before, b_before = exact_match(model_a, tok, a_test), exact_match(model_a, tok, b_test)
    results = []
    for method in methods:
        train: list[Any] = replay_mix(b_train, a_train, s.replay, seed=seed) if method == "replay" else b_train
        options: dict[str, Any] = dict(max_steps=s.steps, learning_rate=s.learning_rate)
        if method == "ewc":
            fisher = fisher_diagonal(model_a, tok, a_train[:s.fisher_examples], seed=seed)
            options["penalty"] = ewc_penalty(model_a, fisher, s.ewc_strength)
        if method == "lora":
            options = dict(max_steps=s.lora_steps, learning_rate=s.lora_learning_rate,
                           lora=dict(r=s.lora_rank, alpha=2.0 * s.lora_rank, token_rows=(), train_also=()))
        options["eval_interval"] = max(1, options["max_steps"] // 5)  # five points of B's validation loss
        run = sft(recipe, model_a, Path(out_dir) / method, tokenizer=tok, train=train, test=b_test,
                  too_long="drop", resume=False, progress=progress, batch_size=s.batch_size, checkpoint_interval=0,
                  sample_interval=0, **options)
        run.model.eval()
        results.append(ContinualResult(method, a_before, exact_match(run.model, tok, a_test), b_before,
                                       run.exact_match, trainable_fraction(run.model), run))
    return results


def forgetting_table(results: Sequence[ContinualResult]) -> str:
    """The before/after numbers of :func:`continual` as a text table."""
    lines = [f"{'method':<12} {'trained':>8} {'A before':>9} {'A after':>8} {'forgot':>7} {'B before':>9} {'B after':>8}"]
    lines += [f"{r.method:<12} {r.trainable:>8.1%} {r.a_before:>9.3f} {r.a_after:>8.3f} {r.forgetting:>7.3f} "
              f"{r.b_before:>9.3f} {r.b_after:>8.3f}" for r in results]
    return "\n".join(lines)
