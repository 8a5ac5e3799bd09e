"""The review queue over HTTP: `GET /v1/admin/review`, `POST /v1/admin/review/labels`, and the labelling
page at `/admin/review` (bot/review.py builds the queue and keeps the corrections file).

Everything here needs the admin token: the queue shows customers' own words, which only the
reviewer may see. The page itself is static (it holds no data) and asks for the token, which it keeps
in the tab's sessionStorage and sends as `Authorization: Bearer`; nothing here logs a text.

Why the queue is cached: building it runs the serving model over every candidate (the margins and
the vectors for grouping), seconds for thousands of turns, while paging through it should be
instant. The cache key is what the queue depends on: the model version, the newest turn stored,
and the corrections file (its size and modification time), so a new turn, a reload or a label
rebuilds it and nothing stale is shown. One build runs at a time; others wait for its result.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from bot.review import (
    ORDERS_HELP,
    Queue,
    ReviewError,
    ReviewItem,
    build_queue,
    check_label,
    locked_corrections,
)

from .database import DatabaseUnavailable
from .errors import ApiError
from .runtime import Runtime
from .schemas import ErrorResponse

STATIC_DIR = Path(__file__).parent / "static"
MAX_LABEL_IDS = 1000


class ReviewItemModel(BaseModel):
    id: int = Field(..., description="the turn's number in the store; send it back to label the message")
    text: str = Field(..., description="the customer's message (shown to the reviewer only)")
    action: str = Field(..., description="what the bot did: fallback, clarify, handoff, answer or knowledge")
    intent: str | None = Field(..., description="the intent predicted when the message came in")
    confidence: float = Field(..., description="its calibrated confidence then")
    session_id: str
    at: str = Field(..., description="when the message came in (ISO 8601, UTC)")
    group: int = Field(..., description="near-duplicate group: 0 is the largest")
    group_size: int
    reason: Literal["fallback", "clarify", "handoff", "low_margin", "not_helpful"] = Field(
        ..., description="why it is queued")
    margin: float = Field(..., description="the serving model's top-1 minus top-2 probability now")
    predicted: str | None = Field(None, description="the serving model's top intent now")


class ReviewResponse(BaseModel):
    items: list[ReviewItemModel]
    total: int = Field(..., description="queued messages (all pages)")
    groups: int = Field(..., description="near-duplicate groups in the whole queue")
    offset: int
    limit: int
    model_version: str
    scanned_turns: int = Field(..., description="stored turns read to build the queue")
    labelled: int = Field(..., description="queued messages left out because they are labelled already")
    margin: float = Field(..., description="answers with a smaller margin than this are queued")
    similarity: float = Field(..., description="cosine similarity at which messages group")
    intents: list[str] = Field(..., description="the serving model's intents and the new ones labelled so far")


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[int] = Field(..., min_length=1, max_length=MAX_LABEL_IDS, description="item ids from GET /v1/admin/review")
    target: Literal["intent", "new_intent", "out_of_scope"]
    intent: str | None = Field(None, min_length=1, max_length=64, description="the intent (not for out_of_scope)")
    whole_group: bool = Field(False, description="label every message of the ids' groups")


class LabelResponse(BaseModel):
    label: str = Field(..., description="the intent written, or oos for out of scope")
    new_intent: bool
    labelled: int = Field(..., description="texts added to the corrections file")
    already_labelled: int = Field(..., description="texts the file had already (their first label is kept)")
    corrections: int = Field(..., description="labelled texts in the corrections file now")


class ReviewService:
    """The cached queue of one app (see the module docstring)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._queue: Queue | None = None
        self._key: tuple[Any, ...] | None = None
        self._lock = asyncio.Lock()

    @property
    def corrections_path(self) -> Path:
        return self.runtime.settings.corrections_path

    def _corrections_stamp(self) -> tuple[int, int]:
        try:
            stat = os.stat(self.corrections_path)
        except FileNotFoundError:
            return (0, 0)
        return (stat.st_size, stat.st_mtime_ns)

    async def queue(self) -> Queue:
        runtime = self.runtime
        chatbot = runtime.chatbot  # NotReady (503) while no model is loaded
        settings = runtime.settings
        async with self._lock:
            try:
                turns = await asyncio.to_thread(runtime.store.recent_turns, settings.review_max_turns)
            except DatabaseUnavailable as exc:
                raise runtime.database_down(exc) from None
            key = (chatbot.version, turns[-1]["seq"] if turns else 0, len(turns), self._corrections_stamp())
            if self._queue is not None and self._key == key:
                return self._queue

            def build() -> Queue:
                with locked_corrections(self.corrections_path) as corrections:
                    labelled = corrections.labelled()
                return build_queue(turns, chatbot.classifier, similarity=settings.review_similarity, labelled=labelled)

            try:
                self._queue = await asyncio.to_thread(build)
            except ReviewError as exc:
                raise ApiError(409, "corrections_unusable", str(exc)) from None
            self._key = key
            return self._queue

    async def label(self, body: LabelRequest) -> LabelResponse:
        queue = await self.queue()
        missing = [i for i in body.ids if i not in queue.by_id]
        if missing:
            raise ApiError(409, "not_in_queue", f"{len(missing)} of the {len(body.ids)} ids are not in the queue "
                                                "(labelled already, or no longer queued): reload the queue")
        items: list[ReviewItem] = [queue.by_id[i] for i in dict.fromkeys(body.ids)]
        if body.whole_group:
            groups = {item.group for item in items}
            items = [item for item in queue.items if item.group in groups]
        known = list(self.runtime.chatbot.classifier.labels)

        def write() -> LabelResponse:
            with locked_corrections(self.corrections_path) as corrections:
                label, new = check_label(body.target, body.intent, known, corrections)
                added, already = corrections.add([item.text for item in items], label, new=new)
                return LabelResponse(label=label, new_intent=new, labelled=added, already_labelled=already,
                                     corrections=corrections.count())

        try:
            return await asyncio.to_thread(write)
        except ReviewError as exc:
            raise ApiError(422, "invalid_label", str(exc)) from None

    async def intents(self) -> list[str]:
        known = list(self.runtime.chatbot.classifier.labels)

        def read() -> list[str]:
            with locked_corrections(self.corrections_path) as corrections:
                return sorted(corrections.new_intents - set(known))

        try:
            return known + await asyncio.to_thread(read)
        except ReviewError as exc:
            raise ApiError(409, "corrections_unusable", str(exc)) from None


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def install_review(app: FastAPI, admin_dependency: Any) -> None:
    """The review routes and page on `app` (its runtime must be on app.state.runtime)."""
    service = ReviewService(app.state.runtime)
    app.state.review = service
    router = APIRouter()

    @router.get("/v1/admin/review", response_model=ReviewResponse, tags=["review"],
                dependencies=[Depends(admin_dependency)], responses=_errors(401, 403, 409, 422, 429, 503))
    async def review(
        offset: Annotated[int, Query(ge=0, le=1_000_000, description="items to skip")] = 0,
        limit: Annotated[int, Query(ge=1, le=500, description="items per page")] = 50,
        group: Annotated[int | None, Query(ge=0, le=1_000_000, description="only this group")] = None,
        reason: Annotated[Literal["fallback", "clarify", "handoff", "low_margin", "not_helpful"] | None,
                          Query(description="only items queued for this reason")] = None,
        order: Annotated[Literal["group", "label"], Query(description=ORDERS_HELP)] = "group",
    ) -> ReviewResponse:
        """The review queue: customer messages the bot did not understand, near-duplicates grouped,
        the largest group first (docs/review.md). Needs the admin token."""
        queue = await service.queue()
        items = [i for i in queue.listed(order)
                 if (group is None or i.group == group) and (reason is None or i.reason == reason)]
        return ReviewResponse(
            items=[ReviewItemModel.model_validate(item, from_attributes=True) for item in items[offset: offset + limit]],
            total=len(items), groups=queue.groups, offset=offset, limit=limit, model_version=queue.model_version,
            scanned_turns=queue.scanned_turns, labelled=queue.labelled, margin=queue.margin,
            similarity=queue.similarity, intents=await service.intents(),
        )

    @router.post("/v1/admin/review/labels", response_model=LabelResponse, tags=["review"],
                 dependencies=[Depends(admin_dependency)], responses=_errors(400, 401, 403, 409, 413, 422, 429, 503))
    async def label(body: LabelRequest) -> LabelResponse:
        """Label queued messages (or their whole groups) with an existing intent, a new intent, or out of
        scope: appended to the corrections file (docs/review.md); labelled messages leave the queue."""
        return await service.label(body)

    app.include_router(router)

    page = APIRouter(include_in_schema=False)

    @page.api_route("/admin/review", methods=["GET", "HEAD"])
    async def review_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "review.html", headers={"Cache-Control": "no-cache"})

    @page.api_route("/admin/review.js", methods=["GET", "HEAD"])
    async def review_script() -> FileResponse:
        return FileResponse(STATIC_DIR / "review.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    app.include_router(page)

