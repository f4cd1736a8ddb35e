"""A chat window for a notebook: a text box and a transcript that streams the model's reply.

Live (a kernel), the page sends each line to Python, where a :class:`~minigpt.chat.ChatSession`
answers it; every piece of the streamed reply updates the synced ``transcript``, so the reply
grows on screen token by token. In the static book there is no model to ask: the same widget
shows the conversation recorded in the notebook (the lines given to :meth:`ChatWidget.say`),
with the text box switched off and a note that a live chat needs a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import traitlets

from minigpt.chat import ChatSession
from minigpt.viz._widget import StaticHTMLWidget, read_module


class ChatWidget(StaticHTMLWidget):
    """Chat with ``session``'s model: ``ChatWidget(ChatSession(model, tokenizer))``, then display it.

    :meth:`say` is what the text box calls; call it from Python to record a conversation that the
    static copy will show. ``/reset`` (or the button) forgets the conversation."""

    _esm = read_module("chat.js")
    _widget_name = "chat"
    _static_traits = ("transcript", "busy")

    transcript = traitlets.List().tag(sync=True)  # [{"role": "user" | "assistant" | "note", "content": str}]
    busy = traitlets.Bool(False).tag(sync=True)

    def __init__(self, session: ChatSession, *, title: str = "Chat with the model", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self._data = {"title": title}
        self.on_msg(self._on_message)

    def say(self, text: str) -> str:
        """Send ``text`` as the user's next turn; the reply streams into the transcript and is returned."""
        text = text.strip()
        if not text:
            return ""
        if text == "/reset":
            self.reset()
            return ""
        before = self.session.dropped_turns
        self.transcript = [*self.transcript, {"role": "user", "content": text},
                           {"role": "assistant", "content": ""}]
        self.busy = True
        reply = ""
        try:
            for piece in self.session.reply(text):
                reply += piece
                self.transcript = [*self.transcript[:-1], {"role": "assistant", "content": reply}]
        except ValueError as err:  # a message the chat format refuses, such as a typed <|end|>
            self.transcript = [*self.transcript[:-2], {"role": "note", "content": str(err)}]
        finally:
            self.busy = False
        if self.session.dropped_turns > before:
            self.transcript = [*self.transcript, {"role": "note", "content": self.session.forgetting_note()}]
        return reply

    def reset(self) -> None:
        """Forget the conversation (the model's and the transcript's)."""
        self.session.reset()
        self.transcript = []

    def record(self, lines: Iterable[str]) -> ChatWidget:
        """:meth:`say` each line in turn: a conversation for the static copy to show."""
        for line in lines:
            self.say(line)
        return self

    def static_state(self) -> dict[str, Any]:
        return {**super().static_state(), "static": True}

    def _on_message(self, _widget: Any, content: dict[str, Any], _buffers: Any) -> None:
        if content.get("type") == "say":
            self.say(str(content.get("text", "")))
        elif content.get("type") == "reset":
            self.reset()
