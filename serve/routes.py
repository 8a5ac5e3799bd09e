"""The HTTP API of docs/http-api.md: chat, classify, sessions, health, readiness, metrics, reload, web page."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response

from bot.chatbot import Reply

from .errors import ApiError
from .protection import check_admin_token, check_api_key, check_metrics_token, check_rate_limit
from .runtime import Runtime, get_runtime
from .schemas import (
    SESSION_ID_PATTERN,
    ChatRequest,
    ChatResponse,
    ClassifyPrediction,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    HealthResponse,
    IntentScore,
    ReadyResponse,
    ReloadRequest,
    ReloadResponse,
    TranscriptResponse,
    Turn,
)

STATIC_DIR = Path(__file__).parent / "static"

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


async def protected(request: Request, runtime: RuntimeDep) -> None:
    """Chat, classify and sessions: the per-client rate limit, then the API key when one is set.

    Dependencies are `async def` on purpose: FastAPI runs a plain `def` one in its thread pool,
    a thread hop per request for a few microseconds of work."""
    check_rate_limit(request, runtime.limiter, runtime.metrics)
    check_api_key(request, runtime.settings.api_key, runtime.metrics)


async def admin(request: Request, runtime: RuntimeDep) -> None:
    check_rate_limit(request, runtime.limiter, runtime.metrics)
    check_admin_token(request, runtime.settings.admin_token, runtime.metrics)


async def metrics_reader(request: Request, runtime: RuntimeDep) -> None:
    """/metrics: the metrics token when one is set (no rate limit: scrapers poll on a schedule)."""
    check_metrics_token(request, runtime.settings.metrics_token, runtime.metrics)


def check_text(text: str, limit: int, name: str) -> None:
    """A customer text the model and the session store can take: not blank, not too long, valid Unicode."""
    if len(text) > limit:
        raise ApiError(422, "message_too_long", f"{name} is {len(text):,} characters long; the limit is {limit:,}")
    if not text.strip():
        raise ApiError(422, "invalid_request", f"{name} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_request", f"{name} is not valid Unicode text (lone surrogate)") from None


def check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    try:
        json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        raise ApiError(422, "invalid_request", "metadata is not valid Unicode JSON") from None


def log_fields(request: Request, **fields: Any) -> None:
    """Add fields to this request's access-log line (see serve.access_log)."""
    if not hasattr(request.state, "log"):
        request.state.log = {}
    request.state.log.update({k: v for k, v in fields.items() if v is not None})


def chat_response(reply: Reply) -> ChatResponse:
    return ChatResponse(
        session_id=reply.session_id,
        reply=reply.text,
        action=reply.action,
        intent=IntentScore(name=reply.intent, confidence=reply.confidence) if reply.intent else None,
        ranking=[IntentScore(name=name, confidence=p) for name, p in reply.ranking],
        quick_replies=list(reply.quick_replies),
        handed_off=reply.handed_off,
        silent=reply.silent,
        model_version=reply.model_version,
    )


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat", response_model=ChatResponse, tags=["chat"], dependencies=[Depends(protected)],
                 responses=_errors(400, 401, 413, 422, 429, 503))
    async def chat(body: ChatRequest, request: Request, runtime: RuntimeDep) -> ChatResponse:
        """The bot's reply to one customer message. Omit `session_id` to start a conversation."""
        check_text(body.message, runtime.settings.max_message_chars, "message")
        check_metadata(body.metadata)
        session_id = body.session_id or uuid.uuid4().hex
        log_fields(request, session_id=session_id, message_text=body.message)
        reply = await runtime.respond(session_id, body.message, body.metadata)
        log_fields(request, intent=reply.intent, action=reply.action, model_version=reply.model_version)
        return chat_response(reply)

    @router.post("/v1/classify", response_model=ClassifyResponse, tags=["chat"], dependencies=[Depends(protected)],
                 responses=_errors(400, 401, 413, 422, 429, 503))
    async def classify(body: ClassifyRequest, request: Request, runtime: RuntimeDep) -> ClassifyResponse:
        """Intent predictions for a batch of texts (no conversation state)."""
        limit = runtime.settings.max_classify_texts
        if len(body.texts) > limit:
            raise ApiError(422, "too_many_texts", f"{len(body.texts):,} texts sent; the limit is {limit:,} per request")
        for i, text in enumerate(body.texts):
            check_text(text, runtime.settings.max_message_chars, f"texts[{i}]")
        version, predictions = await runtime.classify(body.texts)
        log_fields(request, texts=len(body.texts), model_version=version)
        return ClassifyResponse(
            model_version=version,
            predictions=[
                ClassifyPrediction(
                    label=p.label, confidence=p.confidence, out_of_scope=p.out_of_scope,
                    ranking=[IntentScore(name=name, confidence=c) for name, c in p.ranking[: body.top_k]],
                )
                for p in predictions
            ],
        )

    @router.get("/v1/sessions/{session_id}", response_model=TranscriptResponse, tags=["chat"],
                dependencies=[Depends(protected)], responses=_errors(401, 404, 422, 429, 503))
    async def session(
        session_id: Annotated[str, PathParam(pattern=SESSION_ID_PATTERN)], request: Request, runtime: RuntimeDep
    ) -> TranscriptResponse:
        """The transcript of a conversation, oldest turn first."""
        log_fields(request, session_id=session_id)
        turns = await runtime.transcript(session_id)
        if not turns:
            raise ApiError(404, "session_not_found", "no conversation has this session id")
        return TranscriptResponse(session_id=session_id, turns=[Turn.model_validate(t) for t in turns])

    @router.get("/healthz", response_model=HealthResponse, tags=["operations"])
    async def healthz() -> HealthResponse:
        """Liveness: the process answers (the model may still be loading)."""
        return HealthResponse()

    @router.get("/readyz", response_model=ReadyResponse, tags=["operations"], responses={503: {"model": ReadyResponse}})
    async def readyz(runtime: RuntimeDep) -> JSONResponse:
        """Readiness: 200 once a model is loaded and warmed, 503 before (or when loading failed)."""
        body = ReadyResponse(
            ready=runtime.ready, status=runtime.status, model_version=runtime.model_version,
            detail=None if runtime.ready else (runtime.load_error or "the model is loading"),
        )
        return JSONResponse(body.model_dump(), status_code=200 if runtime.ready else 503)

    @router.get("/metrics", tags=["operations"], response_class=Response, dependencies=[Depends(metrics_reader)],
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                           **_errors(401)})
    async def metrics(runtime: RuntimeDep) -> Response:
        """Prometheus metrics: requests, latency, predictions by intent and action, batch sizes, model version.
        With SUPPORTBOT_METRICS_TOKEN set, send it as `Authorization: Bearer TOKEN`."""
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)

    @router.post("/v1/admin/reload", response_model=ReloadResponse, tags=["operations"], dependencies=[Depends(admin)],
                 responses=_errors(400, 401, 403, 409, 422, 429))
    async def reload(runtime: RuntimeDep, body: ReloadRequest | None = None) -> ReloadResponse:
        """Load a bundle (default: the one being served, re-read from disk) and swap it in without
        dropping requests. A bundle that fails to load leaves the old one serving."""
        return await runtime.reload(Path(body.model) if body and body.model else None)

    return router


def build_page_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return router
