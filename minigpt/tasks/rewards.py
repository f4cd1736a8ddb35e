"""Reward functions on the tasks for RL: each ``f(conversation, response) -> float``, the shape of
``minigpt.rlhf.core.RewardFn``.

One is verifiable (is the answer right?), one a stand-in for a human labeler's taste; the RLHF
chapter optimises the first directly and learns a reward model of the second.
"""

from __future__ import annotations

from minigpt.chat import Conversation
from minigpt.tasks.evaluate import normalize_answer


def correct(conversation: Conversation, response: str) -> float:
    """1.0 if ``response`` is the conversation's answer (after :func:`~minigpt.tasks.evaluate.normalize_answer`), else 0.0:
    the verifiable reward of RL on arithmetic (GRPO)."""
    return float(normalize_answer(response) == normalize_answer(conversation.answer))


def even_digits(conversation: Conversation, response: str) -> float:
    """A stand-in labeler with a simple, checkable taste: the share of the response's digits that
    are even (0.0 without digits). It ignores the question -- and whether the answer is right --
    which is the point: a reward model learns *this*, and RL against it shows what optimising a
    proxy does (the RLHF chapter)."""
    digits = [c for c in response if c.isdigit()]
    return sum(c in "02468" for c in digits) / len(digits) if digits else 0.0
