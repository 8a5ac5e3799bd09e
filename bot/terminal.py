"""`supportbot chat`: a conversation with the bot in the terminal.

Line editing and history come from `readline`; quick replies are printed as numbered options and
typing the number sends that option's text. Turns are stored like any other session (in
$SUPPORTBOT_DATA_DIR/sessions.sqlite3), so `--session ID` continues a conversation.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .chatbot import Chatbot, InvalidMessage, Reply
from .sessions import SessionStore, SQLiteSessionStore, default_sessions_path

HISTORY_FILE = "chat_history"
HELP = """\
Commands:
  /help        this list
  /reset       start a new conversation in this session (the transcript is kept)
  /release     a person had the conversation: give it back to the bot
  /transcript  show this session's transcript
  /debug       show or hide the intent, confidence and action of each reply
  /quit        leave (Ctrl-D works too)
A number picks one of the numbered quick replies."""


class TerminalChat:
    """The read-reply loop, with input and output passed in so it can run on any stream."""

    def __init__(self, bot: Chatbot, session_id: str, out: TextIO, *, debug: bool = False):
        self.bot = bot
        self.session_id = session_id
        self.out = out
        self.debug = debug
        self.options: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def banner(self) -> None:
        self.say(f"{self.bot.domain.shop_name} support bot | model {self.bot.version} | session {self.session_id}")
        self.say("Type a message; a number picks a quick reply. /help for commands, /quit or Ctrl-D to leave.")
        self.say()

    def loop(self, read: Callable[[str], str]) -> int:
        self.banner()
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say()
                return 0
            if not self.handle(line.strip()):
                return 0

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the user wants to leave."""
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line.lower())
        if line.isdigit() and self.options:
            number = int(line)
            if not 1 <= number <= len(self.options):
                self.say(f"(pick 1-{len(self.options)}, or type a message)")
                return True
            line = self.options[number - 1]
            self.say(f"  -> {line}")
        try:
            reply = self.bot.respond(self.session_id, line, metadata={"channel": "terminal"})
        except InvalidMessage as exc:
            self.say(f"({exc})")
            return True
        self.show(reply)
        return True

    def show(self, reply: Reply) -> None:
        if reply.silent:
            self.options = []
            self.say("(a person has this conversation, so the bot stays silent; /release gives it back to the bot)")
            return
        self.say(f"bot> {reply.text}")
        for source in reply.sources:
            self.say(f"     source: {source.title} <{source.url}>")
        if self.debug:
            top = ", ".join(f"{name} {p:.2f}" for name, p in reply.ranking[:3])
            self.say(f"     [{reply.action}: {reply.intent} {reply.confidence:.2f}; ranking {top}]")
        self.options = list(reply.quick_replies)
        if self.options:
            self.say("     " + "   ".join(f"{i}) {text}" for i, text in enumerate(self.options, start=1)))
        if reply.action == "handoff":
            self.say("(handed over to a person: the bot stays silent until /release)")

    def command(self, command: str) -> bool:
        if command in ("/quit", "/exit", "/q"):
            return False
        if command == "/help":
            self.say(HELP)
        elif command == "/reset":
            self.bot.reset(self.session_id)
            self.options = []
            self.say("(new conversation)")
        elif command == "/release":
            self.bot.release(self.session_id)
            self.say("(the bot answers again)")
        elif command == "/transcript":
            for turn in self.bot.transcript(self.session_id):
                label = f"{turn['action']}: {turn['intent']} {turn['confidence']:.2f}" if turn["intent"] else turn["action"]
                self.say(f"  {turn['at'][11:19]} {turn['role']:>4}: {turn['text'] or '(silent)'}  [{label}]")
        elif command == "/debug":
            self.debug = not self.debug
            self.say(f"(debug {'on' if self.debug else 'off'})")
        else:
            self.say(f"(unknown command {command}; /help lists them)")
        return True


def _readline_input(history: Path | None) -> Callable[[str], str]:
    """`input` with readline editing and a history file when the terminal is interactive."""
    if not sys.stdin.isatty():
        return input
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return input
    if history is not None:
        try:
            readline.read_history_file(history)
        except OSError:
            pass
        readline.set_history_length(1000)
        import atexit

        def save() -> None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass

        atexit.register(save)
    return input


def run(model: Path, session_id: str | None = None, *, store: SessionStore | None = None) -> int:
    """Talk to the bundle at `model` in this terminal; returns the exit status."""
    own_store = store is None
    store = store if store is not None else SQLiteSessionStore()  # a damaged store fails before the slow part
    print(f"Loading the model from {model} ...", file=sys.stderr, flush=True)
    try:
        bot = Chatbot.from_bundle(model, store)
        session = session_id or f"terminal-{uuid.uuid4().hex[:8]}"
        history = default_sessions_path().parent / HISTORY_FILE
        return TerminalChat(bot, session, sys.stdout).loop(_readline_input(history))
    finally:
        if own_store:
            store.close()
