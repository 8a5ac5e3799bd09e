"""The dialogue's knobs in one pydantic model, with their defaults.

Decision: the numbers that shape a conversation (how many intents a fallback suggests, after
how many fallbacks in a row a person takes over, how often a turn is retried when another
writer committed first) were spread over the policy, the Chatbot and the responses file. They
live here now, validated in one place. A domain sets them in its responses.yaml
(`handoff_after_fallbacks: 2` at the top level, as before, or a `dialogue:` section), so they
travel with the bundle; `Chatbot(dialogue=...)` overrides them for one bot. The confidence
thresholds are not here: they are fitted per model version and live in bundle.json.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DialogueConfig(BaseModel):
    """How the stateful dialogue policy behaves (docs/dialogue.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    suggestions: int = Field(default=3, ge=1, le=10, description="most intents a fallback offers as quick replies")
    handoff_after_fallbacks: int = Field(default=2, ge=1, description="consecutive fallbacks before a person takes over")
    commit_attempts: int = Field(default=5, ge=1, le=100, description="tries of one turn when another writer commits first")
