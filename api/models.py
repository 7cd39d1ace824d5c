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
    phone_number: str
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


class ConversationPage(BaseModel):
    items: list[ConversationOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class StatusCounts(BaseModel):
    open: int = 0
    pending: int = 0
    closed: int = 0
    total: int = 0


class MessageOut(BaseModel):
    id: int
    conversation_id: int
    external_id: str
    direction: Literal["inbound", "outbound"]
    type: str
    body: str | None
    status: str
    status_at: datetime | None
    error: Any
    sent_at: datetime
    created_at: datetime


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
