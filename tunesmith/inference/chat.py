"""A conversation with a loaded model, shared by the CLI's `chat`, a server and the board: the history (the
run's system prompt first, so chat sees what training saw), its commands, and each reply generated from the
run's own template."""

from __future__ import annotations

from typing import Literal

from tunesmith.inference.generate import Sampling, generate_batch, stream_reply
from tunesmith.inference.loading import Loaded

Command = Literal["exit", "reset", "empty"]
COMMANDS = {"/exit": "exit", "/quit": "exit", "/reset": "reset"}


class ChatSession:
    def __init__(self, loaded: Loaded, system: str | None = None, sampling: Sampling | None = None):
        self.loaded = loaded
        self.system = system or loaded.default_system
        self.sampling = sampling or Sampling()
        self.history: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, text: str) -> Command | None:
        """What a line typed into a chat asks for, when it is not a message: exit, reset, or nothing (empty)."""
        stripped = text.strip()
        if not stripped:
            return "empty"
        return COMMANDS.get(stripped)  # type: ignore[return-value]

    def ask(self, text: str, stream: bool = False) -> str:
        """The model's reply to `text` after the conversation so far (printed as it is generated with
        `stream`); both join the history."""
        self.history.append({"role": "user", "content": text})
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        reply = (stream_reply(model, tokenizer, self.history, self.sampling) if stream
                 else generate_batch(model, tokenizer, [self.history], self.sampling)[0])
        self.history.append({"role": "assistant", "content": reply})
        return reply
