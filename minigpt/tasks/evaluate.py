"""How well a model does the tasks: its greedy answers, and the fraction that are right.

:func:`exact_match` answers greedily, stopping at ``<|end|>``, and compares normalised answers;
with ``few_shot`` examples it measures a base model instead, prompted with plain text
("Q: ... A: ..."), so the chapter can put in-context learning and SFT side by side on the same
held-out questions.

:func:`pass_at_k` samples instead: the chance that at least one of ``k`` sampled answers is right,
which bounds what RL on a verifiable reward can reach (it reinforces right answers the model
samples, so it turns pass@k into pass@1 at best, not beyond).

Kept apart from the examples, which need no model, and from the rewards, which share only
:func:`normalize_answer`: the one notion of "the same answer".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from minigpt.chat import END_OF_TURN, Conversation, Message, check_chat_tokenizer, render_prompt
from minigpt.generate import complete
from minigpt.logprobs import pack, token_logprobs
from minigpt.model import GPT, evaluating
from minigpt.tokenizer import BPETokenizer


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding space or final full stop: "  85." == "85"."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def _plain(messages: Sequence[Message]) -> str:
    """A conversation as plain text for a base model: context line, then Q:/A: lines."""
    prefix = {"system": "", "user": "Q: ", "assistant": "A: "}
    return "\n".join(prefix[m.role] + m.content for m in messages)


def _until_end(tokenizer: BPETokenizer, ids: list[int], end: int) -> str:
    """A chat answer's text: the ids up to ``<|end|>`` (all of them if it never came)."""
    return tokenizer.decode(ids[:ids.index(end)] if end in ids else ids)


def _is_right(answer: str, conversation: Conversation) -> bool:
    """Whether ``answer`` is the conversation's expected answer, after :func:`normalize_answer`."""
    return normalize_answer(answer) == normalize_answer(conversation.answer)


def answer_budget(max_new_tokens: int | None, tokenizer: BPETokenizer, conversations: Sequence[Conversation]) -> int:
    """``max_new_tokens`` if given, else enough for the longest expected answer and 4 more (a wrong
    answer may run longer)."""
    if max_new_tokens is not None:
        return max_new_tokens
    return max(len(tokenizer.encode(c.answer)) for c in conversations) + 4


def _chat_completions(model: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation],
                      max_new_tokens: int, batch_size: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Each conversation's chat prompt, the model's greedy continuation (ending with ``<|end|>``
    if it came) and the id of ``<|end|>``."""
    end = check_chat_tokenizer(tokenizer)[END_OF_TURN]
    prompts = [render_prompt(c, tokenizer) for c in conversations]
    return prompts, complete(model, prompts, max_new_tokens, stop_tokens=[end], batch_size=batch_size), end


def few_shot_prompt(shots: Sequence[Conversation], conversation: Conversation) -> str:
    """Plain text that shows a base model worked examples, then the question::

        Q: What is 12 + 5?
        A: 17

        Q: What is 37 + 48?
        A:

    The model's continuation up to the first newline is its answer.
    """
    return "".join(_plain(s.messages) + "\n\n" for s in shots) + _plain(conversation.prompt) + "\nA:"


def answers(model: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation], *,
            few_shot: Sequence[Conversation] | None = None, max_new_tokens: int | None = None,
            batch_size: int = 64) -> list[str]:
    """The model's greedy answer to the final question of each conversation.

    Chat format (``few_shot`` None): prompt with :func:`~minigpt.chat.render_prompt`, answer up to
    ``<|end|>``. Few-shot: prompt with :func:`few_shot_prompt`, answer up to the first newline.
    ``max_new_tokens`` defaults to the longest expected answer's length plus 4.
    """
    if not conversations:
        return []
    max_new_tokens = answer_budget(max_new_tokens, tokenizer, conversations)
    if few_shot is None:
        _, outs, end = _chat_completions(model, tokenizer, conversations, max_new_tokens, batch_size)
        return [_until_end(tokenizer, ids, end) for ids in outs]
    newline = [i for i, b in tokenizer.vocab.items() if b"\n" in b]
    prompts = [tokenizer.encode(few_shot_prompt(few_shot, c)) for c in conversations]
    outs = complete(model, prompts, max_new_tokens, stop_tokens=newline, batch_size=batch_size)
    return [tokenizer.decode(ids).split("\n", 1)[0] for ids in outs]


def exact_match(model: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation], *,
                few_shot: Sequence[Conversation] | None = None, max_new_tokens: int | None = None,
                batch_size: int = 64) -> float:
    """Fraction of conversations whose greedy answer equals the expected one after
    :func:`normalize_answer`; see :func:`answers` for the two prompt formats."""
    if not conversations:
        raise ValueError("exact_match needs at least one conversation")
    got = answers(model, tokenizer, conversations, few_shot=few_shot, max_new_tokens=max_new_tokens,
                  batch_size=batch_size)
    hits = sum(_is_right(g, c) for g, c in zip(got, conversations))
    return hits / len(conversations)


def pass_at_k(model: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation], ks: Sequence[int] = (1, 8),
              *, samples: int = 16, temperature: float = 1.0, max_new_tokens: int | None = None,
              seed: int = 0) -> dict[int, float]:
    """pass@k for each ``k`` in ``ks``: the chance that at least one of ``k`` answers sampled at
    ``temperature`` is right, averaged over ``conversations``.

    Each question gets ``samples`` answers (``n``, at least the largest ``k``), of which ``c`` are
    right, and pass@k is estimated without bias as ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021,
    the Codex paper): better than drawing just ``k``, which would waste the other samples."""
    if not conversations:
        raise ValueError("pass_at_k needs at least one conversation")
    if not ks or min(ks) < 1 or max(ks) > samples:
        raise ValueError(f"every k must be between 1 and samples={samples}, got ks={list(ks)}; "
                         "draw more samples to estimate a larger k")
    max_new_tokens = answer_budget(max_new_tokens, tokenizer, conversations)
    end = check_chat_tokenizer(tokenizer)[END_OF_TURN]
    prompts = [render_prompt(c, tokenizer) for c in conversations for _ in range(samples)]
    generator = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(seed)
    outs = complete(model, prompts, max_new_tokens, stop_tokens=[end], temperature=temperature,
                    generator=generator, batch_size=256)
    right = [0] * len(conversations)
    for i, ids in enumerate(outs):
        right[i // samples] += _is_right(_until_end(tokenizer, ids, end), conversations[i // samples])
    return {k: sum(1 - math.comb(samples - c, k) / math.comb(samples, k) for c in right) / len(right) for k in ks}


def confident_answers(model: GPT, tokenizer: BPETokenizer, conversations: Sequence[Conversation], *,
                      max_new_tokens: int | None = None, batch_size: int = 64) -> list[tuple[str, float]]:
    """Each conversation's greedy answer (chat format, as :func:`answers`) and the probability the
    model gives that answer: the product of its tokens' probabilities, ``<|end|>`` included. How
    sure the model is of the whole answer, which :func:`reliability` sets against how often
    answers that sure are right."""
    if not conversations:
        return []
    prompts, outs, end = _chat_completions(model, tokenizer, conversations,
                                           answer_budget(max_new_tokens, tokenizer, conversations), batch_size)
    device = model.transformer.wte.weight.device
    probabilities: list[float] = []
    with evaluating(model), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = pack(prompts[start:start + batch_size], outs[start:start + batch_size], device=device)
            probabilities += token_logprobs(model, batch.ids, mask=batch.mask).sum(1).exp().tolist()
    return [(_until_end(tokenizer, ids, end), p) for ids, p in zip(outs, probabilities)]


def reliability(confidences: Sequence[float], right: Sequence[bool], bins: int = 10) -> tuple[list[dict[str, float]], float]:
    """How well ``confidences`` (probabilities in [0, 1]) predict being ``right``: the answers
    split into ``bins`` equal-width bins of confidence, each with its count, mean confidence and
    accuracy (a reliability diagram plots accuracy against confidence: on the diagonal, a model
    that says 80% is right 80% of the time), and the expected calibration error, the bins'
    mean ``|accuracy - confidence|`` weighted by their counts. Empty bins are left out."""
    if len(confidences) != len(right) or not right:
        raise ValueError(f"reliability needs as many confidences as answers, at least one; got {len(confidences)} "
                         f"and {len(right)}")
    if bins < 1:
        raise ValueError(f"bins={bins} must be at least 1")
    confidences = [float(c) for c in confidences]  # plain floats out, whatever array came in
    table = []
    for b in range(bins):
        members = [(c, r) for c, r in zip(confidences, right)
                   if b / bins <= c < (b + 1) / bins or (b == bins - 1 and c == 1.0)]
        if members:
            table.append({"low": b / bins, "high": (b + 1) / bins, "count": len(members),
                          "confidence": sum(c for c, _ in members) / len(members),
                          "accuracy": sum(r for _, r in members) / len(members)})
    ece = sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / len(right)
    return table, ece
