"""The HTTP API of docs/http-api.md: chat, classify, sessions, health, readiness, metrics, reload, web page."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response

from bot.validation import SESSION_ID_PATTERN, check_message

from .access import Caller, chat_session, check_classify, check_transcript, identify
from .batching import ClientBusy
from .errors import ApiError
from .protection import check_admin_token, check_metrics_token
from .runtime import Runtime, get_runtime
from .schemas import (
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
    WebSessionResponse,
)

STATIC_DIR = Path(__file__).parent / "static"

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


_REFUSAL_REASONS = {"unauthorized": "api_key", "session_expired": "session_token"}


def refused(runtime: Runtime, error: ApiError) -> ApiError:
    """Count a refusal of serve.access in the rejected-requests metric (bounded reasons), and return it."""
    runtime.metrics.rejected.labels(reason=_REFUSAL_REASONS.get(error.code, "forbidden")).inc()
    return error


async def caller(request: Request, runtime: RuntimeDep) -> Caller:
    """Chat, classify, sessions, web session tokens: who is calling (serve.access: API key, admin
    token, a web session token, or no one). The rate limit came first (serve.ratelimit).

    Dependencies are `async def` on purpose: FastAPI runs a plain `def` one in its thread pool,
    a thread hop per request for a few microseconds of work."""
    try:
        return identify(request, runtime.settings, runtime.tokens)
    except ApiError as exc:
        raise refused(runtime, exc) from None


CallerDep = Annotated[Caller, Depends(caller)]


async def admin(request: Request, runtime: RuntimeDep) -> None:
    check_admin_token(request, runtime.settings.admin_token, runtime.metrics)


async def metrics_reader(request: Request, runtime: RuntimeDep) -> None:
    """/metrics: the metrics token when one is set (no rate limit: scrapers poll on a schedule)."""
    check_metrics_token(request, runtime.settings.metrics_token, runtime.metrics)


MAX_METADATA_DEPTH = 32


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_METADATA_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_metadata(metadata: dict[str, Any] | None) -> None:
    """Metadata the session store and every later transcript can take: valid Unicode, not nested
    deeper than MAX_METADATA_DEPTH (a deeper one stored would make its transcript unreadable)."""
    if metadata is None:
        return
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise ApiError(422, "invalid_request", f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
    try:
        json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        raise ApiError(422, "invalid_request", "metadata is not valid Unicode JSON") from None


def log_fields(request: Request, **fields: Any) -> None:
    """Add fields to this request's access-log line (see serve.access_log)."""
    if not hasattr(request.state, "log"):
        request.state.log = {}
    request.state.log.update({k: v for k, v in fields.items() if v is not None})


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat", response_model=ChatResponse, tags=["chat"],
                 responses=_errors(400, 401, 403, 413, 422, 429, 503))
    async def chat(body: ChatRequest, request: Request, runtime: RuntimeDep, who: CallerDep) -> ChatResponse:
        """The bot's reply to one customer message. Omit `session_id` to start a conversation.

        With the API key: any session id except the channels' (`chatwoot:`, `generic:`, `web:`).
        With a web session token: that token's session only."""
        try:
            chosen = chat_session(who, runtime.settings, body.session_id)
        except ApiError as exc:
            raise refused(runtime, exc) from None
        check_message(body.message, limit=runtime.settings.max_message_chars)
        check_metadata(body.metadata)
        session_id = chosen or uuid.uuid4().hex
        log_fields(request, session_id=session_id, message_text=body.message)
        reply = await runtime.respond(session_id, body.message, body.metadata)
        log_fields(request, intent=reply.intent, action=reply.action, model_version=reply.model_version)
        return ChatResponse.from_reply(reply)

    @router.post("/v1/classify", response_model=ClassifyResponse, tags=["chat"],
                 responses=_errors(400, 401, 403, 413, 422, 429, 503))
    async def classify(body: ClassifyRequest, request: Request, runtime: RuntimeDep, who: CallerDep) -> ClassifyResponse:
        """Intent predictions for a batch of texts (no conversation state). Needs the API key when one is set."""
        try:
            check_classify(who, runtime.settings)
        except ApiError as exc:
            raise refused(runtime, exc) from None
        limit = runtime.settings.max_classify_texts
        if len(body.texts) > limit:
            raise ApiError(422, "too_many_texts", f"{len(body.texts):,} texts sent; the limit is {limit:,} per request")
        for i, text in enumerate(body.texts):
            check_message(text, limit=runtime.settings.max_message_chars, name=f"texts[{i}]")
        chars, most = sum(len(text) for text in body.texts), runtime.settings.max_request_chars
        if chars > most:
            raise ApiError(422, "too_much_text", f"the texts hold {chars:,} characters; the limit is {most:,} per request")
        client = getattr(request.state, "client_key", None) or (request.client.host if request.client else "unknown")
        try:
            with runtime.text_budget.hold(client, chars):
                version, predictions = await runtime.classify(body.texts)
        except ClientBusy as exc:
            runtime.metrics.rejected.labels(reason="client_busy").inc()
            raise ApiError(429, "client_busy", f"{exc}; retry when they are answered", {"Retry-After": "1"}) from None
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
                responses=_errors(401, 403, 404, 422, 429, 503))
    async def session(
        session_id: Annotated[str, PathParam(pattern=SESSION_ID_PATTERN)], request: Request, runtime: RuntimeDep,
        who: CallerDep,
    ) -> TranscriptResponse:
        """The transcript of a conversation, oldest turn first. Never public: it needs the API key (its
        namespace), the admin token (any conversation, webhooks' included) or the session's own token."""
        try:
            check_transcript(who, session_id)
        except ApiError as exc:
            raise refused(runtime, exc) from None
        log_fields(request, session_id=session_id)
        turns = await runtime.transcript(session_id)
        return TranscriptResponse(session_id=session_id, turns=[Turn.model_validate(t) for t in turns])

    @router.get("/healthz", response_model=HealthResponse, tags=["operations"])
    async def healthz(runtime: RuntimeDep) -> HealthResponse:
        """Liveness: the process answers (the model may still be loading); the model version it serves."""
        return HealthResponse(model_version=runtime.model_version)

    # HEAD on the operations routes (load balancers and uptime checks use it); hidden from the
    # schema, which would otherwise list every operation twice under one operation id.
    router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @router.get("/readyz", response_model=ReadyResponse, tags=["operations"], responses={503: {"model": ReadyResponse}})
    async def readyz(runtime: RuntimeDep) -> JSONResponse:
        """Readiness: 200 once a model is loaded and warmed, 503 before (or when loading failed)."""
        body = ReadyResponse(
            ready=runtime.ready, status=runtime.status, model_version=runtime.model_version,
            detail=runtime.not_ready_detail,
        )
        return JSONResponse(body.model_dump(), status_code=200 if runtime.ready else 503)

    router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)

    @router.get("/metrics", tags=["operations"], response_class=Response, dependencies=[Depends(metrics_reader)],
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                           **_errors(401)})
    async def metrics(runtime: RuntimeDep) -> Response:
        """Prometheus metrics: requests, latency, predictions by intent and action, batch sizes, model version.
        With SUPPORTBOT_METRICS_TOKEN set, send it as `Authorization: Bearer TOKEN`."""
        # in a thread: the outbox gauges read the database, and a database that hangs must stall the
        # scrape, not the event loop every other request runs on
        return Response(await asyncio.to_thread(runtime.metrics.render), media_type=runtime.metrics.content_type)

    @router.post("/v1/admin/reload", response_model=ReloadResponse, tags=["operations"], dependencies=[Depends(admin)],
                 responses=_errors(400, 401, 403, 409, 422, 429))
    async def reload(runtime: RuntimeDep, body: ReloadRequest | None = None) -> ReloadResponse:
        """Load a bundle (default: the one being served, re-read from disk) and swap it in without
        dropping requests. A bundle that fails to load leaves the old one serving."""
        return await runtime.reload(Path(body.model) if body and body.model else None)

    return router


def build_web_session_router() -> APIRouter:
    """`POST /v1/web/session`, served with the web page: the page's session token (serve.access)."""
    router = APIRouter()

    @router.post("/v1/web/session", response_model=WebSessionResponse, tags=["chat"], responses=_errors(401, 429))
    async def web_session(runtime: RuntimeDep, who: CallerDep) -> WebSessionResponse:
        """A session token for the web chat page: a new conversation with a server-chosen id, or, when a
        valid token is sent as `Authorization: Bearer TOKEN`, the same conversation with a later expiry.
        The token may chat in its session and read its transcript, and nothing else."""
        token, session_id, expires = runtime.tokens.mint(who.session_id if who.kind == "session" else None)
        return WebSessionResponse(session_id=session_id, token=token, expires_at=expires,
                                  expires_in=int(runtime.tokens.ttl_s))

    return router


def build_page_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return router
