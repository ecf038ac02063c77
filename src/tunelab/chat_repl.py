"""``tunelab chat``: the interactive session, and the one-shot answer of ``--prompt``.

What a person types at the prompt is either a message for the model or, when it starts
with ``/``, a command for tunelab (``/help``, ``/reset``, ``/exit``), which the model
never sees: a chat model would happily answer "/help" with made-up help. Ctrl-C while
an answer is being written stops that answer (the generation is cancelled at its next
token) and returns to the prompt with the conversation kept; at the prompt, Ctrl-C
twice in a row, Ctrl-D or ``/exit`` end the session.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, TextIO

from tunelab.data.records import Message
from tunelab.generation_options import GenerationOptions
from tunelab.inference import LoadedRun, generate, stream

#: The session's commands and what they do (``/help`` prints this).
COMMANDS = {
    "/help": "show this help",
    "/reset": "start a new conversation (the system prompt stays)",
    "/exit": "end the session (also /quit, Ctrl-D)",
}
_ALIASES = {"/quit": "/exit", "/clear": "/reset"}
#: Whole lines that also end the session (what people type out of habit).
_BARE_EXIT = {"exit", "quit"}
STOPPED = "[answer stopped]"


def describe_decoding(options: GenerationOptions, streaming: bool) -> str:
    """How answers are produced, in one phrase (for the banner)."""
    if options.num_beams > 1:
        how = f"beam search ({options.num_beams} beams; each answer prints when the search ends)"
    elif options.sample:
        seed = f", seed {options.seed}" if options.seed is not None else ""
        how = f"sampling (temperature {options.temperature:g}, top-p {options.top_p:g}, top-k {options.top_k}{seed})"
    else:
        how = "greedy" + ("" if streaming else ", printed whole")
    stops = f", stops at {', '.join(repr(s) for s in options.stop)}" if options.stop else ""
    return f"{how}, up to {options.max_new_tokens} new tokens{stops}"


def banner(loaded: LoadedRun, options: GenerationOptions, streaming: bool) -> str:
    """What the session starts with: which model answers, how, and how to use and leave the session."""
    cfg = loaded.cfg
    model = (f"{loaded.source} ({cfg.method.type} on {cfg.model.name_or_path}, stage {cfg.stage})"
             if loaded.method is not None else f"{loaded.source} (base model)")
    return (f"tunelab chat with {model}\n"
            f"decoding: {describe_decoding(options, streaming)}\n"
            "Type a message and press Enter. /help lists the commands; /exit or Ctrl-D ends the session; "
            "Ctrl-C stops an answer.")


def help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return ("Commands (tunelab handles them; they are never sent to the model):\n" + "\n".join(lines)
            + "\nA message that starts with / is sent when typed with //. Ctrl-C stops the answer being "
              "written; at the prompt, press it twice to leave.")


@dataclass
class ChatSession:
    """One conversation with a loaded model: the history, and how answers are produced and shown."""

    loaded: LoadedRun
    options: GenerationOptions
    streaming: bool
    system: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    history: list[Message] = field(init=False)
    #: Whether Ctrl-C stopped the last answer.
    stopped: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = [Message("system", self.system)] if self.system else []

    def answer(self, text: str) -> str:
        """Answer ``text`` in the conversation, writing the answer as it comes; returns it.

        Ctrl-C (KeyboardInterrupt) stops the answer: what was written so far stays in the
        history as the assistant's turn (the person saw it), or, if nothing was, the
        question is taken back, so the next message starts cleanly.
        """
        self.history.append(Message("user", text))
        self.stopped = False
        pieces: list[str] = []
        answers: Iterable[str] = (stream(self.loaded, self.history, self.options) if self.streaming
                                  else generate(self.loaded, [self.history], self.options))
        try:
            for piece in answers:
                pieces.append(piece)
                self.write(piece)
        except KeyboardInterrupt:
            self.stopped = True
            self.write(("" if not pieces else " ") + STOPPED)
        finally:
            close = getattr(answers, "close", None)
            if close is not None:  # a stream stops generating (and its thread ends) when closed
                close()
        self.write("\n")
        answer = "".join(pieces).strip()
        if answer:
            self.history.append(Message("assistant", answer))
        else:
            self.history.pop()
        return answer

    def write(self, text: str) -> None:
        """Show ``text`` now (answers arrive piece by piece)."""
        self.out.write(text)
        self.out.flush()


def interactive(session: ChatSession, read: Callable[[str], str] = input) -> None:
    """The read-answer loop until /exit, Ctrl-D (EOF) or two Ctrl-C in a row at the prompt."""
    _line_editing()
    say = session.write
    say(banner(session.loaded, session.options, session.streaming) + "\n")
    interrupted = False
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            say("\n")
            return
        except KeyboardInterrupt:
            if interrupted:
                say("\n")
                return
            interrupted = True
            say("\n(press Ctrl-C again, or type /exit, to leave)\n")
            continue
        interrupted = False
        if not text:
            continue
        word = text.split()[0].lower()
        command = "/exit" if text.lower() in _BARE_EXIT else _ALIASES.get(word, word)
        if command == "/exit":
            return
        if command == "/help":
            say(help_text() + "\n")
        elif command == "/reset":
            session.reset()
            say("(new conversation)\n")
        elif command.startswith("/") and not command.startswith("//"):
            say(f"unknown command {text.split()[0]}; /help lists the commands.\n")
        else:
            say("assistant> ")
            session.answer(text[1:] if text.startswith("//") else text)


def _line_editing() -> None:
    """Arrow keys and history at the prompt where the platform has GNU readline (``input`` uses it once loaded)."""
    try:
        import readline  # noqa: F401
    except ImportError:  # Windows
        pass
