"""The one error model: every error supportbot raises on purpose derives from `SupportbotError`.

Why one base: a caller that wants "anything supportbot refused, with a message a person can
read" catches one class. The command line does exactly that (supportbot/cli.py): whatever
`SupportbotError` reaches it is printed as ONE line and the process exits 2, so a damaged
sessions file, a bad recipe or a foreign bundle never ends in a traceback. Programming errors
(TypeError, KeyError from a bug) are not `SupportbotError`s and still show their traceback.

The base lives in bot/ because bot is the bottom layer (serve -> bot <- finetune): finetune/ and
serve/ derive their own errors from it without importing each other. Subclasses keep a builtin
second base where callers rely on it (`InvalidSessionId` is also a `ValueError`).

The message of every subclass is one line: what is wrong and where (file, field, session),
never customer text or a secret.
"""

from __future__ import annotations


class SupportbotError(Exception):
    """An error supportbot raises on purpose; `str(error)` is one line meant for a person."""
