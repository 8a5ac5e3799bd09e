"""The HTTP API's request and response models: what /docs and /openapi.json describe.

Size limits that operators can change (message length, texts per classify request) are
checked against the settings in the routes; `app.openapi()` writes the configured values
into these schemas (serve.app), so the published schema states the limits in force.

`ChatResponse` is the one reply schema: /v1/chat answers it, and the generic webhook carries
it as its `reply` (inline and in callbacks). It is built from the bot's Reply in one place,
`ChatResponse.from_reply`, so a new reply field is added here (field + one line there) and
every channel has it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from bot.policy import Action
from bot.validation import SESSION_ID_PATTERN

# What the schema says of a customer text: at least one character that is not white space (the
# server refuses blank texts with 422). Checked by bot.validation.check_message, stated here.
NOT_BLANK: JsonDict = {"pattern": r"\S"}

if TYPE_CHECKING:
    from bot.chatbot import Reply

class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatRequest(_Request):
    session_id: str | None = Field(
        None, pattern=SESSION_ID_PATTERN,
        description="the conversation; omit it to start a new one (the reply carries the new id)",
        examples=["c0ffee42"],
    )
    message: str = Field(..., min_length=1, description="the customer's message (not blank)",
                         examples=["where is my order #48213"], json_schema_extra=NOT_BLANK)
    metadata: dict[str, Any] | None = Field(None, description="free-form context stored with the turn (channel, locale, ...)")


class IntentScore(BaseModel):
    name: str
    confidence: float = Field(..., ge=0, le=1, description="calibrated probability")


class SourceModel(BaseModel):
    title: str = Field(..., description="the help-centre article's title")
    url: str = Field(..., description="the article's link")
    score: float = Field(..., description="the article's retrieval score, compared with the bundle's fitted floor: its best passage's cosine with the message, plus the bundle's weights times its best known question's and best sentence's (docs/knowledge.md)")
    passage_id: str = Field(..., description="which passage of the article was quoted (<slug>#<n>)")


class ChatResponse(BaseModel):
    """The bot's reply to one message, the same on every channel (see the module docstring)."""

    session_id: str
    reply: str = Field(..., description='what the bot says; "" when it stays silent (a person has taken over)')
    action: Action
    intent: IntentScore | None = Field(None, description="the predicted intent (null when none applies)")
    ranking: list[IntentScore] = Field(default_factory=list, description="the top intents, best first")
    quick_replies: list[str] = Field(default_factory=list, description="suggested answers the customer can tap")
    handed_off: bool = Field(False, description="the conversation is now with a person")
    silent: bool = Field(False, description="the bot says nothing to this message")
    sources: list[SourceModel] = Field(
        default_factory=list, description='action "knowledge": the help-centre passage quoted, to show as a link; else []'
    )
    model_version: str

    @classmethod
    def from_reply(cls, reply: Reply) -> ChatResponse:
        """The one translation from the bot's Reply to the wire."""
        return cls(
            session_id=reply.session_id,
            reply=reply.text,
            action=reply.action,
            intent=IntentScore(name=reply.intent, confidence=reply.confidence) if reply.intent else None,
            ranking=[IntentScore(name=name, confidence=p) for name, p in reply.ranking],
            quick_replies=list(reply.quick_replies),
            handed_off=reply.handed_off,
            silent=reply.silent,
            sources=[SourceModel(title=s.title, url=s.url, score=s.score, passage_id=s.passage_id) for s in reply.sources],
            model_version=reply.model_version,
        )


class ClassifyRequest(_Request):
    texts: list[Annotated[str, Field(min_length=1, json_schema_extra=NOT_BLANK)]] = Field(
        ..., min_length=1, description="texts to classify (each not blank)")
    top_k: int = Field(5, ge=1, le=5, description="intents ranked per text")


class ClassifyPrediction(BaseModel):
    label: str
    confidence: float = Field(..., ge=0, le=1)
    out_of_scope: bool = Field(..., description="confidence is under the model's fallback floor")
    ranking: list[IntentScore]


class ClassifyResponse(BaseModel):
    predictions: list[ClassifyPrediction] = Field(..., description="one per text, in request order")
    model_version: str


class Turn(BaseModel):
    role: str = Field(..., description='"user" or "bot"')
    text: str
    intent: str | None = None
    confidence: float | None = None
    action: str | None = None
    model_version: str | None = None
    at: str | None = Field(None, description="when the turn happened (ISO 8601, UTC)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="the request's metadata (user turns); "
                                     "quick_replies and handed_off (bot turns)")


class TranscriptResponse(BaseModel):
    session_id: str
    turns: list[Turn]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model_version: str | None = Field(None, description="the model this replica serves (None while loading)")


class ReadyResponse(BaseModel):
    ready: bool
    status: Literal["loading", "ready", "failed"]
    model_version: str | None = None
    detail: str | None = Field(None, description="why it is not ready")


class ReloadRequest(_Request):
    model: str | None = Field(None, description="bundle directory on the server; default: the one being served")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    model: str
    seconds: float = Field(..., description="time to load and warm the new bundle")


class WebSessionResponse(BaseModel):
    session_id: str = Field(..., description="the conversation this token is bound to (chosen by the server)")
    token: str = Field(..., description="send as `Authorization: Bearer TOKEN` to /v1/chat and /v1/sessions/{id}")
    expires_at: int = Field(..., description="when the token stops working (Unix seconds)")
    expires_in: int = Field(..., description="seconds the token is valid from now")


class ErrorDetail(BaseModel):
    code: str = Field(..., examples=["invalid_request"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
