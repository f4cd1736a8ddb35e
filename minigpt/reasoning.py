"""Prompting and reasoning: answering directly, or writing the working first.

A transformer of fixed depth does a bounded amount of computation per token it writes. Asked for
the sum of two long numbers at once, it must settle every carry before it writes the first digit;
asked to write the column addition out (a *chain of thought*, or *scratchpad*), it spends one easy
step per column, each reading only what the step before it wrote. Chapter 14 measures the two on
:func:`long_addition`: exact match by the number of digits, on held-out sums
of the lengths trained on and of longer ones (:func:`exact_match_by_digits`), for a model trained
on the direct answers and one trained on the working (:func:`train_reasoner`), and then GRPO on
top of the working, rewarded only for a right final answer (:func:`grpo_on_working`).

The models here start from random weights (:func:`reasoning_model`): one byte a token, so every
digit and every place marker is a token of its own, and rotary positions (chapter 9), which see
only how far apart two tokens are, never where they are. Numbered 0, 1, 2, ... in order, those
distances change with the length of the numbers, and the working stops at the lengths it was
trained on; numbered by column (:func:`coupled_positions`, a :class:`CoupledGPT`), every distance
the working needs is the same at every length, and it carries on past them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt.chat import Conversation, render_prompt, with_chat_tokens
from minigpt.model import GPT, GPTConfig, KVCache
from minigpt.recipe import Recipe
from minigpt.rlhf.grpo import grpo
from minigpt.rlhf.run import mean_reward
from minigpt.sft import SFTRun, sft
from minigpt.tasks import answers
from minigpt.tasks.data import sample_split
from minigpt.tasks.evaluate import answer_budget
from minigpt.tokenizer import BPETokenizer

__all__ = ["ANSWER_MARKER", "COLUMN_STRIDE", "CoupledGPT", "Coupling", "FIRST_COLUMN", "HINTS", "ReasonerRun", "SLOTS",
           "addition_question", "addition_working", "byte_tokenizer", "correct_final", "coupled_positions",
           "digit_tests", "direct_answer", "exact_match_by_digits", "final_answer", "grpo_on_working", "hint_offset",
           "hinted_question", "long_addition", "reasoning_model", "sampled_accuracy_by_digits", "train_reasoner",
           "with_hints"]


# -- the task: long addition, with and without the working --------------------------------------

#: The place markers (*index hints*) of :func:`long_addition`: one letter before each digit, the
#: same letter for the digits of one column, in the question, the working and the answer.
HINTS = "abcdefghijklmnopqrstuvwxyz"
#: What comes before the final answer in the model's reply (:func:`final_answer` reads after it).
ANSWER_MARKER = "Answer:"


def addition_question(a: int, b: int) -> str:
    """The question as a reader asks it: ``"What is 4721 + 385?"``."""
    return f"What is {a} + {b}?"


def hint_offset(a: int, b: int) -> int:
    """Which letter of :data:`HINTS` marks the units column: drawn from the question's hash, so
    the same question always looks the same, while a column's letter changes from one question to
    the next (no letter stands for a column, and the letters a long number's high columns need
    were seen on short numbers too)."""
    room = len(HINTS) - max(len(str(a)), len(str(b)))  # the sum may have one more column
    if room < 1:
        raise ValueError(f"{a} + {b} has more columns than the {len(HINTS)} place markers allow (at most "
                         f"{len(HINTS) - 1} digits)")
    h = int.from_bytes(hashlib.sha256(addition_question(a, b).encode("utf-8")).digest()[8:16], "big")
    return h % room


def with_hints(n: int, offset: int) -> str:
    """``n`` with a place marker before each digit, the units marked ``HINTS[offset]``:
    ``with_hints(4721, 0) == "d4c7b2a1"``."""
    digits = str(n)
    if n < 0 or offset < 0 or offset + len(digits) > len(HINTS):
        raise ValueError(f"with_hints({n}, {offset}): n must be >= 0 and the offset leave room for its "
                         f"{len(digits)} digits among {len(HINTS)} markers")
    return "".join(HINTS[offset + len(digits) - 1 - i] + d for i, d in enumerate(digits))


def hinted_question(a: int, b: int) -> str:
    """What the model reads: the question with place markers (``hint_offset`` picks the letters),
    ``"What is d4c7b2a1 + c3b8a5?"``. Markers let attention find a column's digits by content
    (the letter) instead of by counting positions, which fails past the lengths it was trained on."""
    offset = hint_offset(a, b)
    return f"What is {with_hints(a, offset)} + {with_hints(b, offset)}?"


def addition_working(a: int, b: int) -> str:
    """Column addition written out, units first, one step per column, then the answer::

        a1+5+0=06 b2+8+0=10 c7+3+1=11 d4+0+1=05 Answer: d5c1b0a6

    Each step is the column's marker, its two digits (0 past the end of the shorter number), the
    carry in (the first digit of the step before: always 10 characters back) and the column's sum
    as two digits, carry out then digit. Every step reads the same, whatever the length, so each
    one needs only local information. The answer is written with its markers, highest column
    first, each digit copied from the step with the same marker."""
    offset = hint_offset(a, b)
    x, y = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(x), len(y))):
        da, db = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        total = da + db + carry
        steps.append(f"{HINTS[offset + i]}{da}+{db}+{carry}={total:02d}")
        carry = total // 10
    return " ".join(steps) + f" {ANSWER_MARKER} {with_hints(a + b, offset)}"


def direct_answer(a: int, b: int) -> str:
    """The answer alone, as :func:`addition_working` ends: ``"Answer: d5c1b0a6"``."""
    return f"{ANSWER_MARKER} {with_hints(a + b, hint_offset(a, b))}"


def final_answer(reply: str) -> str:
    """The number a reply ends with: the text after the last :data:`ANSWER_MARKER`, markers and
    spaces taken out (``"... Answer: d5c1b0a6"`` -> ``"5106"``); ``""`` when there is no marker
    or no number after it (a reply cut short counts as wrong, never as a crash)."""
    _, marker, after = reply.rpartition(ANSWER_MARKER)
    if not marker:
        return ""
    text = after.strip()
    digits = "".join(c for c in text if c not in HINTS)
    return digits if digits.isdigit() else ""


def _number(digits: int, rng: random.Random) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


def long_addition(n: int, *, split: str = "train", seed: int = 0, digits: int = 5, min_digits: int = 1,
                  working: bool = True) -> list[Conversation]:
    """``n`` sums of two numbers, the longer of which has ``min_digits``..``digits`` digits (each
    length equally often; the other number's length drawn from 1 to that), the question with place
    markers (:func:`hinted_question`) and the answer worked (:func:`addition_working`) or
    ``working=False`` alone (:func:`direct_answer`). Split by the plain question (:func:`~minigpt.tasks.data.split_of`
    of :func:`addition_question`): the working and direct sets hold the same questions."""
    if not 1 <= min_digits <= digits <= len(HINTS) - 1:
        raise ValueError(f"need 1 <= min_digits <= digits <= {len(HINTS) - 1}, got min_digits={min_digits}, "
                         f"digits={digits}")

    def make(rng: random.Random) -> tuple[str, Conversation]:
        longest = rng.randint(min_digits, digits)
        a, b = _number(longest, rng), _number(rng.randint(1, longest), rng)
        if rng.random() < 0.5:
            a, b = b, a
        answer = addition_working(a, b) if working else direct_answer(a, b)
        return addition_question(a, b), Conversation.single(hinted_question(a, b), answer)

    return sample_split(make, n, split, seed)


def correct_final(conversation: Conversation, response: str) -> float:
    """1.0 if the number ``response`` ends with (:func:`final_answer`, after the
    marker) is the conversation's, else 0.0: the reward of RL on worked answers, which checks the
    result and leaves the working free."""
    got = final_answer(response)
    return float(bool(got) and got == final_answer(conversation.answer))


# -- the models ---------------------------------------------------------------------------------

def byte_tokenizer() -> BPETokenizer:
    """A tokenizer with no merges (each byte one token) and the chat tokens: every digit and place
    marker is one token, whatever text a BPE would have learned its merges from."""
    return with_chat_tokens(BPETokenizer([], name="bytes"))


def _longest(digits: int, tokenizer: BPETokenizer) -> int:
    """Tokens the longest worked sum of ``digits``-digit numbers needs: its prompt and the reply
    :func:`~minigpt.tasks.evaluate.answers` allows it (the expected one and a few more)."""
    top = 10 ** digits - 1  # every column carries: the sum has a digit more
    conv = Conversation.single(hinted_question(top, top), addition_working(top, top))
    return len(render_prompt(conv, tokenizer)) + answer_budget(None, tokenizer, [conv])


# -- position coupling ---------------------------------------------------------------------------

#: Positions of the text before the numbers ("What is ", the chat tokens) count 0, 1, 2, ...; each
#: column's tokens then share a block of COLUMN_STRIDE positions, the block of the column marked
#: HINTS[i] starting at FIRST_COLUMN + i * COLUMN_STRIDE.
FIRST_COLUMN, COLUMN_STRIDE = 64, 32
#: Where in its column's block each kind of token sits: the first and the second number's marker
#: (its digit is one further), " + " after the first number's units, "?" and the chat tokens after
#: it (in the units column), the working's step for the column, "Answer: " (in the last step's
#: column), the answer's marker and digit, and ``<|end|>`` (in the units column).
SLOTS = {"first": 0, "second": 2, "plus": 4, "asked": 7, "step": 10, "answer_word": 20, "answer": 28, "end": 30}


class Coupling:
    """The column a long-addition conversation has reached, fed one token's text at a time
    (:meth:`position`): the state behind :func:`coupled_positions`, kept between calls so that a
    model generating with a KV cache computes each new token's position from the tokens before it
    in constant time, instead of reading the whole conversation again at every token."""

    def __init__(self) -> None:
        self.count = 0  # tokens fed so far
        self.state, self.seen, self.column, self.slot, self.second = "prompt", "", 0, 0, False
        self.answer_word = len(ANSWER_MARKER) + 1  # "Answer: "

    def _at(self, slot: int) -> int:
        self.slot = slot
        return FIRST_COLUMN + COLUMN_STRIDE * self.column + slot

    def position(self, text: str) -> int:
        """The position of the next token, whose text is ``text`` (``""`` for a chat token)."""
        self.count += 1
        marker = len(text) == 1 and text in HINTS
        state = self.state
        if state == "prompt":
            self.seen = (self.seen + text)[-8:]
            if self.seen.endswith("What is "):
                self.state = "question"
            return self.count - 1
        if state == "question" and (marker or text.isdigit()):
            if marker:
                self.column = HINTS.index(text)
            return FIRST_COLUMN + COLUMN_STRIDE * self.column + SLOTS["second" if self.second else "first"] + \
                (0 if marker else 1)
        if state == "question" and text in (" ", "+"):
            slot = SLOTS["plus"] if not self.second else min(self.slot + 1, SLOTS["asked"] - 1)
            self.second = True
            return self._at(slot)
        if state in ("question", "asked") and not marker:
            self.state = "asked"
            return self._at(SLOTS["asked"] if state == "question" else min(self.slot + 1, SLOTS["step"] - 1))
        if state in ("asked", "step") and marker:  # a step of the working begins
            self.state, self.column = "step", HINTS.index(text)
            return self._at(SLOTS["step"])
        if state == "step" and text == ANSWER_MARKER[0]:
            self.state, self.answer_word = "answer_word", self.answer_word - 1
            return self._at(SLOTS["answer_word"])
        if state == "step":
            return self._at(min(self.slot + 1, SLOTS["answer_word"] - 1))
        if state == "answer_word" and self.answer_word > 0:
            self.answer_word -= 1
            return self._at(self.slot + 1)
        # the answer: markers and digits by column, then <|end|> and anything after
        self.state = "answer"
        if marker:
            self.column = HINTS.index(text)
        return FIRST_COLUMN + COLUMN_STRIDE * self.column + \
            (SLOTS["answer"] if marker else SLOTS["answer"] + 1 if text.isdigit() else SLOTS["end"])


def coupled_positions(texts: Sequence[str]) -> list[int]:
    """The position of each token of a rendered long-addition conversation (``texts``: each
    token's text, ``""`` for a chat token), *coupled* by column (Cho et al. 2024): the digits of
    one column, in the question, in its step of the working and in the answer, sit in the same
    block of positions, always the same distance apart. Every lookup the working needs (this
    column's digits, whether a next column exists, the step an answer digit comes from) is then
    at a fixed distance, however long the numbers. Each position depends on its token and the
    tokens before it only (:class:`Coupling` is the state carried along), so a model can compute
    them as it generates. Any text gets positions (a wrong reply too); only the layout of
    :func:`hinted_question` and :func:`addition_working` gets coupled ones."""
    coupling = Coupling()
    return [coupling.position(text) for text in texts]


class CoupledGPT(GPT):
    """A GPT that computes its positions from its tokens (:func:`coupled_positions`) at every
    call, in training and in generation alike: nothing that calls it (SFT, generation with a KV
    cache and left padding, beam search, GRPO) needs to know. With a KV cache each row's
    :class:`Coupling` is kept in the cache (``KVCache.row_state``), so a generated token costs one
    step of it. Rotary positions only (a learned table would need a row per coupled position)."""

    def __init__(self, config: GPTConfig, tokenizer: BPETokenizer) -> None:
        if config.position != "rope":
            raise ValueError(f"CoupledGPT needs position='rope', got {config.position!r}")
        super().__init__(config)
        self.texts = [tokenizer.decode([i]) if i not in tokenizer.special_tokens.values() else ""
                      for i in range(tokenizer.vocab_size)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, kv_cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[Any, ...]:
        if kv_cache is not None and kv_cache.length:  # the cache carries on where its last call ended
            if kv_cache.row_state is None:
                raise ValueError("this KV cache holds tokens a CoupledGPT did not compute positions for: "
                                 "start from an empty cache (model.new_kv_cache)")
            couplings = kv_cache.row_state
        else:
            couplings = [Coupling() for _ in range(idx.size(0))]
        real = attention_mask.bool().tolist() if attention_mask is not None else [[True] * idx.size(1)] * idx.size(0)
        # Left padding gets position 0 and never reaches the coupling: no real token attends to it.
        positions = torch.tensor([[coupling.position(self.texts[i]) if keep else 0 for i, keep in zip(ids, keeps)]
                                  for coupling, ids, keeps in zip(couplings, idx.tolist(), real)],
                                 dtype=torch.long, device=idx.device)
        if kv_cache is not None:
            kv_cache.row_state = couplings
        return super().forward(idx, targets, kv_cache=kv_cache, attention_mask=attention_mask, positions=positions,
                               **kwargs)


def reasoning_model(recipe: Recipe, tokenizer: BPETokenizer, *, seed: int | None = None,
                    coupled: bool = False) -> GPT:
    """Random weights of ``recipe.reasoning``'s shape, with rotary positions, and a block that holds
    the longest worked sum measured (``test_digits``); ``coupled``: a :class:`CoupledGPT`."""
    r = recipe.reasoning
    torch.manual_seed(recipe.seed if seed is None else seed)
    config = GPTConfig(block_size=_longest(r.test_digits, tokenizer), vocab_size=tokenizer.vocab_size,
                       n_layer=r.n_layer, n_head=r.n_head, n_embd=r.n_embd, position="rope")
    return CoupledGPT(config, tokenizer) if coupled else GPT(config)


def digit_tests(recipe: Recipe, *, working: bool = True) -> dict[int, list[Conversation]]:
    """The held-out sums of each length 1..``test_digits`` (``n_test`` of each, or all there are:
    one-digit sums have only 10 held out), in the chosen format. The same questions either way."""
    r = recipe.reasoning
    return {d: long_addition(min(r.n_test, 10) if d == 1 else r.n_test, split="test", seed=recipe.seed,
                             digits=d, min_digits=d, working=working)
            for d in range(1, r.test_digits + 1)}


def exact_match_by_digits(model: GPT, tokenizer: BPETokenizer, tests: Mapping[int, Sequence[Conversation]], *,
                          batch_size: int = 100) -> dict[int, float]:
    """For each length, the share of its sums whose greedy reply ends with the right number
    (:func:`final_answer`: the working itself is not marked, only the answer)."""
    out = {}
    for d, convs in tests.items():
        if not convs:
            raise ValueError(f"no test sums of {d} digits; give at least one per length")
        said = answers(model, tokenizer, convs, batch_size=batch_size)
        out[d] = sum(correct_final(c, s) for c, s in zip(convs, said)) / len(convs)
    return out


@dataclass
class ReasonerRun:
    """A model trained on one answer format, and its exact match by number of digits."""

    working: bool
    run: SFTRun
    by_digits: dict[int, float]

    @property
    def model(self) -> GPT:
        return self.run.model

    @property
    def tokenizer(self) -> BPETokenizer:
        return self.run.tokenizer


def train_reasoner(recipe: Recipe, working: bool, out_dir: str | os.PathLike, *, coupled: bool = False,
                   progress: bool = False, **overrides: Any) -> ReasonerRun:
    """SFT of :func:`reasoning_model` on ``reasoning.n_train`` sums of 1..``digits`` digits, with
    the working or answering directly (the same questions, steps and batches), measured on
    :func:`digit_tests`; ``coupled``: positions coupled by column (:class:`CoupledGPT`).
    ``out_dir`` holds the run (a run already there is trained again); ``overrides`` are
    :class:`~minigpt.train.TrainConfig` fields."""
    r = recipe.reasoning
    tok = byte_tokenizer()
    train = long_addition(r.n_train, digits=r.digits, working=working, seed=recipe.seed)
    tests = digit_tests(recipe, working=working)
    settings = dict(max_steps=r.steps, learning_rate=r.learning_rate, warmup_steps=r.warmup_steps, eval_interval=0,
                    checkpoint_interval=0, sample_interval=0, log_interval=50)
    run = sft(recipe, reasoning_model(recipe, tok, coupled=coupled), Path(out_dir), tokenizer=tok, train=train,
              test=tests[r.digits][:50], resume=False, progress=progress, batch_size=r.batch_size,
              **{**settings, **overrides})
    return ReasonerRun(working, run, exact_match_by_digits(run.model, tok, tests))


def sampled_accuracy_by_digits(model: GPT, tokenizer: BPETokenizer, tests: Mapping[int, Sequence[Conversation]], *,
                               temperature: float = 1.0, samples: int = 4, seed: int = 3) -> dict[int, float]:
    """For each length, the share of replies sampled at ``temperature`` whose final answer is right:
    what GRPO's reward averages over, before and after."""
    longest = max(answer_budget(None, tokenizer, convs) for convs in tests.values())
    return {d: mean_reward(model, tokenizer, list(convs), correct_final, max_new_tokens=longest,
                           temperature=temperature, samples=samples, seed=seed)
            for d, convs in tests.items()}


def grpo_on_working(recipe: Recipe, start: ReasonerRun) -> tuple[GPT, list[dict[str, Any]]]:
    """GRPO (:func:`~minigpt.rlhf.grpo.grpo`) from the working model, on training sums of the
    lengths ``reasoning.grpo_digits``, rewarded 1 when the reply's final answer is right
    (:func:`correct_final`) and 0 otherwise: the working is never checked,
    so the prompts need no worked answers, only the sums. The start model stays as it was (the
    frozen reference); returns the trained copy and GRPO's history."""
    if not start.working:
        raise ValueError("grpo_on_working starts from a model trained on the working (train_reasoner(..., True))")
    r = recipe.reasoning
    per_length = r.grpo.steps * r.grpo.prompts_per_step // len(r.grpo_digits) + 1  # enough never to repeat one
    prompts = [c for d in r.grpo_digits
               for c in long_addition(per_length, digits=d, min_digits=d, working=True, seed=recipe.seed + 1)]
    cfg = dataclasses.replace(r.grpo, max_completion_length=answer_budget(None, start.tokenizer, prompts))
    policy = copy.deepcopy(start.model)
    return grpo(policy, start.model, start.tokenizer, prompts, correct_final, cfg, log_interval=5, seed=recipe.seed)
