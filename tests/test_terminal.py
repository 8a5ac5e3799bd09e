"""`supportbot chat` as a real process on the real default model: piped stdin and a pseudo-terminal."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORTBOT = [sys.executable, "-m", "supportbot.cli"]


def chat_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ, SUPPORTBOT_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", TERM="dumb")
    env.pop("SUPPORTBOT_MODEL", None)
    return env


def chat(model: Path, data_dir: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SUPPORTBOT, "chat", "--model", str(model), *extra],
        input="\n".join(lines) + "\n", capture_output=True, text=True, env=chat_env(data_dir), cwd=ROOT, timeout=300,
    )


def test_piped_conversation_with_numbered_quick_replies(shop_bundle, tmp_path):
    done = chat(shop_bundle, tmp_path, ["hi", "1", "12345", "9", "/debug", "thanks", "I want a human", "hello?", "/quit"])
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Northwind Goods support bot" in out and "/quit" in out
    assert re.search(r"1\) \S", out)  # quick replies are numbered
    greeting_options = re.search(r"bot> .*\n\s+1\) (.+?)   2\)", out).group(1)
    assert f"  -> {greeting_options}" in out  # "1" sent the first quick reply's text
    assert "#12345" in out  # the bare number answered the order number question
    assert "(pick 1-" in out  # 9 is not one of the options
    assert "[answer: thanks" in out  # /debug shows intent and action
    assert "handed over to a person" in out
    assert "bot stays silent" in out and out.count("bot> ") == 5  # nothing said after the handoff


def test_session_continues_across_runs_and_reset(shop_bundle, tmp_path):
    first = chat(shop_bundle, tmp_path, ["where is order 48213", "/quit"], "--session", "alice")
    assert first.returncode == 0, first.stderr
    second = chat(shop_bundle, tmp_path, ["/transcript", "I want to return it", "/reset", "I want to return it"],
                  "--session", "alice")
    assert second.returncode == 0, second.stderr  # stdin ends: Ctrl-D
    assert "user: where is order 48213" in second.stdout  # the first run's turns
    replies = re.findall(r"bot> (.*)", second.stdout)
    assert "#48213" in replies[0]  # the order number is still in the session
    assert "(new conversation)" in second.stdout and "#48213" not in replies[1]


def test_a_bad_model_is_one_clear_error(tmp_path):
    done = chat(tmp_path / "nothing-here", tmp_path, ["hi"])
    assert done.returncode == 2
    assert "supportbot chat: error:" in done.stderr and "Traceback" not in done.stderr


class Pty:
    """A child process on a pseudo-terminal: what a user typing in a terminal sees."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 240.0) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"process ended waiting for {pattern!r}; output:\n{self.seen}")
                self.seen += chunk.decode(errors="replace")
        return self.seen

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs a POSIX pseudo-terminal")
def test_terminal_with_readline_line_editing(shop_bundle, tmp_path):
    term = Pty([*SUPPORTBOT, "chat", "--model", str(shop_bundle)], chat_env(tmp_path))
    try:
        term.expect(r"you> ")
        term.send("/debug\r")
        term.expect(r"debug on.*\n.*you> ")
        # readline editing (not the tty's own line discipline): type "i", Ctrl-A to go to the
        # start of the line, type "h": the bot receives "hi"
        term.send("i\x01h\r")
        term.expect(r"bot> .*\n.*\[answer: greet .*\n.*1\) ")
        term.send("2\r")
        term.expect(r"-> .+\r?\nbot> [^\n]*\n(?:[^\n]*\n)*you> ")  # the reply, then the next prompt
        term.send("\x04")  # Ctrl-D at the prompt ends the chat
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    history = tmp_path / "chat_history"
    assert history.is_file() and "hi" in history.read_text()  # readline history is kept between runs
