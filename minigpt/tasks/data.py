"""The examples of the tasks: instruction data with answers a program can check, and labelled text.

Offline, every example comes from a small seeded program, so a test can assert that fine-tuning
really worked (exact match on held-out questions) instead of eyeballing samples:

* :func:`arithmetic` -- "What is 37 + 48?" -> "85" (sums and differences of small numbers);
* :func:`comparisons` -- "Which is larger, 37 or 48?" -> "48" (the same numbers, another rule);
* :func:`world_qa` -- a little generated world in the system message ("Alice lives in Oslo.
  Alice has a cat. ...") and questions about it, sometimes two turns long, and (a share you
  choose) questions it does not answer, whose right answer is :data:`UNKNOWN`;
* :func:`string_tasks` -- reverse, spell in capitals, count the letters of made-up words;
* :func:`closed_book_qa` -- the same questions about a fixed world the model must remember
  (:func:`fact_questions`), and about made-up people it cannot know (:func:`stranger_questions`).

Two more make labelled text for classification heads (:mod:`minigpt.classify`) rather than
conversations: :func:`reviews` (a sentiment-like label per text) and :func:`entity_tags` (an
entity-like tag per word).

**Splits.** Each example has a key (the arithmetic question, the world, the word); a hash of the
key puts it in ``"train"`` or ``"test"`` (10% held out), so the splits never overlap, for any
seed or size, and the same call always returns the same examples.

Online, :func:`load_chat_data` maps Alpaca-cleaned and SmolTalk (through ``datasets``) onto the same
:class:`~minigpt.chat.Conversation`, for the ``gpu``/``full`` profiles.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from minigpt.chat import Conversation, Message
from minigpt.data import hub_failures, require_hub

T = TypeVar("T")

#: The splits of every task.
SPLITS = ("train", "test")
#: The fraction of examples, hashed by key (see :func:`split_of`), in the "test" split.
HELD_OUT = 0.1


def split_of(key: str) -> str:
    """``"test"`` for about 10% of keys, ``"train"`` for the rest: a hash, so it never changes."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2**64 < HELD_OUT else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")


def sample_split(make: Callable[[random.Random], tuple[str, T]], n: int, split: str, seed: int) -> list[T]:
    """``n`` distinct examples of ``split`` drawn by ``make(rng)`` -> (key, example)."""
    _check_split(split)
    rng = random.Random(seed)
    out: dict[str, T] = {}
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        key, conv = make(rng)
        if split_of(key) == split:
            out.setdefault(str(conv), conv)
    if len(out) < n:  # checked after the loop: the n-th may come on the last draw
        raise ValueError(f"could only find {len(out)} distinct {split} examples, not {n}; ask for fewer")
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------


def arithmetic(n: int | None = None, *, split: str = "train", seed: int = 0, max_operand: int = 99,
               ops: str = "+-") -> list[Conversation]:
    """Sums and differences of integers 0..``max_operand`` (differences never negative).

    All ``(a, op, b)`` problems are enumerated and split by question; ``n`` of the split's
    problems are drawn with ``seed`` (all of them, shuffled, when ``n`` is None).
    """
    _check_split(split)
    if set(ops) - set("+-") or not ops:
        raise ValueError(f"ops={ops!r} must be made of '+' and '-'")
    problems = [(a, op, b) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)
                if op == "+" or a >= b]
    questions = [(f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)) for a, op, b in problems]
    return _draw(questions, n, split, seed, f"problems with max_operand={max_operand} and ops={ops!r}")


def comparisons(n: int | None = None, *, split: str = "train", seed: int = 0,
                max_operand: int = 99) -> list[Conversation]:
    """"Which is larger, 37 or 48?" -> "48", for distinct integers 0..``max_operand``: the same
    kind of question as :func:`arithmetic`, two numbers in, one number out, by another rule (a
    second task that competes with it for the same weights: continual learning, chapter 10).
    Enumerated, split by question and drawn as :func:`arithmetic` does."""
    _check_split(split)
    questions = [(f"Which is larger, {a} or {b}?", str(max(a, b)))
                 for a in range(max_operand + 1) for b in range(max_operand + 1) if a != b]
    return _draw(questions, n, split, seed, f"comparisons with max_operand={max_operand}")


def _draw(questions: list[tuple[str, str]], n: int | None, split: str, seed: int, what: str) -> list[Conversation]:
    """``n`` of the enumerated ``(question, answer)`` pairs whose question falls in ``split``,
    drawn with ``seed`` (all of them, shuffled, when ``n`` is None), as conversations."""
    chosen = [(q, ans) for q, ans in questions if split_of(q) == split]
    random.Random(seed).shuffle(chosen)
    if n is not None:
        if n > len(chosen):
            raise ValueError(f"the {split} split has {len(chosen)} {what}; ask for at most that many, "
                             "or raise max_operand")
        chosen = chosen[:n]
    return [Conversation.single(q, ans) for q, ans in chosen]


# ---------------------------------------------------------------------------------------------
# A little world
# ---------------------------------------------------------------------------------------------

NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Kevin",
         "Laura", "Mallory", "Nina", "Oscar", "Peggy", "Quentin", "Rupert", "Sybil", "Trent", "Ursula",
         "Victor", "Wendy", "Xavier", "Yvonne", "Zoe")
PLACES = ("Oslo", "Lima", "Rome", "Paris", "Cairo", "Tokyo", "Delhi", "Quito", "Dakar", "Hanoi", "Perth",
          "Lagos", "Berlin", "Madrid", "Vienna", "Dublin", "Prague", "Seoul", "Havana", "Nairobi")
#: The pets of the little world, and of :func:`entity_tags`: common nouns, unlike the made-up names.
PETS = ("cat", "dog", "fish", "horse", "parrot", "rabbit", "snake", "turtle", "goat", "frog")


#: The right answer to a question the world does not answer (:func:`world_qa`'s ``unanswerable``).
UNKNOWN = "I don't know."


def world_qa(n: int, *, split: str = "train", seed: int = 0, people: int = 3,
             two_turns: float = 0.3, unanswerable: float = 0.0) -> list[Conversation]:
    """Questions about a little world described in the system message.

    Each example draws ``people`` people, each living in a different place and keeping a
    different pet, and asks where someone lives, which pet someone has, or who lives somewhere;
    a fraction ``two_turns`` asks a second question in a second turn. A fraction ``unanswerable``
    of the questions ask the same about someone, or somewhere, the world does not mention, and
    their answer is :data:`UNKNOWN`: the world is all the model may know, so the honest answer is
    to say so. The split is keyed by the world, so a held-out world was never seen in training.
    """
    if not 1 <= people <= min(len(NAMES), len(PLACES), len(PETS)):
        raise ValueError(f"people={people} must be between 1 and {len(PETS)}")
    if not 0 <= unanswerable <= 1:
        raise ValueError(f"unanswerable={unanswerable} is a share of the questions: between 0 and 1")

    def question(rng: random.Random, who: list[str], where: list[str], pet: list[str]) -> tuple[str, str]:
        if unanswerable and rng.random() < unanswerable:  # the same questions, about an outsider
            kind = rng.randrange(3)
            if kind == 2:
                return f"Who lives in {rng.choice([p for p in PLACES if p not in where])}?", UNKNOWN
            outsider = rng.choice([name for name in NAMES if name not in who])
            return (f"Where does {outsider} live?" if kind == 0 else f"Which pet does {outsider} have?"), UNKNOWN
        i, kind = rng.randrange(people), rng.randrange(3)
        if kind == 0:
            return f"Where does {who[i]} live?", where[i]
        if kind == 1:
            return f"Which pet does {who[i]} have?", f"a {pet[i]}"
        return f"Who lives in {where[i]}?", who[i]

    def make(rng: random.Random) -> tuple[str, Conversation]:
        who, where, pet = rng.sample(NAMES, people), rng.sample(PLACES, people), rng.sample(PETS, people)
        facts = [f"{w} lives in {p}." for w, p in zip(who, where)] + [f"{w} has a {a}." for w, a in zip(who, pet)]
        key = " ".join(sorted(facts))  # the world, whatever order its facts are written in
        rng.shuffle(facts)
        turns = [Message("system", " ".join(facts))]
        for _ in range(2 if rng.random() < two_turns else 1):
            q, a = question(rng, who, where, pet)
            turns += [Message("user", q), Message("assistant", a)]
        return key, Conversation(turns)

    return sample_split(make, n, split, seed)


# ---------------------------------------------------------------------------------------------
# Strings
# ---------------------------------------------------------------------------------------------

_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _word(rng: random.Random) -> str:
    """A pronounceable made-up word of 2-3 syllables (so no answer can be remembered from pretraining)."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def string_tasks(n: int, *, split: str = "train", seed: int = 0) -> list[Conversation]:
    """Reverse a word, write it in capitals, count its letters or one letter in it. Keyed by the
    word, so held-out questions are about words never seen in training."""

    def make(rng: random.Random) -> tuple[str, Conversation]:
        word = _word(rng)
        kind = rng.randrange(4)
        if kind == 0:
            q, a = f"Reverse the word {word}.", word[::-1]
        elif kind == 1:
            q, a = f"Write {word} in capital letters.", word.upper()
        elif kind == 2:
            q, a = f"How many letters are in {word}?", str(len(word))
        else:
            letter = rng.choice(word)
            q, a = f"How many times does the letter {letter} appear in {word}?", str(word.count(letter))
        return word, Conversation.single(q, a)

    return sample_split(make, n, split, seed)


# ---------------------------------------------------------------------------------------------
# Closed book: a world the model must remember, and people it never met
# ---------------------------------------------------------------------------------------------


def known_world(seed: int = 0) -> dict[str, tuple[str, str]]:
    """The world the closed-book questions ask about: each of ``NAMES`` lives in one of
    ``PLACES`` and keeps one of :data:`PETS`, drawn with ``seed``. Unlike :func:`world_qa`'s
    worlds it is never in the prompt: a model knows it only if it learned it."""
    rng = random.Random(seed)
    return {name: (rng.choice(PLACES), rng.choice(PETS)) for name in NAMES}


def _about(name: str, kind: int) -> str:
    return f"Where does {name} live?" if kind == 0 else f"Which pet does {name} have?"


def fact_questions(world: int = 0) -> list[Conversation]:
    """Every question :func:`known_world` answers: where each person lives, which pet each keeps."""
    return [Conversation.single(_about(name, kind), place if kind == 0 else f"a {pet}")
            for name, (place, pet) in known_world(world).items() for kind in (0, 1)]


def stranger_questions(n: int, *, split: str = "train", seed: int = 0) -> list[Conversation]:
    """``n`` questions about made-up people the known world does not hold (capitalised made-up
    words, as :func:`string_tasks` uses), whose honest answer is :data:`UNKNOWN`. Keyed by the name: the held-out
    strangers were never asked about in training."""

    def make(rng: random.Random) -> tuple[str, Conversation]:
        name = _word(rng).capitalize()
        while name in NAMES:  # a made-up word can be a real name ("Nina"): the world knows her
            name = _word(rng).capitalize()
        return name, Conversation.single(_about(name, rng.randrange(2)), UNKNOWN)

    return sample_split(make, n, split, seed)


def closed_book_qa(n: int, *, split: str = "train", seed: int = 0, unanswerable: float = 0.0,
                   world: int = 0) -> list[Conversation]:
    """``n`` questions without a context to read: a share ``unanswerable`` about strangers
    (:func:`stranger_questions` of ``split``), the rest about the known world's facts
    (:func:`fact_questions`, drawn with replacement: there are only 52). A model trained on them
    must remember the facts, and learns to say :data:`UNKNOWN` only from the strangers it meets."""
    if not 0 <= unanswerable <= 1:
        raise ValueError(f"unanswerable={unanswerable} is a share of the questions: between 0 and 1")
    rng = random.Random(seed)
    facts = fact_questions(world)
    asked = [rng.random() < unanswerable for _ in range(n)]
    strangers = iter(stranger_questions(sum(asked), split=split, seed=seed))
    return [next(strangers) if stranger else rng.choice(facts) for stranger in asked]


#: The offline tasks by name, each ``f(n, split=..., seed=...)`` -> conversations.
TASKS: dict[str, Callable[..., list[Conversation]]] = {
    "arithmetic": arithmetic,
    "world": world_qa,
    "strings": string_tasks,
}


def make_task(name: str, n: int | None, *, split: str = "train", seed: int = 0, **options: Any) -> list[Conversation]:
    """``n`` examples of the offline task ``name`` (see :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if n is None and name != "arithmetic":
        raise ValueError(f"task {name!r} is unbounded: give the number of examples n")
    return TASKS[name](n, split=split, seed=seed, **options)


def mixture(n: int, *, split: str = "train", seed: int = 0,
            tasks: Sequence[str] = ("arithmetic", "world", "strings")) -> list[Conversation]:
    """``n`` examples split evenly between ``tasks``, interleaved (a, b, c, a, b, c, ...)."""
    parts = [make_task(t, n // len(tasks) + (k < n % len(tasks)), split=split, seed=seed + k)
             for k, t in enumerate(tasks)]
    longest = max(len(p) for p in parts)
    return [p[i] for i in range(longest) for p in parts if i < len(p)]


TASKS["mixture"] = mixture


# ---------------------------------------------------------------------------------------------
# Labelled text for classification
# ---------------------------------------------------------------------------------------------

#: The classes of :func:`reviews`, by label id.
SENTIMENTS = ("negative", "mixed", "positive")
#: The tags of :func:`entity_tags`, by tag id: outside any entity, person, place, pet.
ENTITY_TAGS = ("O", "PER", "LOC", "PET")
#: The adjectives that count +1 in :func:`reviews` (-1 after "not").
GOOD = ("sweet", "fair", "gentle", "noble", "kind", "merry", "honest", "brave", "true", "good")
#: The adjectives that count -1 in :func:`reviews` (+1 after "not").
BAD = ("foul", "vile", "cruel", "false", "wicked", "base", "dull", "proud", "sick", "bad")


@dataclass(frozen=True)
class Labeled:
    """A text and the id of its class (an index into the task's class names)."""

    text: str
    label: int


@dataclass(frozen=True)
class Tagged:
    """Words (punctuation counts as a word) and one tag id per word."""

    words: tuple[str, ...]
    tags: tuple[int, ...]

    @property
    def text(self) -> str:
        return "".join(w if i == 0 or w in ".," else " " + w for i, w in enumerate(self.words))


def reviews(n: int, *, split: str = "train", seed: int = 0, negation: float = 0.3,
            max_clauses: int = 3) -> list[Labeled]:
    """Verdicts on the world's people and pets, 1 to ``max_clauses`` clauses: "Alice's cat is not cruel, but Bob
    is dull." Each adjective counts +1 (:data:`GOOD`) or -1 (:data:`BAD`), a "not" before it
    (probability ``negation``) flips it, and the sum's sign is the label: negative, mixed (zero,
    only possible with two clauses) or positive (:data:`SENTIMENTS`). So the classes are unequal,
    and the label needs every clause and every "not", not a single word. Keyed by the text."""
    if not 0.0 <= negation <= 1.0:
        raise ValueError(f"negation={negation} must be a probability in [0, 1]")
    if max_clauses < 1:
        raise ValueError(f"max_clauses={max_clauses} must be at least 1")

    def make(rng: random.Random) -> tuple[str, Labeled]:
        clauses, score = [], 0
        for _ in range(rng.randint(1, max_clauses)):
            who = rng.choice(NAMES)
            subject = who if rng.random() < 0.5 else f"{who}'s {rng.choice(PETS)}"
            good = rng.random() < 0.5
            negated = rng.random() < negation
            adjective = rng.choice(GOOD if good else BAD)
            clauses.append(f"{subject} is {'not ' if negated else ''}{adjective}")
            score += (1 if good else -1) * (-1 if negated else 1)
        text = clauses[0] + "".join(f", {rng.choice(('and', 'but'))} {c}" for c in clauses[1:]) + "."
        return text, Labeled(text, 1 + (score > 0) - (score < 0))

    return sample_split(make, n, split, seed)


def entity_tags(n: int, *, split: str = "train", seed: int = 0, sentences: int = 2) -> list[Tagged]:
    """``sentences`` sentences about made-up people and places, each word tagged (:data:`ENTITY_TAGS`):
    "Bavo met Kimu in Tesado. In Tesado, Kimu keeps a goat." People and places are both
    capitalised made-up words, so only the context tells PER from LOC; pets come from :data:`PETS`.

    The split is keyed by the made-up words: a held-out example uses only held-out names, never
    seen in training, so a tagger must read the context rather than remember the names. The
    templates let the words *before* a name decide its tag, which is all a causal model sees.
    """
    _check_split(split)
    OUT, PER, LOC, PET = range(len(ENTITY_TAGS))
    if not 1 <= sentences <= 6:
        raise ValueError(f"sentences={sentences} must be between 1 and 6 (the number of templates)")
    templates = (
        ((PER, None), (OUT, "lives"), (OUT, "in"), (LOC, None), (OUT, ".")),
        ((PER, None), (OUT, "has"), (OUT, "a"), (PET, None), (OUT, ".")),
        ((PER, None), (OUT, "met"), (PER, None), (OUT, "in"), (LOC, None), (OUT, ".")),
        ((OUT, "In"), (LOC, None), (OUT, ","), (PER, None), (OUT, "keeps"), (OUT, "a"), (PET, None), (OUT, ".")),
        ((PER, None), (OUT, "and"), (PER, None), (OUT, "moved"), (OUT, "to"), (LOC, None), (OUT, ".")),
        ((PER, None), (OUT, "visited"), (LOC, None), (OUT, "with"), (PER, None), (OUT, ".")),
    )

    def name(rng: random.Random) -> str:
        while True:  # rejection sampling: about one word in ten is held out
            word = _word(rng).capitalize()
            if split_of(word) == split:
                return word

    rng = random.Random(seed)
    out: dict[str, Tagged] = {}
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        people, places = [name(rng) for _ in range(3)], [name(rng) for _ in range(2)]
        if len(set(people + places)) < 5:  # a word is a person or a place, never both
            continue
        words, tags = [], []
        for template in rng.sample(templates, sentences):
            who = rng.sample(people, 2)
            for tag, word in template:
                if tag == PER:
                    word = who.pop()
                elif tag == LOC:
                    word = rng.choice(places)
                elif tag == PET:
                    word = rng.choice(PETS)
                words.append(word)
                tags.append(tag)
        example = Tagged(tuple(words), tuple(tags))
        out.setdefault(example.text, example)
    if len(out) < n:  # checked after the loop: the n-th may come on the last draw
        raise ValueError(f"could only find {len(out)} distinct {split} examples, not {n}; ask for fewer")
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# Online instruction sets
# ---------------------------------------------------------------------------------------------


def alpaca_conversation(row: Mapping[str, Any]) -> Conversation:
    """An Alpaca(-cleaned) row ``{"instruction", "input", "output"}``: the optional input follows
    the instruction after a blank line, in the user's turn."""
    instruction, extra = row["instruction"].strip(), (row.get("input") or "").strip()
    return Conversation.single(f"{instruction}\n\n{extra}" if extra else instruction, row["output"].strip())


def smoltalk_conversation(row: Mapping[str, Any]) -> Conversation:
    """A SmolTalk row ``{"messages": [{"role", "content"}, ...], ...}``, as it is."""
    return Conversation(row["messages"])


@dataclass(frozen=True)
class OnlineSet:
    """An instruction set on the Hub: its id, its config and how one row becomes a conversation."""

    hub_id: str
    config: str | None
    to_conversation: Callable[[Mapping[str, Any]], Conversation]


#: Hub instruction sets that :func:`load_chat_data` maps onto conversations.
ONLINE: dict[str, OnlineSet] = {
    "alpaca": OnlineSet("yahma/alpaca-cleaned", None, alpaca_conversation),
    "smoltalk": OnlineSet("HuggingFaceTB/smoltalk", "all", smoltalk_conversation),
    "smol-smoltalk": OnlineSet("HuggingFaceTB/smol-smoltalk", None, smoltalk_conversation),
}


def load_chat_data(name: str, *, split: str = "train", limit: int | None = None,
                   data_files: str | Path | Sequence[str | Path] | None = None) -> list[Conversation]:
    """Conversations from an online instruction set (:data:`ONLINE`), or from local JSON/JSONL
    ``data_files`` in that set's schema (no network then).

    From the Hub, ``limit`` streams only the first rows instead of downloading the whole set.
    Rows that are not a valid conversation (say two user turns in a row) are skipped with a warning.
    """
    if name not in ONLINE:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {', '.join(ONLINE)}")
    import datasets  # the `data` extra: only the online sets need it

    spec = ONLINE[name]
    what = f"the instruction set {spec.hub_id!r}" if data_files is None else f"the {name} rows in {data_files}"
    remedy = "or train on the offline tasks (minigpt.tasks.arithmetic, mixture)"
    if data_files is None:
        require_hub(what, remedy=remedy)
    out, bad = [], 0
    with hub_failures(what, remedy):  # streamed rows download while they are read
        if data_files is not None:
            files = [str(data_files)] if isinstance(data_files, (str, Path)) else [str(f) for f in data_files]
            rows: Any = datasets.load_dataset("json", data_files=files, split="train")
        else:
            rows = datasets.load_dataset(spec.hub_id, spec.config, split=split, streaming=limit is not None)
        for row in islice(rows, limit):
            try:
                out.append(spec.to_conversation(row))
            except (ValueError, KeyError, AttributeError):
                bad += 1
    if bad:
        warnings.warn(f"{name}: skipped {bad} of {bad + len(out)} rows that are not valid conversations",
                      stacklevel=2)
    return out
