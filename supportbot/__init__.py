"""The `supportbot` command line; the parts live in bot/, finetune/ and serve/."""

from bot import __version__

__all__ = ["__version__"]
