"""The FastAPI application (`create_app`); `supportbot serve` runs it through serve.server.run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from bot import __version__

from .access_log import AccessLogMiddleware
from .errors import LastResortMiddleware, install_error_handlers
from .fleet import build_fleet_router
from .protection import BodyLimitMiddleware
from .ratelimit import RateLimitMiddleware
from .review import install_review
from .routes import STATIC_DIR, admin, build_page_router, build_router, build_web_session_router
from .runtime import Runtime
from .settings import Settings
from .webhooks import install_webhooks


def create_app(settings: Settings) -> FastAPI:
    """A ready-to-serve app: its `Runtime` on `app.state.runtime`, started and stopped by the lifespan.

    Other parts plug in here: `app.include_router(...)` for their routes, and
    `runtime.on_startup(hook)` / `runtime.on_shutdown(hook)` for background workers.
    """
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()  # batcher, background model load, then the on_startup hooks
        try:
            yield
        finally:
            await runtime.stop()  # on_shutdown hooks (reverse order), drain the batcher, close the store

    app = FastAPI(
        title="supportbot",
        version=__version__,
        description="Customer-service chatbot API: chat, intent classification, transcripts, operations.",
        lifespan=lifespan,
        # No "/path/" -> "/path" redirects: Starlette builds their Location from the Host header,
        # so a request with a forged Host would get a redirect to another site. A wrong path is a 404.
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    install_error_handlers(app)

    app.include_router(build_router())
    app.include_router(build_fleet_router(admin))
    install_review(app, admin)  # the review queue and its labelling page (serve/review.py)
    # Webhooks (serve/webhooks.py): their routes, and their outbox worker as runtime start/stop hooks.
    install_webhooks(app, runtime)
    if settings.web_page:
        app.include_router(build_web_session_router())
        app.include_router(build_page_router())
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Middleware, innermost first: a last-resort 500, the body limit, the rate limit, CORS, then the access log
    # and request metrics outermost so they see every answer, refusals included.
    app.add_middleware(LastResortMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=runtime.metrics)
    app.add_middleware(RateLimitMiddleware, settings=settings, metrics=runtime.metrics)  # before any body is read
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
        )
    app.add_middleware(AccessLogMiddleware, metrics=runtime.metrics, enabled=settings.access_log,
                       include_text=settings.log_message_text)
    app.openapi = lambda: _openapi_with_limits(app, settings)  # type: ignore[method-assign]
    return app


def _openapi_with_limits(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's schema, with the size limits configured for this server written in."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.get("components", {}).get("schemas", {})
        if "ChatRequest" in components:
            components["ChatRequest"]["properties"]["message"]["maxLength"] = settings.max_message_chars
        if "ClassifyRequest" in components:
            texts = components["ClassifyRequest"]["properties"]["texts"]
            texts["maxItems"] = settings.max_classify_texts
            texts.setdefault("items", {})["maxLength"] = settings.max_message_chars
        app.openapi_schema = schema
    return app.openapi_schema
