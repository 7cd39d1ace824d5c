"""Conversations of the session user's company, their messages, and agent replies."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Path, Query, Response, status

from api.cursor import Position
from api.deps import Paging, Scoped, Service
from api.errors import ApiError, InvalidCursor, NotFound
from api.metrics import REPLIES
from api.models import (
    ConversationOut,
    ConversationPage,
    ConversationStatus,
    MessageOut,
    MessagePage,
    ReplyIn,
    StatusCounts,
)
from api.queries import (
    CONVERSATION_COUNTS,
    CONVERSATION_EXISTS,
    FOLD_CONVERSATION_COUNTS,
    GET_CONVERSATION,
    LIST_CONVERSATIONS,
    LIST_CONVERSATIONS_BY_STATUS,
    LIST_MESSAGES,
    REPLY_BUMP_CONVERSATION,
    REPLY_EXISTING,
    REPLY_INSERT,
    REPLY_TARGET,
)
from api.responses import json_response
from api.service import ApiService
from infra.kafka.producer import BrokerUnavailable
from infra.kafka.topics import WUZAPI_OUTBOUND
from infra.runtime.logging import get_logger
from schemas.outbound import OutboundMessage
from schemas.previews import clip

log = get_logger("api.conversations")

router = APIRouter(prefix="/api/v1/conversations", tags=["conversations"])

# Deltas summed by a counts read above which the read folds them (a few dozen is the norm).
FOLD_ABOVE_ROWS = 256
ConversationId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def conversation_json(row: asyncpg.Record) -> dict[str, Any]:
    """A row as `ConversationOut` writes it (same keys, same order)."""
    return {
        "id": row["id"],
        "status": row["status"],
        "channel": row["channel"],
        "contact": {
            "id": row["contact_id"],
            "phone_number": row["phone_number"],
            "user_id": row["user_id"],
            "username": row["username"],
            "parent_user_id": row["parent_user_id"],
            "name": row["contact_name"],
        },
        "last_message_at": row["last_message_at"],
        "last_message_preview": row["last_message_preview"],
        "unread_count": row["unread_count"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "referral": row["referral"],
    }


def message_json(row: asyncpg.Record) -> dict[str, Any]:
    """A row as `MessageOut` writes it: the statements select its fields in its order."""
    return dict(row)


def message_out(row: asyncpg.Record) -> MessageOut:
    return MessageOut(**dict(row))


def _last(rows: list[asyncpg.Record], limit: int) -> Position | None:
    """Where the next page starts, if there is one (we fetch one row more than a page)."""
    if len(rows) <= limit:
        return None
    return Position(rows[limit - 1]["created_at"], rows[limit - 1]["id"])


# The read routes answer JSON built from the rows (api/responses.py); `response_model` keeps
# their OpenAPI schema.


@router.get("", response_model=ConversationPage)
async def list_conversations(
    db: Scoped,
    page: Paging,
    response: Response,
    status_: Annotated[ConversationStatus | None, Query(alias="status")] = None,
) -> Response:
    """Conversations, newest first (by creation: paging never repeats or skips one)."""
    scope = (db.company_id, status_)
    start = page.start("conversations", scope)
    if status_ is None:
        rows = await db.fetch(LIST_CONVERSATIONS, start.at, start.id, page.limit + 1)
    else:
        rows = await db.fetch(LIST_CONVERSATIONS_BY_STATUS, start.at, start.id, status_, page.limit + 1)
    content = {
        "items": [conversation_json(r) for r in rows[: page.limit]],
        "next_cursor": page.next_cursor("conversations", scope, _last(rows, page.limit)),
    }
    return json_response(content, response)


@router.get("/counts", response_model=StatusCounts)
async def status_counts(db: Scoped, response: Response) -> Response:
    """How many conversations are in each status."""
    rows = await db.fetch(CONVERSATION_COUNTS)
    counts: dict[str, int] = {r["status"]: r["n"] for r in rows}
    if sum(r["rows"] for r in rows) > FOLD_ABOVE_ROWS:
        # A bulk change (thousands of rows in one transaction) leaves as many deltas: the first
        # read folds them, so the next ones sum a few rows again. The answer is already known.
        try:
            await db.execute(FOLD_CONVERSATION_COUNTS)
        except asyncpg.PostgresError as exc:
            log.warning("conversations.counts_fold_failed", error=f"{type(exc).__name__}: {exc}")
    content = {
        "open": counts.get("open", 0),
        "pending": counts.get("pending", 0),
        "closed": counts.get("closed", 0),
        "total": sum(counts.values()),
    }
    return json_response(content, response)


@router.get("/{conversation_id}", response_model=ConversationOut)
async def get_conversation(conversation_id: ConversationId, db: Scoped, response: Response) -> Response:
    row = await db.fetchrow(GET_CONVERSATION, conversation_id)
    if row is None:
        raise NotFound("conversation")
    return json_response(conversation_json(row), response)


@router.get("/{conversation_id}/messages", response_model=MessagePage)
async def list_messages(
    conversation_id: ConversationId, db: Scoped, page: Paging, response: Response
) -> Response:
    """The conversation's messages, newest first."""
    scope = (db.company_id, conversation_id)
    try:
        start = page.start("messages", scope)
    except InvalidCursor:
        # An absent conversation is a 404 whatever the cursor, as it always was.
        if not await db.fetchval(CONVERSATION_EXISTS, conversation_id):
            raise NotFound("conversation") from None
        raise
    # The statement checks that the conversation is there (and not deleted) itself; only an
    # empty page costs a second statement, to tell an empty page from a 404.
    rows = await db.fetch(LIST_MESSAGES, conversation_id, start.at, start.id, page.limit + 1)
    if not rows and not await db.fetchval(CONVERSATION_EXISTS, conversation_id):
        raise NotFound("conversation")
    content = {
        "items": [message_json(r) for r in rows[: page.limit]],
        "next_cursor": page.next_cursor("messages", scope, _last(rows, page.limit)),
    }
    return json_response(content, response)


async def queue_reply(service: ApiService, record: OutboundMessage) -> None:
    """Put a stored reply on `wuzapi.outbound`; 503 `broker_unavailable` if the broker does not
    acknowledge it in time (the pending row stays: a retry with the same id queues it)."""
    try:
        await service.producer.send_all(
            WUZAPI_OUTBOUND, [(record.key, record.to_bytes())], timeout_s=service.settings.produce_timeout_s
        )
    except BrokerUnavailable as exc:
        # Not lost work: a retry with the same id queues it, and a record that timed out here
        # but landed anyway is sent once by id.
        REPLIES.labels("broker_unavailable").inc()
        log.warning(
            "reply.broker_unavailable", conversation_id=record.conversation_id, id=record.id, error=str(exc)
        )
        raise ApiError(
            503,
            "broker_unavailable",
            f"the reply is saved as pending but not queued; retry with id {record.id}",
        ) from None
    REPLIES.labels("queued").inc()
    log.info("reply.queued", conversation_id=record.conversation_id, id=record.id, kind=record.kind)


def reply_refusal(target: asyncpg.Record | None) -> ApiError | None:
    """Why a reply to this conversation (`REPLY_TARGET`'s row) cannot be sent, if it cannot."""
    if target is None:
        return NotFound("conversation")
    if target["channel"] != "whatsapp":
        return ApiError(
            409, "unsupported_channel", f"replies go out through WhatsApp, not {target['channel']}"
        )
    if target["phone_number"] is None:
        # WUZAPI addresses a user by phone number only: a reply queued now could only fail.
        who = target["username"] or "this contact"
        return ApiError(
            409,
            "contact_has_no_phone_number",
            f"{who} has not shared a phone number; replies can be sent once one is known",
        )
    return None


@router.post("/{conversation_id}/messages", status_code=status.HTTP_202_ACCEPTED)
async def reply(conversation_id: ConversationId, body: ReplyIn, db: Scoped, service: Service) -> MessageOut:
    """Send a text reply: stored at once as `pending`, then queued on `wuzapi.outbound` (202).

    503 `broker_unavailable` means it was stored but not queued: retry with the same `id`.
    """
    user = db.user
    outbound_id = body.id or uuid.uuid4().hex
    queue = True
    async with db.transaction():
        target = await db.fetchrow(REPLY_TARGET, conversation_id)
        refusal = reply_refusal(target)
        if refusal is not None:
            raise refusal
        assert target is not None
        content = {"origin": "agent", "user_id": user.id}
        row = await db.fetchrow(REPLY_INSERT, conversation_id, outbound_id, body.text, content)
        if row is None:
            # A retry with the same id finds its row: queued again only while still pending
            # (the record may never have reached the broker); past that, it was sent.
            row = await db.fetchrow(REPLY_EXISTING, outbound_id)
            if row is None or row["conversation_id"] != conversation_id or row["body"] != body.text:
                raise ApiError(409, "id_in_use", "that id belongs to another message")
            queue = row["status"] == "pending"
        else:
            preview = clip(body.text)
            await db.execute(REPLY_BUMP_CONVERSATION, conversation_id, row["id"], row["sent_at"], preview)
    if not queue:
        return message_out(row)
    record = OutboundMessage(
        id=outbound_id,
        tenant=target["slug"],
        company_id=user.company_id,
        conversation_id=conversation_id,
        to=target["phone_number"],
        kind="text",
        origin="agent",
        created_at_ms=int(time.time() * 1000),
        text=body.text,
        user_id=user.id,
    )
    await queue_reply(service, record)
    return message_out(row)
