"""The session user's notifications: list, unread count, mark read."""

from __future__ import annotations

from typing import Annotated

import asyncpg
from fastapi import APIRouter, Path, Response

from api.cursor import Position
from api.deps import Paging, Scoped
from api.errors import NotFound
from api.models import MarkedRead, NotificationOut, NotificationPage, UnreadCount
from api.queries import (
    LIST_NOTIFICATIONS,
    MARK_ALL_NOTIFICATIONS_READ,
    MARK_NOTIFICATION_READ,
    UNREAD_NOTIFICATIONS,
)
from api.responses import json_response
from infra.runtime.logging import get_logger

log = get_logger("api.notifications")

router = APIRouter(prefix="/api/v1/notifications", tags=["notifications"])

NotificationId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def notification_out(row: asyncpg.Record) -> NotificationOut:
    return NotificationOut(**dict(row))


@router.get("", response_model=NotificationPage)
async def list_notifications(db: Scoped, page: Paging, response: Response) -> Response:
    """Newest first, read or not."""
    scope = (db.company_id, db.user_id)
    start = page.start("notifications", scope)
    rows = await db.fetch(LIST_NOTIFICATIONS, start.at, start.id, page.limit + 1)
    last = None
    if len(rows) > page.limit:
        last = Position(rows[page.limit - 1]["created_at"], rows[page.limit - 1]["id"])
    # JSON straight from the rows (api/responses.py): the statement selects `NotificationOut`'s
    # fields in its order.
    content = {
        "items": [dict(r) for r in rows[: page.limit]],
        "next_cursor": page.next_cursor("notifications", scope, last),
    }
    return json_response(content, response)


@router.get("/unread-count")
async def unread_count(db: Scoped) -> UnreadCount:
    return UnreadCount(unread=await db.fetchval(UNREAD_NOTIFICATIONS))


@router.post("/read-all")
async def mark_all_read(db: Scoped) -> MarkedRead:
    """Mark every unread notification read; answers how many changed."""
    status = await db.execute(MARK_ALL_NOTIFICATIONS_READ)
    updated = int(status.rsplit(" ", 1)[-1])
    log.info("notifications.marked_read", count=updated)
    return MarkedRead(updated=updated)


@router.post("/{notification_id}/read")
async def mark_read(notification_id: NotificationId, db: Scoped) -> NotificationOut:
    row = await db.fetchrow(MARK_NOTIFICATION_READ, notification_id)
    if row is None:
        raise NotFound("notification")
    return notification_out(row)
