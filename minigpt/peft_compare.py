"""Parameter-efficient fine-tuning compared (chapter 13): six ways to teach chapter 10's task B.

Task A is chapter 5's arithmetic model, task B comparisons ("Which is larger, 37 or 48?"), as in
chapter 10 (:func:`minigpt.continual.two_tasks`). :func:`compare` fine-tunes the A model on B by
each method of :data:`METHODS`, all with :func:`minigpt.sft.sft` on the same batches and schedule,
and measures what the table of the chapter shows: exact match on B, trainable parameters, seconds
per step, the memory training adds (gradients and optimizer state), and exact match on A with the
method still in place: what it forgot.

* ``full``: every weight trains (chapter 10's sequential fine-tuning);
* ``lora``: low-rank updates of every linear layer (:mod:`minigpt.lora`), nothing else;
* ``adapter``, ``ia3``, ``prefix``: :mod:`minigpt.peft`;
* ``prompt``: a learned system message (:func:`minigpt.peft.soft_prompt`) before every
  conversation, B's and, when A is measured, A's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt.chat import Conversation, Message
from minigpt.continual import two_tasks
from minigpt.lora import trainable_fraction
from minigpt.peft import soft_prompt, trainable_parameters
from minigpt.recipe import Recipe
from minigpt.sft import SFTRun, sft
from minigpt.tasks import exact_match

__all__ = ["METHODS", "PEFTResult", "compare", "peft_table", "with_system"]

#: The methods :func:`compare` runs, in order.
METHODS = ("full", "lora", "adapter", "ia3", "prefix", "prompt")

#: The text whose tokens start the soft prompt and the prefix: words the task is about.
INIT_TEXT = "Which is larger? Compare the two numbers and answer with the larger one."


@dataclass
class PEFTResult:
    """One method's run and what it measured."""

    method: str
    trainable: int  # parameters that trained
    fraction: float  # of all the model's parameters
    b_after: float  # held-out exact match on the new task
    a_before: float  # held-out exact match on the old task before fine-tuning
    a_after: float  # the same with the method in place (prompt tuning: its prompt before A's questions)
    step_seconds: float  # mean training time per optimizer step (evaluation left out)
    state_bytes: int  # gradients and optimizer state: the memory training adds to the weights'
    run: SFTRun

    @property
    def forgetting(self) -> float:
        """How much exact match on A was lost (negative: it improved)."""
        return self.a_before - self.a_after


def with_system(conversations: Sequence[Conversation], system: str) -> list[Conversation]:
    """The conversations with ``system`` as their system message (replacing any they had), every
    other turn kept."""
    return [Conversation([Message("system", system), *(m for m in c.messages if m.role != "system")])
            for c in conversations]


def _state_bytes(run: SFTRun) -> int:
    """Bytes of the optimizer's state and of a gradient per trainable parameter, as held after training."""
    optimizer = sum(t.numel() * t.element_size() for state in run.trainer.optimizer.state.values()
                    for t in state.values() if hasattr(t, "numel"))
    grads = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    return optimizer + grads


def compare(recipe: Recipe, out_dir: str | os.PathLike, *, methods: Sequence[str] = METHODS,
            progress: bool = False) -> list[PEFTResult]:
    """Fine-tune task A's model on task B by each of ``methods`` at ``recipe.peft``'s settings;
    runs go to folders of ``out_dir`` named by method."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    s = recipe.peft
    tasks = two_tasks(recipe)
    tok = tasks.tokenizer
    a_before = exact_match(tasks.model_a, tok, tasks.a_test)
    init_ids = tok.encode(INIT_TEXT)
    results = []
    for method in methods:
        base, tokenizer, train, test, a_test = tasks.model_a, tok, tasks.b_train, tasks.b_test, tasks.a_test
        also = list(s.train_also)
        options: dict[str, Any] = dict(learning_rate=s.learning_rate)
        if method == "full":
            options = dict(learning_rate=s.full_learning_rate)
        elif method == "lora":
            options["lora"] = dict(r=s.lora_rank, alpha=s.lora_alpha, token_rows=(), train_also=also)
        elif method == "adapter":
            options["peft"] = dict(method="adapter", bottleneck=s.bottleneck, placement=s.adapter_placement,
                                   scale=s.adapter_scale, train_also=also)
        elif method == "ia3":
            options = dict(learning_rate=s.vector_learning_rate, peft=dict(method="ia3", train_also=also))
        elif method == "prefix":
            options = dict(learning_rate=s.vector_learning_rate,
                           peft=dict(method="prefix", length=s.prefix_length, init_ids=init_ids, train_also=also))
        else:  # prompt tuning: new tokens in the vocabulary, their rows alone train (and train_also)
            base, tokenizer, system, ids = soft_prompt(base, tok, s.prompt_length, INIT_TEXT)
            train, test, a_test = (with_system(c, system) for c in (train, test, a_test))
            options = dict(learning_rate=s.vector_learning_rate, lora=dict(targets=(), token_rows=ids, train_also=also))
        run = sft(recipe, base, Path(out_dir) / method, tokenizer=tokenizer, train=train, test=test,
                  too_long="drop", resume=False, progress=progress, batch_size=s.batch_size, max_steps=s.steps,
                  warmup_steps=s.warmup_steps, checkpoint_interval=0, sample_interval=0,
                  eval_interval=max(1, s.steps // 5), **options)
        model = run.model.eval()
        clock = run.trainer.clock
        results.append(PEFTResult(method, trainable_parameters(model), trainable_fraction(model), run.exact_match,
                                  a_before, exact_match(model, tokenizer, a_test),
                                  clock["train_seconds"] / max(1, run.trainer.step), _state_bytes(run), run))
    return results


def peft_table(results: Sequence[PEFTResult]) -> str:
    """The measurements of :func:`compare` as a text table."""
    lines = [f"{'method':<8} {'trained':>9} {'share':>7} {'B after':>8} {'A after':>8} {'forgot':>7} "
             f"{'ms/step':>8} {'state KiB':>9}"]
    lines += [f"{r.method:<8} {r.trainable:>9,} {r.fraction:>7.2%} {r.b_after:>8.3f} {r.a_after:>8.3f} "
              f"{r.forgetting:>7.3f} {1000 * r.step_seconds:>8.1f} {r.state_bytes / 1024:>9.1f}" for r in results]
    return "\n".join(lines)
