"""Tasks with answers a program can check: the examples, the evaluation of a model on them, and the
rewards of RL on them.

* :mod:`~minigpt.tasks.data` -- arithmetic, questions about a little generated world, string
  tasks and their mixture; labelled text for classification heads; instruction sets from the Hub;
* :mod:`~minigpt.tasks.evaluate` -- a model's greedy answers (chat or few-shot) and exact match;
* :mod:`~minigpt.tasks.rewards` -- reward functions for RL: whether the answer is right, and a
  stand-in labeler's taste.

The package re-exports their public names: ``from minigpt.tasks import arithmetic, exact_match, correct``.
"""

from minigpt.tasks.data import (
    BAD,
    ENTITY_TAGS,
    GOOD,
    HELD_OUT,
    ONLINE,
    PETS,
    SENTIMENTS,
    SPLITS,
    TASKS,
    Labeled,
    OnlineSet,
    Tagged,
    alpaca_conversation,
    arithmetic,
    entity_tags,
    load_chat_data,
    make_task,
    mixture,
    review_questions,
    reviews,
    smoltalk_conversation,
    split_of,
    string_tasks,
    world_qa,
)
from minigpt.tasks.evaluate import answers, exact_match, few_shot_prompt, normalize_answer
from minigpt.tasks.rewards import correct, even_digits

__all__ = [
    "BAD",
    "ENTITY_TAGS",
    "GOOD",
    "HELD_OUT",
    "Labeled",
    "ONLINE",
    "OnlineSet",
    "PETS",
    "SENTIMENTS",
    "SPLITS",
    "TASKS",
    "Tagged",
    "alpaca_conversation",
    "answers",
    "arithmetic",
    "correct",
    "entity_tags",
    "even_digits",
    "exact_match",
    "few_shot_prompt",
    "load_chat_data",
    "make_task",
    "mixture",
    "normalize_answer",
    "review_questions",
    "reviews",
    "smoltalk_conversation",
    "split_of",
    "string_tasks",
    "world_qa",
]
