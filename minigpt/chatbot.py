"""The book's chat model: SFT on human dialogue, with arithmetic mixed in so it still adds up.

Arithmetic makes fine-tuning measurable; it does not make a model that talks. The chat model of
chapter 5 learns from the conversations of ``chatterbot-corpus`` (:func:`minigpt.tasks.dialogue.dialogues`):
greetings, small talk, questions about AI, food, history, science. A share of its training
conversations (``recipe.chat.arithmetic``) are arithmetic problems, so it keeps the skill that can
be checked. The same :func:`minigpt.sft.sft` trains it; only the data and the recipe part differ.

Dialogue has no single right answer, so exact match cannot score it. What we measure instead:

* :func:`reply_loss`: nats per token of the held-out replies (to questions never seen in training),
  for this model and for the pretrained one, which can read the same replies after a plain-text
  prompt: how much better the model predicts what a person would say;
* :func:`end_rate`: the share of sampled replies that end their turn with ``<|end|>`` instead of
  running on: the one habit a chat model must learn that a text continuer never had.

Online there is a second chat model, :func:`train_instruct`: OpenAI's GPT-2 fine-tuned the same way
on an instruction set from the Hub (Alpaca-cleaned, SmolTalk), measured the same way.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.chat import (
    END_OF_TURN,
    Conversation,
    check_chat_tokenizer,
    render,
    render_prompt,
    with_chat_tokens,
)
from minigpt.generate import complete
from minigpt.model import GPT, evaluating
from minigpt.recipe import Recipe
from minigpt.runs import find_or_make, finish_run, read_run
from minigpt.sft import SFTRun, sft, task_data
from minigpt.tasks import dialogues, exact_match, load_chat_data, split_of
from minigpt.tokenizer import BPETokenizer, gpt2_tokenizer

__all__ = ["chat_data", "end_rate", "fits", "instruct_data", "plain_text", "reply_loss", "train_chat",
           "train_instruct"]


def fits(conversations: list[Conversation], tokenizer: BPETokenizer, max_tokens: int) -> list[Conversation]:
    """The conversations that take at most ``max_tokens`` tokens both in the chat format and as
    :func:`plain_text` (a little longer), so that every measure here can read them whole."""
    return [c for c in conversations
            if max(len(render(c, tokenizer)[0]), len(plain_text(c, tokenizer)[0])) <= max_tokens]


def chat_data(recipe: Recipe, tokenizer: BPETokenizer, split: str) -> list[Conversation]:
    """The chat model's conversations of ``split``: the dialogue of ``recipe.chat.language`` that
    fits ``chat.max_tokens``, and, for ``"train"``, arithmetic problems making up ``chat.arithmetic``
    of the whole (:class:`~minigpt.sft.SFTSource` shuffles them together). The share sets how many
    times the model reads each conversation over its run, and the dialogue is small: read too
    often, it is learned by heart and held-out replies get worse."""
    c = recipe.chat
    talk = fits(dialogues(split, language=c.language), tokenizer, c.max_tokens)
    if split != "train" or not c.arithmetic:
        return talk
    sums = task_data(recipe, "arithmetic", "train", seed=recipe.seed)
    random.Random(recipe.seed).shuffle(sums)
    n = round(len(talk) * c.arithmetic / (1 - c.arithmetic))
    return talk + (sums * (n // len(sums) + 1))[:n]  # repeated when the share asks for more than there are


def plain_text(conversation: Conversation, tokenizer: BPETokenizer) -> tuple[list[int], list[bool]]:
    """A conversation as plain text for a base model, ``(ids, mask)`` like :func:`~minigpt.chat.render`
    with the mask on the assistant's reply tokens only. Each reply is encoded on its own, after
    ``"User: ...\\nAssistant:\\n"``, so its tokens are exactly those the chat format gives it and the
    two losses compare the same predictions."""
    ids: list[int] = []
    mask: list[bool] = []
    for m in conversation.messages:
        if m.role == "assistant":
            head, reply = tokenizer.encode("Assistant:\n"), tokenizer.encode(m.content)
            tail = tokenizer.encode("\n")
            ids += head + reply + tail
            mask += [False] * len(head) + [True] * len(reply) + [False] * len(tail)
        else:
            line = tokenizer.encode(f"{m.role.capitalize()}: {m.content}\n")
            ids += line
            mask += [False] * len(line)
    return ids, mask


@torch.no_grad()
def reply_loss(model: GPT, tokenizer: BPETokenizer, conversations: list[Conversation], *,
               plain: bool = False) -> float:
    """Mean loss in nats per token of the assistant's reply tokens (the ``<|end|>`` after each left
    out, so that chat and plain text score the same tokens), in the chat format or, with ``plain``,
    as :func:`plain_text` for a model that has never seen the chat tokens. Conversations longer than
    the model's context are refused: cut them first (the chat model's data already fits)."""
    if not conversations:
        raise ValueError("reply_loss needs at least one conversation")
    end = None if plain else check_chat_tokenizer(tokenizer)[END_OF_TURN]
    total, count = 0.0, 0
    device = model.transformer.wte.weight.device
    with evaluating(model):
        for i, conv in enumerate(conversations):
            ids, mask = plain_text(conv, tokenizer) if plain else render(conv, tokenizer)
            if len(ids) > model.config.block_size + 1:
                raise ValueError(f"conversation {i} is {len(ids)} tokens, more than the model's block_size + 1 = "
                                 f"{model.config.block_size + 1}; leave out longer ones (minigpt.chatbot.fits)")
            x = torch.tensor([ids], device=device)
            logp = F.log_softmax(model(x[:, :-1])[0][0].float(), dim=-1)
            targets = x[0, 1:]
            keep = torch.tensor([m and t != end for m, t in zip(mask[1:], ids[1:])], device=device)
            total -= float(logp[torch.arange(len(targets), device=device), targets][keep].sum())
            count += int(keep.sum())
    if not count:
        raise ValueError("reply_loss has no reply token to score: every assistant reply is empty")
    return total / count


@torch.no_grad()
def end_rate(model: GPT, tokenizer: BPETokenizer, conversations: list[Conversation], *, max_new_tokens: int = 64,
             temperature: float = 0.8, seed: int = 0) -> float:
    """The share of replies, sampled at ``temperature`` to each conversation's prompt, that end with
    ``<|end|>`` within ``max_new_tokens`` (prompts too long to leave that room are skipped)."""
    end = check_chat_tokenizer(tokenizer)[END_OF_TURN]
    prompts = [p for p in (render_prompt(c, tokenizer) for c in conversations)
               if len(p) + max_new_tokens <= model.config.block_size]
    if not prompts:
        raise ValueError(f"no prompt leaves room for {max_new_tokens} new tokens in the model's context")
    generator = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(seed)
    with evaluating(model):
        outs = complete(model, prompts, max_new_tokens, stop_tokens=[end], temperature=temperature,
                        generator=generator)
    return sum(bool(o) and o[-1] == end for o in outs) / len(outs)


def train_chat(recipe: Recipe, out_dir: str | os.PathLike, *, resume: bool = True, progress: bool = True) -> SFTRun:
    """Train the chat model (``recipe.chat``) into ``out_dir``, starting from the recipe's pretrained
    run (found or made with :func:`~minigpt.runs.find_or_make`): the arithmetic SFT run has
    forgotten the English the dialogue needs. ``run.json`` records, beside the usual, the held-out
    reply loss, the end-of-turn rate and the held-out arithmetic exact match."""
    base = find_or_make(recipe, "pretrain")
    tokenizer = with_chat_tokens(BPETokenizer.load(base / "tokenizer.bpe"))
    test = chat_data(recipe, tokenizer, "test")
    run = sft(recipe, base, out_dir, stage="chat", train=chat_data(recipe, tokenizer, "train"), test=test,
              resume=resume, progress=progress)
    model, tok = run.model, run.tokenizer
    _record(run, out_dir, "chat model", lambda: {
        "reply_loss": reply_loss(model, tok, test),
        "end_rate": end_rate(model, tok, test, max_new_tokens=recipe.chat.reply_tokens, seed=recipe.seed),
        "exact_match": exact_match(model, tok, task_data(recipe, "arithmetic", "test", seed=recipe.seed))})
    return run


def instruct_data(recipe: Recipe, tokenizer: BPETokenizer) -> tuple[list[Conversation], list[Conversation]]:
    """``recipe.instruct.rows`` rows of its instruction set (from the Hub, or from the local file
    ``instruct.data_files`` in that set's schema), those that fit ``instruct.max_tokens``, split by
    their first question (:func:`~minigpt.tasks.data.split_of`), so a question asked twice never sits on
    both sides; at most ``instruct.n_test`` held out."""
    i = recipe.instruct
    rows = fits(load_chat_data(i.data, limit=i.rows, data_files=i.data_files or None), tokenizer, i.max_tokens)
    side = [split_of(next(m.content for m in c.messages if m.role == "user")) for c in rows]
    return ([c for c, s in zip(rows, side) if s == "train"],
            [c for c, s in zip(rows, side) if s == "test"][:i.n_test])


def train_instruct(recipe: Recipe, out_dir: str | os.PathLike, *, resume: bool = True, progress: bool = True) -> SFTRun:
    """Instruction-tune OpenAI's GPT-2 (``recipe.instruct.weights``, through
    :meth:`~minigpt.model.GPT.from_pretrained`) on ``recipe.instruct.data`` into ``out_dir``.

    Needs the Hub, or local copies: a folder in Hugging Face's layout for ``instruct.weights``, a
    JSON/JSONL file for ``instruct.data_files``. Offline it raises
    :class:`~minigpt.errors.NetworkError` within seconds. ``run.json`` records the held-out reply
    loss of GPT-2 prompted in plain text (``base_reply_loss``) and of the tuned model, and the share
    of sampled replies that end their turn.
    """
    i = recipe.instruct
    base = GPT.from_pretrained(i.weights)
    tokenizer = with_chat_tokens(gpt2_tokenizer())
    train, test = instruct_data(recipe, tokenizer)
    run = sft(recipe, base, out_dir, tokenizer=tokenizer, stage="instruct", train=train, test=test,
              resume=resume, progress=progress)
    model, tok = run.model, run.tokenizer
    _record(run, out_dir, "instruction-tuned GPT-2", lambda: {
        "base_reply_loss": reply_loss(base.to(run.trainer.device), tok, test, plain=True),
        "reply_loss": reply_loss(model, tok, test),
        "end_rate": end_rate(model, tok, test, max_new_tokens=64, seed=recipe.seed)})
    return run


def _record(run: SFTRun, out_dir: str | os.PathLike, name: str, measure: Callable[[], dict[str, float]]) -> None:
    """Measure a finished run once, on the main process (every rank holds the same weights), into
    its ``run.json``, and print the figures. A run stopped early is not measured."""
    if run.trainer.ddp.is_main and run.trainer.step >= run.trainer.cfg.max_steps:
        measured = measure()
        finish_run(Path(out_dir), read_run(out_dir), **measured)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in measured.items()))
