"""The read API's request and response bodies (they are also its OpenAPI documentation)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from api.users import PASSWORD_MAX

ConversationStatus = Literal["open", "pending", "closed"]


def _no_nul(value: str) -> str:
    # Postgres text cannot hold NUL: refuse it here as a 422, not as a database error later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


class ErrorOut(BaseModel):
    error: str = Field(description="A code a client can branch on, e.g. not_authenticated.")
    detail: str = Field(description="What went wrong, for a human.")
    fields: list[dict[str, str]] | None = Field(
        default=None, description="422 only: each invalid field (`loc`) and what is wrong with it (`msg`)."
    )


class LoginIn(BaseModel):
    email: Text = Field(min_length=3, max_length=320)
    password: Text = Field(min_length=1, max_length=PASSWORD_MAX)


class CompanyOut(BaseModel):
    id: int
    slug: str
    name: str


class UserOut(BaseModel):
    id: int
    email: str
    name: str
    role: str
    company: CompanyOut


class SessionOut(BaseModel):
    user: UserOut
    expires_at: datetime


class ContactOut(BaseModel):
    id: int
    phone_number: str | None = Field(
        description="WhatsApp: the phone number (wa_id), null for a user who does not share it (a "
        "username user: replies cannot go out until it is known). Messenger / Instagram: the "
        "page-scoped id."
    )
    user_id: str | None = Field(
        description="WhatsApp: the business-scoped user id (BSUID), where Meta gave one."
    )
    username: str | None = Field(
        description="WhatsApp: the user's username (e.g. @pablo), where they have one."
    )
    parent_user_id: str | None = Field(description="WhatsApp: the parent BSUID of linked portfolios.")
    name: str | None


class ConversationOut(BaseModel):
    id: int
    status: ConversationStatus
    channel: str
    contact: ContactOut
    last_message_at: datetime | None
    last_message_preview: str | None
    unread_count: int
    created_at: datetime
    updated_at: datetime
    referral: dict[str, Any] | None = Field(
        description="The click-to-WhatsApp ad (or post) its first message came from, as Meta sent it."
    )


class ConversationPage(BaseModel):
    items: list[ConversationOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class StatusCounts(BaseModel):
    open: int = 0
    pending: int = 0
    closed: int = 0
    total: int = 0


class QuotedOut(BaseModel):
    external_id: str = Field(description="The quoted message's WhatsApp / Messenger id.")
    id: int | None = Field(description="Its id here; null if it is not stored (sent before, or elsewhere).")
    direction: Literal["inbound", "outbound"] | None
    type: str | None
    body: str | None = Field(description="Null if unknown, or if its sender deleted it.")


class ReactionOut(BaseModel):
    emoji: str
    contact_id: int = Field(description="Who reacted (one reaction each; the latest counts).")
    at: datetime


class MediaOut(BaseModel):
    id: str = Field(description="The file's id: `url` serves it.")
    type: str = Field(description="image, audio, voice, video, document, sticker, file.")
    mime_type: str | None
    size: int | None = Field(description="Bytes, once stored.")
    file_name: str | None
    caption: str | None
    state: Literal["pending", "stored", "failed", "expired"] = Field(
        description="pending: being fetched (`reason` says what the last attempt met); stored; "
        "failed: it cannot be fetched (`reason` says why); expired: deleted after the retention period."
    )
    reason: str | None
    url: str | None = Field(description="Where the bytes are served (Range supported), once stored.")


class MessageOut(BaseModel):
    id: int
    conversation_id: int
    external_id: str
    direction: Literal["inbound", "outbound"]
    type: str
    body: str | None = Field(description="The text (its latest edit); null when its sender deleted it.")
    status: str
    status_at: datetime | None
    error: Any = Field(
        description="What Meta said went wrong: a failed status's errors, or an inbound message's."
    )
    sent_at: datetime
    created_at: datetime
    edited_at: datetime | None = Field(description="When its sender last edited it; null if never.")
    deleted: bool = Field(
        description="Its sender deleted it (revoked): kept for audit, its content not shown."
    )
    forwarded: bool
    referral: dict[str, Any] | None = Field(
        description="The click-to-WhatsApp ad it came from, as Meta sent it."
    )
    reply_to: QuotedOut | None = Field(description="The message it replies to.")
    reactions: list[ReactionOut]
    media: list[MediaOut] = Field(description="The files it carries (photos, voice notes, documents).")


class MessagePage(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None


class ReplyIn(BaseModel):
    text: Text = Field(min_length=1, max_length=4096, description="The text to send (WhatsApp allows 4096).")
    id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{32}$",
        description="Optional idempotency id (32 lowercase hex): retrying with the same id after a "
        "503 or a lost answer never makes a second message.",
    )


class NotificationOut(BaseModel):
    id: int
    kind: str
    conversation_id: int | None
    message_id: int | None
    title: str
    body: str
    is_read: bool
    created_at: datetime


class NotificationPage(BaseModel):
    items: list[NotificationOut]
    next_cursor: str | None


class UnreadCount(BaseModel):
    unread: int


class MarkedRead(BaseModel):
    updated: int
