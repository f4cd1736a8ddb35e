"""The chat format: how a conversation becomes the token ids a GPT learns from.

A base model continues text; a chat model answers. The difference is a format the model learns
during supervised fine-tuning (SFT): every message opens with a role token and closes with an
end-of-turn token, all of them special tokens that ordinary text cannot produce::

    <|system|>Be brief.<|end|><|user|>What is 37 + 48?<|end|><|assistant|>85<|end|>

:func:`render` turns a :class:`Conversation` into ``(ids, loss_mask)``. Only what the assistant
says -- its content and the ``<|end|>`` that closes it -- is learned: the model should not learn
to write the user's questions, and by learning to emit ``<|end|>`` it learns when to stop.
The role token ``<|assistant|>`` is not learned either: at inference time it is part of the
prompt (:func:`render_prompt` ends with it), so the model never has to predict it.

Message text is encoded with no special tokens allowed, so a user who types ``<|end|>`` gets an
error rather than a forged turn boundary.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from minigpt.generate import check_sampling, stream
from minigpt.model import GPT
from minigpt.tokenizer import BPETokenizer

__all__ = [
    "CHAT_TOKENS",
    "ChatSession",
    "END_OF_TURN",
    "ROLES",
    "ROLE_TOKENS",
    "Conversation",
    "Message",
    "check_chat_tokenizer",
    "render",
    "render_prompt",
    "with_chat_tokens",
]

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)


def with_chat_tokens(tokenizer: BPETokenizer) -> BPETokenizer:
    """``tokenizer`` with the chat special tokens appended (those it lacks), ids after its vocabulary.

    A model trained with the old tokenizer needs its embedding grown to the new ``vocab_size``
    (see :func:`minigpt.sft.resize_vocab`).
    """
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    return tokenizer.add_special_tokens(missing) if missing else tokenizer


def check_chat_tokenizer(tokenizer: BPETokenizer) -> dict[str, int]:
    """The ids of the chat tokens; ``ValueError`` if the tokenizer lacks any of them."""
    special = tokenizer.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in special]
    if missing:
        raise ValueError(f"the tokenizer has no chat token(s) {missing}; "
                         "use minigpt.chat.with_chat_tokens(tokenizer) first")
    return {t: special[t] for t in CHAT_TOKENS}


@dataclass(frozen=True)
class Message:
    """One turn: who speaks (``system``, ``user`` or ``assistant``) and what they say."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; a message's role is one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(f"the content of a {self.role} message must be a str, "
                             f"not {type(self.content).__name__}")


MessageLike = Message | Mapping[str, Any] | tuple[str, str]


def _as_message(m: MessageLike) -> Message:
    if isinstance(m, Message):
        return m
    if isinstance(m, Mapping):
        if "role" not in m or "content" not in m:
            raise ValueError(f"a message dict needs 'role' and 'content' keys, got {sorted(m)}")
        return Message(m["role"], m["content"])
    if isinstance(m, tuple) and len(m) == 2:
        return Message(*m)
    raise ValueError(f"cannot read a message from {m!r}; give a Message, a (role, content) pair "
                     "or a {'role': ..., 'content': ...} dict")


def _check_order(messages: Sequence[Message], *, final: str) -> None:
    """An optional system message first, then user and assistant alternating, ending with ``final``."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    turns = messages[1:] if messages[0].role == "system" else messages
    offset = len(messages) - len(turns)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role == "system":
            raise ValueError(f"message {i + offset} is a system message; a system message may only come first")
        if m.role != expected:
            raise ValueError(f"message {i + offset} has role {m.role!r} where {expected!r} was expected: "
                             "after an optional system message, user and assistant take turns, "
                             "starting with the user")
    if not turns or turns[-1].role != final:
        raise ValueError(f"the conversation must end with a{'n' if final == 'assistant' else ''} "
                         f"{final} message, but ends with {messages[-1].role!r}"
                         + ("; it needs an assistant turn to learn from (for a prompt to answer, "
                            "use render_prompt)" if final == "assistant" else ""))


@dataclass(frozen=True, init=False)
class Conversation:
    """Messages to learn from: an optional system message, then user/assistant turns, ending with
    the assistant. Built from :class:`Message` objects, ``(role, content)`` pairs or
    ``{"role", "content"}`` dicts (the layout of SmolTalk and of OpenAI's API)."""

    messages: tuple[Message, ...]

    def __init__(self, messages: Iterable[MessageLike]) -> None:
        msgs = tuple(_as_message(m) for m in messages)
        _check_order(msgs, final="assistant")
        object.__setattr__(self, "messages", msgs)

    @classmethod
    def single(cls, question: str, answer: str, system: str | None = None) -> Conversation:
        """One question, one answer (and an optional system message)."""
        head = [Message("system", system)] if system is not None else []
        return cls([*head, Message("user", question), Message("assistant", answer)])

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Every message before the final answer: what the model sees when it must answer."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        """The final assistant message: what an evaluation compares against."""
        return self.messages[-1].content

    def to_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def __str__(self) -> str:
        return "".join(f"{ROLE_TOKENS[m.role]}{m.content}{END_OF_TURN}" for m in self.messages)


#: The names of prompt tuning's learned tokens (:func:`minigpt.peft.soft_prompt`). They are the only
#: special tokens a message may hold, and only a system message: the operator's, never the user's.
SOFT_TOKEN = "<|soft_{}|>"


def _content_ids(message: Message, tokenizer: BPETokenizer) -> list[int]:
    """The ids of a message's text; a system message may hold the tokenizer's soft tokens."""
    if message.role != "system":
        return tokenizer.encode(message.content)
    soft = SOFT_TOKEN.split("{", 1)[0]
    return tokenizer.encode(message.content, allowed_special={t for t in tokenizer.special_tokens if t.startswith(soft)})


def render(conversation: Conversation, tokenizer: BPETokenizer, *, max_tokens: int | None = None,
           truncate: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of ``conversation`` and, for each id, whether the model learns to predict it.

    ``loss_mask[i]`` is True for the content tokens of every assistant message and the ``<|end|>``
    after each; False for role tokens and for system and user messages.

    ``max_tokens`` (usually the model's ``block_size + 1``: inputs are ids[:-1], targets ids[1:])
    bounds the length. A longer conversation raises ``ValueError``, unless ``truncate``: then it
    keeps the first ``max_tokens`` tokens, so later turns are lost and an answer cut in the middle
    is learned without its ``<|end|>``.
    """
    ids_of = check_chat_tokenizer(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    for m in conversation.messages:
        content = _content_ids(m, tokenizer)
        learn = m.role == "assistant"
        ids += [ids_of[ROLE_TOKENS[m.role]], *content, ids_of[END_OF_TURN]]
        mask += [False, *[learn] * len(content), learn]
    if max_tokens is not None and len(ids) > max_tokens:
        if not truncate:
            raise ValueError(
                f"the conversation renders to {len(ids)} tokens, more than max_tokens={max_tokens} "
                "(the model's block_size + 1); shorten or drop it, use a model with a larger "
                f"block_size, or pass truncate=True to keep its first {max_tokens} tokens"
            )
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_prompt(messages: Conversation | Iterable[MessageLike], tokenizer: BPETokenizer) -> list[int]:
    """Token ids for the model to continue with an answer: the messages, then ``<|assistant|>``.

    A :class:`Conversation` gives its :attr:`~Conversation.prompt` (the final answer is dropped),
    so the same object serves for training and for evaluation. Other messages must end with the
    user's turn.
    """
    msgs = (messages.prompt if isinstance(messages, Conversation)
            else tuple(_as_message(m) for m in messages))
    _check_order(msgs, final="user")
    ids_of = check_chat_tokenizer(tokenizer)
    ids: list[int] = []
    for m in msgs:
        ids += [ids_of[ROLE_TOKENS[m.role]], *_content_ids(m, tokenizer), ids_of[END_OF_TURN]]
    return [*ids, ids_of[ROLE_TOKENS["assistant"]]]


class ChatSession:
    """A multi-turn chat with a fine-tuned model: what ``minigpt chat`` runs in the terminal.

    :meth:`reply` streams the answer as text pieces while it is generated (bytes are decoded
    incrementally, so a character split across tokens appears whole) and stops at ``<|end|>``.
    The whole history is the prompt of the next turn. When history plus ``max_new_tokens`` no
    longer fits the model's ``block_size``, the oldest user/assistant exchanges are dropped (the
    system message stays) and :attr:`dropped_turns` counts them: the model forgets the start of a
    long chat, as every fixed-context model does.
    """

    def __init__(self, model: GPT, tokenizer: BPETokenizer, *, system: str | None = None,
                 temperature: float = 0.7, top_p: float | None = 0.9, max_new_tokens: int | None = None,
                 seed: int | None = None) -> None:
        check_chat_tokenizer(tokenizer)
        # Checked here, at the start of a chat, rather than at the first answer.
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}: they do not belong together (a tokenizer.bpe of "
                             "another run?); use the tokenizer the model was trained with")
        check_sampling(temperature=temperature, top_p=top_p)
        # <|end|> closes a turn; any other special token (a role, <|endoftext|>) ends it too, so
        # the history never holds a forged turn.
        self.stop = sorted(tokenizer.special_tokens.values())
        if max_new_tokens is None:  # half the context for the answer, half for the chat so far
            max_new_tokens = min(128, model.config.block_size // 2)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if max_new_tokens >= model.config.block_size:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the question in the model's "
                             f"block_size={model.config.block_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.system, self.temperature, self.top_p = system, temperature, top_p
        self.max_new_tokens = max_new_tokens
        self.generator = None if seed is None else torch.Generator(
            device=next(model.parameters()).device).manual_seed(seed)
        self.messages: list[Message] = []
        #: How many old exchanges were dropped so far to fit the context.
        self.dropped_turns = 0
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [Message("system", self.system)] if self.system else []
        self.dropped_turns = 0

    def forgetting_note(self) -> str:
        """What to tell the user once :attr:`dropped_turns` has grown: the one wording of the terminal
        chat and the chat window."""
        return f"the chat outgrew the model's context: its {self.dropped_turns} oldest exchange(s) are forgotten"

    def _prompt(self) -> list[int]:
        """The history as ids, oldest exchanges dropped until the answer has room."""
        room = self.model.config.block_size - self.max_new_tokens
        head = 1 if self.messages[0].role == "system" else 0
        alone = render_prompt([*self.messages[:head], self.messages[-1]], self.tokenizer)
        if len(alone) > room:
            raise ValueError(f"the message is {len(alone)} tokens long with the system message; with "
                             f"max_new_tokens={self.max_new_tokens} at most {room} fit the model's "
                             f"block_size={self.model.config.block_size}: write a shorter one")
        while len(ids := render_prompt(self.messages, self.tokenizer)) > room:
            del self.messages[head:head + 2]
            self.dropped_turns += 1
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's ``text`` and stream the assistant's answer; the answer joins the history
        even when the caller stops early (say on Ctrl-C), as far as it got."""
        self.messages.append(Message("user", text))
        try:
            prompt = self._prompt()
        except ValueError:
            self.messages.pop()
            raise
        device = next(self.model.parameters()).device
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        said: list[str] = []
        try:
            for token in stream(self.model, idx, self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, stop_tokens=self.stop, generator=self.generator):
                t = int(token[0])
                if t in self.stop:
                    break
                piece = decoder.decode(self.tokenizer.decode_bytes([t]))
                if piece:
                    said.append(piece)
                    yield piece
            tail = decoder.decode(b"", final=True)
            if tail:
                said.append(tail)
                yield tail
        finally:
            self.messages.append(Message("assistant", "".join(said)))
