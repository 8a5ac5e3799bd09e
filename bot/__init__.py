"""supportbot runtime: model bundle, intent classifier, dialogue policy, responses, sessions."""

__version__ = "0.1.0"
