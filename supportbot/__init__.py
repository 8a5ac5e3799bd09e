"""The `supportbot` command line; the parts live in bot/, finetune/ and serve/."""

__version__ = "0.1.0"
