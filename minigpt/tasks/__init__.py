"""Tasks with answers a program can check: the examples, the evaluation of a model on them, and the
rewards of RL on them.

* :mod:`~minigpt.tasks.data` -- arithmetic, questions about a little generated world, string
  tasks and their mixture; labelled text for classification heads; instruction sets from the Hub;
* :mod:`~minigpt.tasks.dialogue` -- human-written conversations (chatterbot-corpus), split by
  opening question: not checkable, but what makes the chat model talk;
* :mod:`~minigpt.tasks.evaluate` -- a model's greedy answers (chat or few-shot), exact match and
  pass@k;
* :mod:`~minigpt.tasks.rewards` -- reward functions for RL: whether the answer is right, and a
  stand-in labeler's taste;
* :mod:`~minigpt.tasks.copying` -- a toy task (copy a random sequence after a separator) whose
  solution is one attention pattern: the first attention map with a job (chapter 2).

The package re-exports their public names: ``from minigpt.tasks import arithmetic, exact_match, correct``.
"""

from minigpt.tasks.copying import CopyTask
from minigpt.tasks.data import (
    BAD,
    ENTITY_TAGS,
    GOOD,
    HELD_OUT,
    NAMES,
    ONLINE,
    PETS,
    PLACES,
    SENTIMENTS,
    SPLITS,
    TASKS,
    UNKNOWN,
    Labeled,
    OnlineSet,
    Tagged,
    alpaca_conversation,
    arithmetic,
    closed_book_qa,
    comparisons,
    entity_tags,
    fact_questions,
    known_world,
    load_chat_data,
    make_task,
    mixture,
    reviews,
    smoltalk_conversation,
    split_of,
    stranger_questions,
    string_tasks,
    world_qa,
)
from minigpt.tasks.dialogue import DIALOGUE_LANGUAGES, dialogue_key, dialogues, parse_dialogue
from minigpt.tasks.evaluate import (
    answers,
    confident_answers,
    exact_match,
    few_shot_prompt,
    normalize_answer,
    pass_at_k,
    reliability,
)
from minigpt.tasks.rewards import correct, even_digits

__all__ = [
    "BAD",
    "CopyTask",
    "DIALOGUE_LANGUAGES",
    "ENTITY_TAGS",
    "GOOD",
    "HELD_OUT",
    "Labeled",
    "NAMES",
    "ONLINE",
    "OnlineSet",
    "PETS",
    "PLACES",
    "SENTIMENTS",
    "SPLITS",
    "TASKS",
    "Tagged",
    "UNKNOWN",
    "alpaca_conversation",
    "answers",
    "arithmetic",
    "closed_book_qa",
    "comparisons",
    "confident_answers",
    "correct",
    "dialogue_key",
    "dialogues",
    "entity_tags",
    "even_digits",
    "exact_match",
    "fact_questions",
    "few_shot_prompt",
    "known_world",
    "load_chat_data",
    "make_task",
    "mixture",
    "normalize_answer",
    "parse_dialogue",
    "pass_at_k",
    "reliability",
    "reviews",
    "smoltalk_conversation",
    "split_of",
    "stranger_questions",
    "string_tasks",
    "world_qa",
]
