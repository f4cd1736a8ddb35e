"""Honesty: when a model should say "I don't know", and how far its own confidence can be trusted.

A model fine-tuned only on questions it can answer learns that every question has an answer:
asked about someone it never heard of, it names a place anyway, fluently (a *hallucination*).
Chapter 12 measures that on closed-book questions (:func:`~minigpt.tasks.data.closed_book_qa`: a
fixed world the model must remember, and made-up people it cannot know) and two remedies:

* **train to refuse**: a share of the training questions ask about strangers, answered
  :data:`~minigpt.tasks.data.UNKNOWN` (:func:`train_honest`); the held-out strangers show whether
  the refusal generalises, and the known facts whether it costs right answers;
* **abstain when unsure**: keep the model as it is and answer only when the probability it gives
  its own answer (:func:`~minigpt.tasks.evaluate.confident_answers`) clears a threshold (:func:`abstain`);
  the reliability diagram (:func:`~minigpt.tasks.evaluate.reliability`) shows how far that probability
  can be trusted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minigpt.chat import Conversation
from minigpt.recipe import Recipe
from minigpt.runs import find_or_make
from minigpt.sft import SFTRun, sft
from minigpt.tasks import (
    UNKNOWN,
    answers,
    closed_book_qa,
    fact_questions,
    normalize_answer,
    stranger_questions,
)

__all__ = ["HonestyRun", "abstain", "honesty_tests", "refusal_rate", "train_honest"]


def honesty_tests(recipe: Recipe) -> tuple[list[Conversation], list[Conversation]]:
    """What every honesty run is measured on: the known world's facts (all 52, the ones it was
    trained to remember) and ``honesty.n_test`` held-out strangers (never seen in training)."""
    return fact_questions(), stranger_questions(recipe.honesty.n_test, split="test", seed=recipe.seed)


def refusal_rate(said: Sequence[str]) -> float:
    """The share of answers that are :data:`~minigpt.tasks.data.UNKNOWN` (after normalisation)."""
    if not said:
        raise ValueError("refusal_rate needs at least one answer")
    return sum(normalize_answer(a) == normalize_answer(UNKNOWN) for a in said) / len(said)


def abstain(confident: Sequence[tuple[str, float]], threshold: float) -> list[str]:
    """Answers from :func:`~minigpt.tasks.evaluate.confident_answers`, each replaced by
    :data:`~minigpt.tasks.data.UNKNOWN` where the model gave it a probability below ``threshold``."""
    return [answer if p >= threshold else UNKNOWN for answer, p in confident]


@dataclass
class HonestyRun:
    """One fine-tuned model and its two figures: exact match on the known facts, and the share of
    held-out strangers it refuses to answer about (1 - the share it makes an answer up for)."""

    share: float  # of the training questions, about strangers
    run: SFTRun
    exact_match: float
    refusal: float


def train_honest(recipe: Recipe, share: float, out_dir: str | os.PathLike, *, progress: bool = False) -> HonestyRun:
    """SFT of the recipe's pretrained model (:func:`~minigpt.runs.find_or_make`) on
    ``honesty.n_train`` closed-book questions, a ``share`` of them about strangers; measured on
    :func:`honesty_tests`. ``out_dir`` holds the run (a run already there is trained again)."""
    h = recipe.honesty
    facts, strangers = honesty_tests(recipe)
    train = closed_book_qa(h.n_train, unanswerable=share, seed=recipe.seed)
    run = sft(recipe, find_or_make(recipe, "pretrain"), Path(out_dir), train=train, test=facts, resume=False,
              progress=progress, batch_size=h.batch_size, max_steps=h.steps, learning_rate=h.learning_rate,
              warmup_steps=h.warmup_steps, eval_interval=0, checkpoint_interval=0, sample_interval=0)
    return HonestyRun(share, run, run.exact_match, refusal_rate(answers(run.model, run.tokenizer, strangers)))
