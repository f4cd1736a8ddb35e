"""Human-written dialogue, offline: the conversations of PyPI's ``chatterbot-corpus`` as chat data.

The corpus (BSD-3) holds about 2,000 short English conversations over 21 topics (greetings, AI,
food, history, science, tech support, ...) and a few hundred in Chinese, in YAML files inside
its wheel (:func:`minigpt.data.chatterbot_files`). Each entry is a list of utterances where
each answers the one before; we read them as alternating user and assistant turns, keep the
multi-turn ones multi-turn, and drop a last user turn that nobody answers.

**The split is by opening question, not by conversation.** The English set repeats its questions:
"Hi, How is it going?" opens six conversations with six different answers, and about 750 distinct
openings serve 2,000 conversations. A random split by conversation would put the same question
(and often the same answer) on both sides, and "held-out" loss would measure memory. So the
opening question, normalised, is the key that :func:`~minigpt.tasks.data.split_of` hashes: every
held-out conversation opens with a question the model never saw in training.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import yaml

from minigpt.chat import Conversation, Message
from minigpt.data import chatterbot_files
from minigpt.tasks.data import _check_split, split_of

__all__ = ["DIALOGUE_LANGUAGES", "dialogue_key", "dialogues", "parse_dialogue"]

#: The languages the book uses (the wheel has two dozen more; any of them loads).
DIALOGUE_LANGUAGES = ("english", "chinese")


def dialogue_key(question: str) -> str:
    """The split key of a conversation: its opening question, lower-cased, with runs of spaces and
    the final punctuation dropped ("Hi, how is it going?" and "hi, How is it going" are one key)."""
    return re.sub(r"\s+", " ", question).strip().lower().rstrip("?!.。？！ ")


def _turns(entry: Any) -> list[str] | None:
    """An entry's utterances, cut to an even number (the last one answers), or None if malformed."""
    if not isinstance(entry, list) or not all(isinstance(m, str) and m.strip() for m in entry):
        return None
    turns = [m.strip() for m in entry]
    turns = turns[:len(turns) // 2 * 2]
    return turns or None


def parse_dialogue(text: str, *, source: str = "<text>") -> tuple[list[Conversation], int]:
    """The conversations of one chatterbot YAML file and how many entries were malformed (not a
    list of at least two non-empty strings). Read with PyYAML's ``BaseLoader``, which builds
    plain strings, lists and dicts and nothing else: safe, and a reply of "Yes" or "2" stays the
    text it is (the default loader would turn them into ``True`` and ``2``)."""
    try:
        data = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML ({err})") from None
    entries = data.get("conversations", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source} has no list of conversations under the key 'conversations'")
    out, bad = [], 0
    for entry in entries:
        turns = _turns(entry)
        if turns is None:
            bad += 1
            continue
        out.append(Conversation(Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)))
    return out, bad


def dialogues(split: str = "train", *, language: str = "english") -> list[Conversation]:
    """The chatterbot conversations of ``language`` in ``split`` (about 10% of the opening questions
    are held out in ``"test"``; see the module docstring), by topic, without exact duplicates.
    Malformed entries are skipped with one warning that counts them."""
    _check_split(split)
    seen: set[tuple[Message, ...]] = set()
    out, bad = [], 0
    for topic, text in chatterbot_files(language).items():
        found, skipped = parse_dialogue(text, source=f"chatterbot-corpus {language}/{topic}.yml")
        bad += skipped
        for conv in found:
            if conv.messages not in seen and split_of(dialogue_key(conv.messages[0].content)) == split:
                seen.add(conv.messages)
                out.append(conv)
    if bad:
        warnings.warn(f"chatterbot-corpus ({language}): skipped {bad} malformed conversation(s) "
                      "(not a list of at least two non-empty utterances)", stacklevel=2)
    return out
