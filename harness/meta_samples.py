"""Realistic Meta webhook payloads for tests and for ``cortexx simulate``.

Builds the JSON bodies Meta POSTs to a webhook endpoint:

* WhatsApp Cloud API: ``object == "whatsapp_business_account"``, ``entry[].id`` is the
  WABA id, ``entry[].changes[]`` with ``field == "messages"`` and a ``value`` holding
  ``messaging_product``, ``metadata``, ``contacts[]``, ``messages[]`` and/or ``statuses[]``.
  Other fields (``account_update``, ``message_template_status_update``...) have their own
  ``value`` shapes.
* Messenger: ``object == "page"``, ``entry[].id`` is the Page id, ``entry[].time`` is in
  milliseconds and ``entry[].messaging[]`` holds one event with ``sender``, ``recipient``,
  ``timestamp`` (ms) and ``message`` (``mid``, ``text``, ``attachments``).
* Instagram messaging: ``object == "instagram"``, same messaging shape, and ``entry[].id``
  is the Instagram professional account id.

The shapes follow Meta's webhook references (WhatsApp "messages" webhook reference for each
message type and for statuses, Messenger "messages" webhook event reference, Instagram
webhook examples) and real captured payloads. WhatsApp timestamps are unix seconds as
strings; Messenger/Instagram timestamps are integer milliseconds, as Meta sends them.

:func:`build_plan` builds a whole deterministic stream (one ``random.Random(seed)``), with
batched envelopes, out-of-order statuses and re-sent duplicates, plus the outcome a correct
consumer must reach (:class:`SimulationPlan.expected`). :func:`sign` gives the
``X-Hub-Signature-256`` header value for a body.

Only the standard library is used; nothing here imports the rest of the project.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import random
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.graph_sim import auto_sha256_b64

__all__ = [
    "MESSAGE_TYPES",
    "STATUSES",
    "USER_KINDS",
    "ExpectedEdit",
    "ExpectedMessage",
    "ExpectedReaction",
    "ExpectedRevoke",
    "ExpectedUser",
    "SimulationPlan",
    "build_plan",
    "final_status_of",
    "messenger_envelope",
    "messenger_message",
    "sign",
    "wa_change",
    "wa_contact",
    "wa_edit",
    "wa_envelope",
    "wa_message",
    "wa_other_change",
    "wa_reaction",
    "wa_revoke",
    "wa_status",
]

MESSAGE_TYPES: tuple[str, ...] = (
    "text",
    "image",
    "audio",
    "video",
    "document",
    "sticker",
    "location",
    "contacts",
    "interactive",
    "button",
    "reaction",
    "order",
    "system",
    "unsupported",
)
"""Every inbound WhatsApp ``messages[].type`` this module can build."""

USER_KINDS: tuple[str, ...] = ("bsuid", "username", "phone")
"""How :func:`build_plan`'s WhatsApp users are known, in the order it gives them out: by BSUID
and phone (a user who shares their number, since 2026); by BSUID and username, with no phone in
any payload; by phone alone (payloads from before BSUIDs)."""

# What each inbound item of a plan's user is, in turn (reactions, edits, revokes are no messages).
_PLAN_SLOTS: tuple[str, ...] = (*MESSAGE_TYPES, "edit", "revoke")

STATUSES: tuple[str, ...] = ("sent", "delivered", "read", "played", "failed")
"""WhatsApp ``statuses[].status`` values for messages the business sent."""

_STATUS_RANK: dict[str, int] = {"sent": 1, "delivered": 2, "read": 3, "played": 4}

ERROR_CODES_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"

# code -> (title, details).  For webhook errors Meta repeats the title in ``message``.
_WA_ERRORS: dict[int, tuple[str, str]] = {
    131026: (
        "Message undeliverable",
        "Message Undeliverable.",
    ),
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the "
        "customer last replied to this number.",
    ),
    131049: (
        "This message was not delivered to maintain healthy ecosystem engagement.",
        "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
    ),
    131050: (
        "Unable to deliver the message. This recipient has chosen to stop receiving "
        "marketing messages on WhatsApp from your business",
        "The user has stopped marketing messages from this business.",
    ),
    131000: (
        "Something went wrong",
        "Message failed to send due to an unknown error.",
    ),
}
_FAILED_CODES: tuple[int, ...] = (131026, 131047, 131049, 131050, 131000)

# --------------------------------------------------------------------------- content pools

_TEXTS: tuple[str, ...] = (
    "Hi! Is my order on its way?",
    "Hello, I'd like to book a table for 4 tonight at 8pm",
    "Can you send me the invoice for last month please?",
    "Thanks, that worked 👍",
    "What are your opening hours on Sunday?",
    "Olá, vocês entregam em Campinas?",
    "Hola, ¿tienen esta talla en azul?",
    "Bonjour, je n'ai toujours pas reçu mon colis",
    "Hallo, kann ich den Termin auf Freitag verschieben?",
    "I was charged twice for order #48213",
    "ok",
    "Yes please",
    "Is there a discount for students?",
    "My tracking number says delivered but nothing arrived 😕",
    "Could someone call me back? +44 20 7946 0018",
    "Perfect, see you then!",
    "नमस्ते, मेरा रिफंड कब आएगा?",
    "I need to change the delivery address to 221B Baker Street",
)
_CAPTIONS: tuple[str, ...] = (
    "This is the damaged box",
    "Receipt attached",
    "Is this the right one?",
    "Screenshot of the error",
    "",
)
_DOCUMENTS: tuple[tuple[str, str], ...] = (
    ("invoice_2024_118.pdf", "application/pdf"),
    ("Contract signed.pdf", "application/pdf"),
    ("order-list.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    ("CV_2025.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    ("photo_scan.jpg", "image/jpeg"),
)
_PLACES: tuple[tuple[float, float, str, str], ...] = (
    (37.4848, -122.1484, "Meta Headquarters", "1 Hacker Way, Menlo Park, CA 94025"),
    (51.5033, -0.1196, "London Eye", "Riverside Building, County Hall, London SE1 7PB"),
    (-23.5614, -46.6559, "MASP", "Av. Paulista, 1578 - Bela Vista, São Paulo - SP, 01310-200"),
    (19.4326, -99.1332, "Zócalo", "Plaza de la Constitución S/N, Centro, 06000 Ciudad de México"),
    (28.6129, 77.2295, "India Gate", "Kartavya Path, India Gate, New Delhi, Delhi 110001"),
    (52.5163, 13.3777, "Brandenburger Tor", "Pariser Platz, 10117 Berlin"),
)
_BUTTON_REPLIES: tuple[tuple[str, str], ...] = (
    ("confirm_booking", "Confirm"),
    ("reschedule", "Reschedule"),
    ("cancel_order", "Cancel order"),
    ("talk_to_agent", "Talk to an agent"),
    ("yes", "Yes"),
    ("no", "No"),
)
_LIST_REPLIES: tuple[tuple[str, str, str], ...] = (
    ("track_order", "Track my order", "See where your parcel is"),
    ("returns", "Returns & refunds", "Start a return or check a refund"),
    ("opening_hours", "Opening hours", "Store hours for this week"),
    ("plan_basic", "Basic plan", "€9.99/month, 1 user"),
    ("plan_pro", "Pro plan", "€24.99/month, up to 5 users"),
)
_TEMPLATE_BUTTONS: tuple[tuple[str, str], ...] = (
    ("STOP_PROMOTIONS", "Stop promotions"),
    ("CONFIRM_APPOINTMENT", "Confirm appointment"),
    ("RESCHEDULE", "Reschedule"),
    ("YES_INTERESTED", "Yes, I'm interested"),
)
_EMOJIS: tuple[str, ...] = ("👍", "❤️", "😂", "😮", "😢", "🙏")
_PRODUCTS: tuple[tuple[str, float], ...] = (
    ("SKU-TSHIRT-BLK-M", 19.9),
    ("SKU-MUG-WHT", 8.5),
    ("SKU-CAP-NVY", 14.0),
    ("SKU-HOODIE-GRY-L", 49.0),
    ("SKU-SOCKS-3PK", 9.99),
)
_ADS: tuple[tuple[str, str], ...] = (
    ("Chat with us", "Summer Succulents are here!"),
    ("20% off this week", "Tap to order on WhatsApp"),
    ("Book your table", "Message us to reserve tonight"),
    ("Free delivery", "Ask us about your order"),
)
_SYSTEM_CHANGED_NUMBER = "customer_changed_number"

# (ISO country, calling code, currency, given names, family names)
_COUNTRIES: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "US",
        "1",
        "USD",
        ("James", "Emily", "Michael", "Ashley", "Tyler", "Jasmine"),
        ("Johnson", "Williams", "Brown", "Miller", "Davis", "Garcia"),
    ),
    (
        "GB",
        "44",
        "GBP",
        ("Oliver", "Amelia", "Harry", "Isla", "George", "Poppy"),
        ("Smith", "Taylor", "Wilson", "Evans", "Thomas", "Roberts"),
    ),
    (
        "BR",
        "55",
        "BRL",
        ("João", "Maria", "Lucas", "Ana", "Gabriel", "Júlia"),
        ("Silva", "Santos", "Oliveira", "Souza", "Pereira", "Costa"),
    ),
    (
        "IN",
        "91",
        "INR",
        ("Aarav", "Priya", "Rohan", "Ananya", "Vikram", "Sneha"),
        ("Sharma", "Patel", "Reddy", "Iyer", "Gupta", "Nair"),
    ),
    (
        "MX",
        "52",
        "MXN",
        ("José", "Guadalupe", "Diego", "Sofía", "Alejandro", "Valeria"),
        ("Hernández", "López", "Martínez", "González", "Ramírez", "Flores"),
    ),
    (
        "DE",
        "49",
        "EUR",
        ("Lukas", "Mia", "Jonas", "Lea", "Felix", "Hannah"),
        ("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Wagner"),
    ),
    (
        "NG",
        "234",
        "NGN",
        ("Chinedu", "Ngozi", "Emeka", "Aisha", "Tunde", "Funmilayo"),
        ("Okafor", "Adeyemi", "Bello", "Okonkwo", "Eze", "Balogun"),
    ),
    (
        "ES",
        "34",
        "EUR",
        ("Pablo", "Lucía", "Javier", "Carmen", "Álvaro", "Marta"),
        ("García", "Fernández", "Rodríguez", "Sánchez", "Romero", "Navarro"),
    ),
)


# --------------------------------------------------------------------------- primitives


def sign(body: bytes, app_secret: str) -> str:
    """Return the ``X-Hub-Signature-256`` header value Meta sends for ``body``.

    That is ``"sha256=" + hex(HMAC-SHA256(app_secret, body))``, computed over the exact raw
    bytes that are POSTed.
    """
    digest = hmac.new(app_secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _digits(rng: random.Random, n: int, *, first_nonzero: bool = True) -> str:
    head = str(rng.randint(1, 9)) if first_nonzero and n > 0 else ""
    return head + "".join(str(rng.randint(0, 9)) for _ in range(n - len(head)))


def _hex(rng: random.Random, n: int, *, upper: bool = True) -> str:
    text = "".join(rng.choice("0123456789abcdef") for _ in range(n))
    return text.upper() if upper else text


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _make_wamid(rng: random.Random, wa_id: str, *, inbound: bool) -> str:
    """A wamid shaped like Meta's: base64 of a small record holding the user's number.

    Inbound ids carry a 20-char hex message key (tag 0x12), outbound ids an 18-char one
    (tag 0x11), e.g. ``wamid.HBgLMTY1MDUwNzY1MjAVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=``.
    """
    phone = wa_id.encode("ascii")
    key = (("3A" if rng.random() < 0.5 else "3EB0") + _hex(rng, 18))[:20] if inbound else (_hex(rng, 18))
    raw = (
        b"\x1c\x18"
        + bytes([len(phone)])
        + phone
        + b"\x15\x02\x00"
        + (b"\x12" if inbound else b"\x11")
        + b"\x18"
        + bytes([len(key)])
        + key.encode("ascii")
        + b"\x00"
    )
    return "wamid." + _b64(raw)


def _media_id(rng: random.Random) -> str:
    return _digits(rng, 16)


def _sha256_b64(rng: random.Random) -> str:
    return _b64(rng.randbytes(32))


def _media_url(media_id: str, rng: random.Random) -> str:
    return (
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/"
        f"?mid={media_id}&ext={rng.randint(1_700_000_000, 1_799_999_999)}"
        f"&hash=ATt{_hex(rng, 24, upper=False)}"
    )


def _wa_error(code: int) -> dict[str, Any]:
    title, details = _WA_ERRORS.get(code, _WA_ERRORS[131000])
    return {
        "code": code,
        "title": title,
        "message": title,
        "error_data": {"details": details},
        "href": ERROR_CODES_HREF,
    }


def _system_body(old_wa_id: str, new_wa_id: str, name: str) -> dict[str, Any]:
    return {
        "body": f"User {name} changed from {old_wa_id} to {new_wa_id}",
        # ``wa_id`` is the current field name; ``new_wa_id`` is what older API versions sent.
        "wa_id": new_wa_id,
        "new_wa_id": new_wa_id,
        "type": _SYSTEM_CHANGED_NUMBER,
    }


def _interactive(rng: random.Random, variant: str) -> dict[str, Any]:
    if variant == "list_reply":
        row_id, title, description = rng.choice(_LIST_REPLIES)
        return {
            "type": "list_reply",
            "list_reply": {"id": row_id, "title": title, "description": description},
        }
    button_id, title = rng.choice(_BUTTON_REPLIES)
    return {"type": "button_reply", "button_reply": {"id": button_id, "title": title}}


def _referral(rng: random.Random) -> dict[str, Any]:
    """A click-to-WhatsApp ad's ``referral``, as on the first message of a chat it started."""
    source_id = _digits(rng, 18)
    headline, body = rng.choice(_ADS)
    return {
        "source_url": f"https://fb.me/{_b64(rng.randbytes(7))[:9].replace('/', 'x').replace('+', 'y')}",
        "source_id": source_id,
        "source_type": "ad",
        "headline": headline,
        "body": body,
        "media_type": "image",
        "image_url": f"https://scontent.xx.fbcdn.net/v/t45.1600-4/{_digits(rng, 9)}_{source_id}_n.jpg",
        "ctwa_clid": "Af" + _b64(rng.randbytes(12)).rstrip("=").replace("/", "-").replace("+", "_"),
    }


# --------------------------------------------------------------------------- WhatsApp


def _sender(from_: str | None, from_user_id: str | None) -> dict[str, Any]:
    """A message's sender fields: ``from`` (the phone, where the user shares it) and
    ``from_user_id`` (the BSUID, where Meta gives one)."""
    if from_ is None and from_user_id is None:
        raise ValueError("a WhatsApp message needs from_ (a phone number) or from_user_id (a BSUID)")
    out: dict[str, Any] = {}
    if from_ is not None:
        out["from"] = from_
    if from_user_id is not None:
        out["from_user_id"] = from_user_id
    return out


def wa_message(
    msg_type: str,
    *,
    wamid: str,
    from_: str | None,
    timestamp: int,
    rng: random.Random | None = None,
    from_user_id: str | None = None,
) -> dict[str, Any]:
    """One element of ``value.messages[]`` of type ``msg_type``, as Meta sends it.

    ``from_`` is the user's wa_id (E.164 digits, no ``+``), None for a user who does not share
    it (a username user); ``from_user_id`` their business-scoped user id (BSUID, e.g.
    ``BR.1502576394655843``), None in payloads from before BSUIDs; one of the two is needed.
    ``timestamp`` is unix seconds (serialised as a string, like Meta). Content is drawn from
    ``rng`` (default: seeded from ``wamid``, so the same arguments always give the same
    message). ``interactive`` picks a ``button_reply`` or ``list_reply`` at random;
    ``interactive`` and ``button`` carry a ``context`` ``{from, id}`` pointing at the business
    message they answer (placeholder values here; :func:`build_plan` points them at real
    outbound messages). ``system`` (a changed number) needs ``from_``.
    """
    if msg_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown WhatsApp message type {msg_type!r}")
    if msg_type == "system" and from_ is None:
        raise ValueError("a changed-number system message needs the user's old number (from_)")
    r = rng if rng is not None else random.Random(wamid)
    msg: dict[str, Any] = {**_sender(from_, from_user_id), "id": wamid, "timestamp": str(timestamp)}
    placeholder_context = {
        "from": "1555" + _digits(r, 7),
        "id": _make_wamid(r, from_ or from_user_id or "", inbound=False),
    }

    if msg_type == "text":
        if r.random() < 0.1:
            msg["context"] = {"forwarded": True}
        msg["type"] = "text"
        msg["text"] = {"body": r.choice(_TEXTS)}
    elif msg_type in ("image", "video", "audio", "sticker", "document"):
        media_id = _media_id(r)
        media: dict[str, Any] = {}
        if msg_type == "image":
            caption = r.choice(_CAPTIONS)
            if caption:
                media["caption"] = caption
            media["mime_type"] = "image/jpeg"
        elif msg_type == "video":
            caption = r.choice(_CAPTIONS)
            if caption:
                media["caption"] = caption
            media["mime_type"] = "video/mp4"
        elif msg_type == "audio":
            media["mime_type"] = "audio/ogg; codecs=opus"
        elif msg_type == "sticker":
            media["mime_type"] = "image/webp"
        else:
            filename, mime = r.choice(_DOCUMENTS)
            caption = r.choice(_CAPTIONS)
            if caption:
                media["caption"] = caption
            media["filename"] = filename
            media["mime_type"] = mime
        _sha256_b64(r)  # drawn still, so the rest of the stream stays as it was
        # The hash of the file the Graph API simulator serves for this id (`--auto`).
        media["sha256"] = auto_sha256_b64(media_id)
        media["id"] = media_id
        media["url"] = _media_url(media_id, r)
        if msg_type == "audio":
            media["voice"] = r.random() < 0.7
        if msg_type == "sticker":
            media["animated"] = r.random() < 0.3
        msg["type"] = msg_type
        msg[msg_type] = media
    elif msg_type == "location":
        lat, lon, name, address = r.choice(_PLACES)
        loc: dict[str, Any] = {
            "latitude": round(lat + r.uniform(-0.001, 0.001), 7),
            "longitude": round(lon + r.uniform(-0.001, 0.001), 7),
        }
        if r.random() < 0.7:  # a chosen place; otherwise a shared current location
            loc["name"] = name
            loc["address"] = address
        msg["location"] = loc
        msg["type"] = "location"
    elif msg_type == "contacts":
        country = r.choice(_COUNTRIES)
        first, last = r.choice(country[3]), r.choice(country[4])
        card_wa_id = _phone_number(r, country[0])
        msg["contacts"] = [
            {
                "name": {
                    "first_name": first,
                    "last_name": last,
                    "formatted_name": f"{first} {last}",
                },
                "phones": [{"phone": "+" + card_wa_id, "wa_id": card_wa_id, "type": "CELL"}],
                "emails": [{"email": f"{_ascii(first)}.{_ascii(last)}@example.com", "type": "WORK"}],
            }
        ]
        msg["type"] = "contacts"
    elif msg_type == "interactive":
        msg["context"] = placeholder_context
        msg["type"] = "interactive"
        msg["interactive"] = _interactive(r, "list_reply" if r.random() < 0.5 else "button_reply")
    elif msg_type == "button":
        payload, text = r.choice(_TEMPLATE_BUTTONS)
        msg["context"] = placeholder_context
        msg["type"] = "button"
        msg["button"] = {"payload": payload, "text": text}
    elif msg_type == "reaction":
        msg["type"] = "reaction"
        msg["reaction"] = {"message_id": placeholder_context["id"], "emoji": r.choice(_EMOJIS)}
    elif msg_type == "order":
        country = r.choice(_COUNTRIES)
        items = []
        for sku, price in r.sample(_PRODUCTS, r.randint(1, 3)):
            items.append(
                {
                    "product_retailer_id": sku,
                    "quantity": r.randint(1, 4),
                    "item_price": price,
                    "currency": country[2],
                }
            )
        msg["type"] = "order"
        msg["order"] = {
            "catalog_id": _digits(r, 15),
            "text": r.choice(("", "Please gift wrap", "Deliver after 6pm please")),
            "product_items": items,
        }
    elif msg_type == "system":
        assert from_ is not None
        new_wa_id = from_[:-4] + _digits(r, 4, first_nonzero=False)
        if new_wa_id == from_:
            new_wa_id = from_[:-1] + str((int(from_[-1]) + 1) % 10)
        msg["system"] = _system_body(from_, new_wa_id, "Customer")
        msg["type"] = "system"
    else:  # unsupported
        msg["errors"] = [
            {
                "code": 131051,
                "title": "Message type unknown",
                "message": "Message type unknown",
                "error_data": {"details": "Message type is currently not supported."},
            }
        ]
        msg["type"] = "unsupported"
    return msg


def wa_status(
    status: str,
    *,
    wamid: str,
    recipient_id: str,
    timestamp: int,
    recipient_user_id: str | None = None,
) -> dict[str, Any]:
    """One element of ``value.statuses[]`` for a message the business sent.

    ``sent`` carries ``conversation`` (with ``expiration_timestamp``) and ``pricing``;
    ``delivered`` carries them without the expiration; ``read`` carries neither; ``failed``
    carries ``errors[]`` (``code, title, message, error_data.details, href``). The
    conversation id is derived from ``recipient_id`` so all statuses for one user agree.
    ``recipient_user_id`` (the recipient's BSUID) follows ``recipient_id`` where given.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown WhatsApp status {status!r}")
    out: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": str(timestamp),
        "recipient_id": recipient_id,
    }
    if recipient_user_id is not None:
        out["recipient_user_id"] = recipient_user_id
    if status in ("sent", "delivered"):
        conversation: dict[str, Any] = {
            "id": hashlib.md5(recipient_id.encode("ascii"), usedforsecurity=False).hexdigest(),
        }
        if status == "sent":
            conversation["expiration_timestamp"] = str(timestamp + 86_400)
        conversation["origin"] = {"type": "service"}
        out["conversation"] = conversation
        out["pricing"] = {
            "billable": False,
            "pricing_model": "PMP",
            "category": "service",
            "type": "free_customer_service",
        }
    elif status == "failed":
        pick = int(hashlib.sha1(wamid.encode(), usedforsecurity=False).hexdigest(), 16)
        code = _FAILED_CODES[pick % len(_FAILED_CODES)]
        out["errors"] = [_wa_error(code)]
    return out


def wa_contact(
    *,
    wa_id: str | None = None,
    user_id: str | None = None,
    name: str | None = None,
    username: str | None = None,
) -> dict[str, Any]:
    """One element of ``value.contacts[]``: ``profile`` (``name``, and ``username`` for a user
    who adopted one), ``wa_id`` only where the user shares their phone, ``user_id`` (the BSUID)
    where Meta gives one. Fields not given are left out, as Meta does."""
    if wa_id is None and user_id is None:
        raise ValueError("a contact needs a wa_id or a user_id")
    profile: dict[str, Any] = {}
    if name is not None:
        profile["name"] = name
    if username is not None:
        profile["username"] = username
    card: dict[str, Any] = {"profile": profile} if profile else {}
    if wa_id is not None:
        card["wa_id"] = wa_id
    if user_id is not None:
        card["user_id"] = user_id
    return card


def wa_reaction(
    *,
    wamid: str,
    from_: str | None,
    timestamp: int,
    target: str,
    emoji: str | None,
    from_user_id: str | None = None,
) -> dict[str, Any]:
    """A ``type == "reaction"`` message: ``reaction.message_id`` names the message reacted to;
    ``emoji`` None removes the user's reaction (Meta leaves ``emoji`` out then)."""
    part: dict[str, Any] = {"message_id": target}
    if emoji is not None:
        part["emoji"] = emoji
    return {
        **_sender(from_, from_user_id),
        "id": wamid,
        "timestamp": str(timestamp),
        "type": "reaction",
        "reaction": part,
    }


def wa_edit(
    *,
    wamid: str,
    from_: str | None,
    timestamp: int,
    target: str,
    body: str,
    from_user_id: str | None = None,
) -> dict[str, Any]:
    """A ``type == "edit"`` message (Coexistence numbers): ``edit.original_message_id`` names the
    message edited, ``edit.message`` is its new text message."""
    return {
        **_sender(from_, from_user_id),
        "id": wamid,
        "timestamp": str(timestamp),
        "type": "edit",
        "edit": {"original_message_id": target, "message": {"type": "text", "text": {"body": body}}},
    }


def wa_revoke(
    *,
    wamid: str,
    from_: str | None,
    timestamp: int,
    target: str,
    from_user_id: str | None = None,
) -> dict[str, Any]:
    """A ``type == "revoke"`` message: the user deleted ``revoke.original_message_id``."""
    return {
        **_sender(from_, from_user_id),
        "id": wamid,
        "timestamp": str(timestamp),
        "type": "revoke",
        "revoke": {"original_message_id": target},
    }


def wa_change(
    *,
    phone_number_id: str,
    display_phone_number: str,
    messages: Sequence[dict[str, Any]] = (),
    statuses: Sequence[dict[str, Any]] = (),
    contacts: Sequence[tuple[str, str] | dict[str, Any]] = (),
) -> dict[str, Any]:
    """A ``field == "messages"`` change: ``{"value": {...}, "field": "messages"}``.

    ``contacts`` are ``(wa_id, profile name)`` pairs (the shape from before BSUIDs) or whole
    ``contacts[]`` elements (:func:`wa_contact`), one per user whose messages are in
    ``messages``. Empty arrays are left out, as Meta does.
    """
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number,
            "phone_number_id": phone_number_id,
        },
    }
    if contacts:
        value["contacts"] = [
            copy.deepcopy(c) if isinstance(c, dict) else {"profile": {"name": c[1]}, "wa_id": c[0]}
            for c in contacts
        ]
    if messages:
        value["messages"] = [dict(m) for m in messages]
    if statuses:
        value["statuses"] = [dict(s) for s in statuses]
    return {"value": value, "field": "messages"}


def wa_other_change(field: str, value: dict[str, Any]) -> dict[str, Any]:
    """A change for a WABA field other than ``messages`` (``account_update``,
    ``message_template_status_update``, ``phone_number_quality_update``...)."""
    if field == "messages":
        raise ValueError("use wa_change() for the 'messages' field")
    return {"value": value, "field": field}


def wa_envelope(
    changes: Sequence[dict[str, Any]],
    *,
    waba_id: str,
    time: int | None = None,
) -> dict[str, Any]:
    """The full WhatsApp webhook body: one entry for ``waba_id`` holding all ``changes``.

    ``time`` (unix seconds) adds ``entry[].time``, which Meta sends on account-level fields
    such as ``account_update`` but not on ``messages`` changes.
    """
    entry: dict[str, Any] = {"id": waba_id}
    if time is not None:
        entry["time"] = time
    entry["changes"] = [dict(c) for c in changes]
    return {"object": "whatsapp_business_account", "entry": [entry]}


# --------------------------------------------------------------------------- Messenger / IG


def messenger_message(
    *,
    mid: str,
    sender_id: str,
    recipient_id: str,
    timestamp_ms: int,
    text: str | None = None,
    attachment_type: str | None = None,
    cdn_base: str | None = None,
) -> dict[str, Any]:
    """One ``entry[].messaging[]`` event for a message a user sent to the Page/IG account.

    ``attachment_type`` is ``image``, ``video``, ``audio`` or ``file`` (Messenger) and adds
    ``message.attachments = [{"type": ..., "payload": {"url": ...}}]``: a URL on Meta's CDN, or
    on ``cdn_base`` (the Graph API simulator, which serves it) when given. With neither text nor
    attachment a short text is used.
    """
    message: dict[str, Any] = {"mid": mid}
    if text is None and attachment_type is None:
        text = random.Random(mid).choice(_TEXTS)
    if text is not None:
        message["text"] = text
    if attachment_type is not None:
        r = random.Random(mid + attachment_type)
        ext = {"image": "jpg", "video": "mp4", "audio": "mp4", "file": "pdf"}.get(attachment_type, "bin")
        url = (
            f"https://scontent.xx.fbcdn.net/v/t1.15752-9/{_digits(r, 9)}_{_digits(r, 15)}"
            f"_{_digits(r, 19)}_n.{ext}?_nc_cat=10{r.randint(0, 9)}&ccb=1-7"
            f"&_nc_sid={_hex(r, 6, upper=False)}&oh=03_{_hex(r, 40, upper=False)}"
            f"&oe={_hex(r, 8).upper()}"
        )
        if cdn_base is not None:
            # Valid for a week from now, as Meta's CDN URLs are for days.
            url = f"{cdn_base.rstrip('/')}/cdn/{_hex(r, 24, upper=False)}?oe={int(time.time()) + 7 * 86400:x}"
        message["attachments"] = [{"type": attachment_type, "payload": {"url": url}}]
    return {
        "sender": {"id": sender_id},
        "recipient": {"id": recipient_id},
        "timestamp": timestamp_ms,
        "message": message,
    }


def messenger_envelope(
    events: Sequence[dict[str, Any]],
    *,
    page_id: str,
    object_: str = "page",
) -> dict[str, Any]:
    """The Messenger (``object_="page"``) or Instagram (``object_="instagram"``) webhook body.

    ``page_id`` is the Page id (Messenger) or the Instagram professional account id. Meta
    puts exactly one event in each ``entry[].messaging`` array, so a batch of events becomes
    several entries; ``entry[].time`` (ms) is the event's timestamp.
    """
    if object_ not in ("page", "instagram"):
        raise ValueError("object_ must be 'page' or 'instagram'")
    entries = [
        {"time": int(ev.get("timestamp", 0)) + 37, "id": page_id, "messaging": [dict(ev)]} for ev in events
    ]
    return {"object": object_, "entry": entries}


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ExpectedMessage:
    """What a correct consumer should have recorded for one message of the stream."""

    key: str  # wamid, or Messenger/Instagram mid
    channel: str  # "whatsapp" | "messenger" | "instagram"
    direction: str  # "inbound" | "outbound"
    type: str  # message type; "text" for outbound
    final_status: str  # inbound: "received"; outbound: highest status, "failed" terminal
    contact: str  # the id it was sent under or to: BSUID where there is one, else wa_id; PSID/IGSID
    user: str | None = None  # WhatsApp: the key of its user in SimulationPlan.users
    reply_to: str | None = None  # the message it quotes (context.id; a forward quotes nothing)
    forwarded: bool = False
    referral: bool = False  # it came from a click-to-WhatsApp ad (its conversation keeps it)


@dataclass(frozen=True)
class ExpectedUser:
    """A WhatsApp user of the plan, as their contact should end (after any number change)."""

    key: str  # the first id they wrote under: BSUID, else phone; stable across a number change
    kind: str  # one of USER_KINDS
    name: str
    phone: str | None  # None: a username user, whose phone is never in any payload
    user_id: str | None  # the current BSUID; None for a user known by phone alone
    username: str | None
    phones: tuple[str, ...] = ()  # every phone they wrote under, oldest first
    user_ids: tuple[str, ...] = ()  # every BSUID they had, oldest first


@dataclass(frozen=True)
class ExpectedReaction:
    """A user's reaction to one message (not a message itself): where it should end."""

    target: str  # external id of the message reacted to (the user's own, or the business's)
    user: str  # the reacting user's key in SimulationPlan.users
    emoji: str | None  # the latest reaction's emoji; None: removed
    reactions: tuple[str, ...]  # the reaction messages' own ids, in time order


@dataclass(frozen=True)
class ExpectedEdit:
    """Edits of one of a user's earlier inbound text messages: its body should be the last."""

    target: str
    user: str
    body: str  # the latest edit's text
    edits: tuple[str, ...]  # the edit messages' own ids, in time order


@dataclass(frozen=True)
class ExpectedRevoke:
    """A user deleted one of their earlier inbound messages: it should be marked deleted."""

    target: str
    user: str
    revoke: str  # the revoke message's own id


@dataclass
class SimulationPlan:
    """A deterministic stream of webhook bodies plus the outcome it should produce.

    ``expected`` holds the messages only: reactions, edits and revokes are not messages (they
    are in ``reactions``, ``edits`` and ``revokes``, by what they apply to)."""

    webhooks: list[dict[str, Any]]
    expected: dict[str, ExpectedMessage]
    duplicates: int
    contacts: dict[str, str] = field(default_factory=dict)  # wa_id/BSUID/PSID -> display name
    users: dict[str, ExpectedUser] = field(default_factory=dict)  # WhatsApp users by key
    reactions: dict[tuple[str, str], ExpectedReaction] = field(default_factory=dict)  # (target, user)
    edits: dict[str, ExpectedEdit] = field(default_factory=dict)  # by target
    revokes: dict[str, ExpectedRevoke] = field(default_factory=dict)  # by target

    def amendment_ids(self) -> set[str]:
        """The ids of every reaction, edit and revoke message: none of them is a message."""
        out = {i for r in self.reactions.values() for i in r.reactions}
        out.update(i for e in self.edits.values() for i in e.edits)
        out.update(r.revoke for r in self.revokes.values())
        return out


def final_status_of(statuses: Sequence[str]) -> str:
    """Fold statuses of one outbound message: ``failed`` wins, else highest by rank."""
    if "failed" in statuses:
        return "failed"
    return max(statuses, key=lambda s: _STATUS_RANK[s])


def _ascii(name: str) -> str:
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return folded.lower().replace(" ", "")


def _phone_number(rng: random.Random, country: str) -> str:
    """A plausible mobile number for ``country`` as E.164 digits without ``+``."""
    if country == "US":
        return "1" + str(rng.choice((212, 305, 415, 512, 617, 718, 773, 917))) + _digits(rng, 7)
    if country == "GB":
        prefix = str(rng.choice((400, 700, 800, 900, 500)))
        return "447" + prefix + _digits(rng, 6, first_nonzero=False)
    if country == "BR":
        return "55" + str(rng.choice((11, 21, 31, 41, 51, 61))) + "9" + _digits(rng, 8)
    if country == "IN":
        return "91" + str(rng.choice((7, 8, 9))) + _digits(rng, 9, first_nonzero=False)
    if country == "MX":
        return "521" + str(rng.choice((55, 33, 81))) + _digits(rng, 8)
    if country == "DE":
        return "49" + str(rng.choice((151, 152, 160, 170, 176))) + _digits(rng, 8)
    if country == "NG":
        prefix = str(rng.choice((803, 806, 810, 813, 906)))
        return "234" + prefix + _digits(rng, 7, first_nonzero=False)
    return "34" + str(rng.choice((6, 7))) + _digits(rng, 8, first_nonzero=False)


def _person(rng: random.Random, used: set[str]) -> tuple[str, str]:
    """A (number, profile name) pair, number unique within ``used``."""
    number, name, _country = _person_in(rng, used)
    return number, name


def _person_in(rng: random.Random, used: set[str]) -> tuple[str, str, str]:
    """A (number, profile name, ISO country) triple, number unique within ``used``."""
    country, _code, _cur, givens, families = rng.choice(_COUNTRIES)
    while True:
        number = _phone_number(rng, country)
        if number not in used:
            used.add(number)
            break
    given, family = rng.choice(givens), rng.choice(families)
    roll = rng.random()
    if roll < 0.6:
        name = f"{given} {family}"
    elif roll < 0.85:
        name = given
    else:
        name = f"{given} {rng.choice(('🌸', '✨', '⚽', '🙂'))}"
    return number, name, country


class _Ids:
    """Unique, Meta-shaped ids drawn from the plan's rng."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[str] = set()

    def _unique(self, make: Callable[[], str]) -> str:
        while True:
            value = make()
            if value not in self.seen:
                self.seen.add(value)
                return value

    def wamid(self, wa_id: str, *, inbound: bool) -> str:
        return self._unique(lambda: _make_wamid(self.rng, wa_id, inbound=inbound))

    def mid(self) -> str:
        return self._unique(lambda: "m_" + base64.urlsafe_b64encode(self.rng.randbytes(66)).decode()[:86])

    def ig_mid(self, ig_id: str, thread: str) -> str:
        return self._unique(
            lambda: (
                base64.b64encode(
                    f"ig_message_item:1:IGMessageThread:{ig_id}:{thread}:"
                    f"{self.rng.randint(10**37, 10**38 - 1)}".encode()
                )
                .decode()
                .rstrip("=")
            )
        )

    def numeric(self, n: int) -> str:
        return self._unique(lambda: _digits(self.rng, n))

    def bsuid(self, country: str) -> str:
        """A business-scoped user id: ISO country, a period, digits (``BR.1502576394655843``)."""
        return self._unique(lambda: f"{country}.{_digits(self.rng, self.rng.randint(16, 19))}")

    def username(self, name: str) -> str:
        """A username like WhatsApp users pick: from their name, sometimes with digits."""
        parts = [p for p in (_ascii(w) for w in name.split()) if p.isalnum()]
        base = ".".join(parts) or "user"

        def make() -> str:
            suffix = _digits(self.rng, self.rng.randint(2, 4)) if self.rng.random() < 0.5 else ""
            return f"@{base}{suffix}"

        return self._unique(make)


@dataclass(order=True)
class _Item:
    """One unit of the stream before batching."""

    ts: float
    seq: int
    family: str = field(compare=False)  # "wa_msg" | "wa_status" | "page" | "instagram" | "other"
    payload: dict[str, Any] = field(compare=False)
    contact: dict[str, Any] | None = field(compare=False, default=None)  # its contacts[] element


@dataclass
class _WaUser:
    """A WhatsApp user while the plan is built: who they are now, and what they may point at."""

    key: str
    kind: str
    name: str
    country: str
    phone: str | None
    user_id: str | None
    username: str | None
    phones: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    clock: int = 0
    referral_due: bool = False
    # What later reactions, edits, revokes and replies may point at; since the last number change.
    own: list[str] = field(default_factory=list)  # their inbound messages, not system ones
    texts: dict[str, str] = field(default_factory=dict)  # their text messages -> current body
    revoked: set[str] = field(default_factory=set)
    last_out: str | None = None  # the latest business message that reached them

    @property
    def sender(self) -> str:
        """The id their messages are filed under: the BSUID where there is one, else the phone."""
        ident = self.user_id or self.phone
        assert ident is not None
        return ident

    def card(self) -> dict[str, Any]:
        return wa_contact(wa_id=self.phone, user_id=self.user_id, name=self.name, username=self.username)

    def status_card(self, status: str) -> dict[str, Any] | None:
        """The contacts[] element of a status about a message sent to them: since BSUIDs, sent,
        delivered and read statuses carry one (the username on delivered and read); a failed
        one carries none, and payloads from before BSUIDs none either."""
        if self.user_id is None or status == "failed":
            return None
        card: dict[str, Any] = {}
        if self.username is not None and status in ("delivered", "read"):
            card["profile"] = {"username": self.username}
        card["wa_id"] = self.phone
        card["user_id"] = self.user_id
        return card

    def candidates(self) -> list[str]:
        return [w for w in self.own if w not in self.revoked]


def build_plan(
    *,
    seed: int,
    contacts: int,
    messages_per_contact: int,
    phone_number_id: str,
    display_phone_number: str,
    waba_id: str,
    page_id: str | None = None,
    duplicate_rate: float = 0.1,
    batch_max: int = 5,
    start_ts: int | None = None,
    instagram_id: str | None = None,
    other_fields: bool = True,
    cdn_base: str | None = None,
) -> SimulationPlan:
    """Build a deterministic stream of signed-ready webhook bodies and its expected outcome.

    * ``contacts`` WhatsApp users (realistic names, E.164 numbers) are known in turn as
      :data:`USER_KINDS` says: by BSUID and phone (``contacts[].user_id`` and ``wa_id``,
      ``from`` and ``from_user_id``), by BSUID and username with no phone anywhere (no
      ``wa_id``, no ``from``), and by phone alone (payloads from before BSUIDs). Each sends
      ``messages_per_contact`` inbound items whose kinds cycle over :data:`MESSAGE_TYPES` and
      then an edit and a revoke, across the whole plan (16+ items cover every kind):
      a ``reaction`` reacts to a business message or to one of the user's own (some are
      changed or removed later, some of those delivered first), an ``edit`` gives one of the
      user's earlier texts a new text (some twice), a ``revoke`` deletes one of their earlier
      messages; where there is nothing to point at yet the user first sends a text. A
      ``system`` message changes a user's number (a BSUID user gets a new BSUID with it); a
      username user sends texts instead of it, and a text quoting their own message instead of
      an interactive or button reply (no business message can reach them). Some texts quote an
      earlier message (``context.id``) or are forwards; some users' first message comes from
      a click-to-WhatsApp ad (``referral``).
    * The business sends outbound messages (only their statuses appear) to users with a
      phone. Each gets ``sent``/``delivered``/``read`` (some stop at delivered, some skip
      delivered, some fail), emitted in shuffled order in separate webhooks; status timestamps
      stay chronological, as Meta stamps them. Statuses to a user with a BSUID carry
      ``recipient_user_id`` and a contacts[] element, but a failed one neither (Meta's shape for
      a message sent to a phone number).
    * Interactive/button replies carry ``context`` pointing at a real earlier outbound
      message that reached the user.
    * Some envelopes batch up to ``batch_max`` items (several messages from different users
      in one change, several changes in one entry, several statuses in one change).
    * With ``page_id``, Messenger and Instagram users send messages too (Instagram account id
      = ``instagram_id`` or a generated one).
    * With ``other_fields``, an ``account_update`` and a ``message_template_status_update``
      envelope are mixed in (they mention no message).
    * ``round(len * duplicate_rate)`` envelopes are re-sent later in the list.
    * ``start_ts`` (unix seconds) defaults to a fixed instant so a seed always gives the
      same plan; pass ``int(time.time())`` for "now".

    The plan's ``expected`` holds every message, ``reactions``/``edits``/``revokes`` what the
    others should leave on their targets, ``users`` how each WhatsApp user's contact ends.
    """
    if contacts < 0 or messages_per_contact < 0:
        raise ValueError("contacts and messages_per_contact must be >= 0")
    if not 0.0 <= duplicate_rate <= 1.0:
        raise ValueError("duplicate_rate must be in [0, 1]")
    rng = random.Random(seed)
    ids = _Ids(rng)
    base_ts = 1_750_000_000 if start_ts is None else start_ts
    batch_max = max(1, batch_max)
    ig_id: str | None = None

    items: list[_Item] = []
    expected: dict[str, ExpectedMessage] = {}
    names: dict[str, str] = {}
    used_numbers: set[str] = set()
    users: list[_WaUser] = []
    outbound_ids: set[str] = set()
    # (target, user) -> [(at, reaction id, emoji)]; target -> [(at, edit id, body)]
    reaction_events: dict[tuple[str, str], list[tuple[int, str, str | None]]] = {}
    edit_events: dict[str, list[tuple[int, str, str]]] = {}
    revokes: dict[str, ExpectedRevoke] = {}
    seq = 0

    def add(ts: float, family: str, payload: dict[str, Any], contact: dict[str, Any] | None = None) -> None:
        nonlocal seq
        items.append(_Item(ts, seq, family, payload, contact))
        seq += 1

    def outbound(
        user: _WaUser, sent_at: int, conv_start: int, *, template: bool, arrives: bool = False
    ) -> tuple[str, bool]:
        """A business message to ``user`` (known by its statuses); whether it reached them.
        ``arrives``: one that does (a reply or a reaction will point at it)."""
        assert user.phone is not None
        wamid = ids.wamid(user.phone, inbound=False)
        roll = rng.random() * (0.80 if arrives else 1.0)
        if roll < 0.55:
            path = ["sent", "delivered", "read"]
        elif roll < 0.70:
            path = ["sent", "delivered"]
        elif roll < 0.80:
            path = ["sent", "read"]  # delivered+read together: Meta only sends read
        elif roll < 0.87:
            path = ["sent", "delivered", "failed"]
        elif roll < 0.94:
            path = ["sent", "failed"]
        else:
            path = ["failed"]
        t = sent_at
        stamped: list[tuple[int, str]] = []
        for st in path:
            t += {
                "sent": rng.randint(0, 2),
                "delivered": rng.randint(1, 6),
                "read": rng.randint(5, 900),
                "failed": rng.randint(1, 60),
            }[st]
            stamped.append((t, st))
        category = "utility" if template else "service"
        code = rng.choice(_FAILED_CODES)
        statuses = []
        for ts, st in stamped:
            s = wa_status(
                st,
                wamid=wamid,
                recipient_id=user.phone,
                timestamp=ts,
                recipient_user_id=None if st == "failed" else user.user_id,
            )
            if "conversation" in s:
                s["conversation"]["origin"]["type"] = category
                if "expiration_timestamp" in s["conversation"]:
                    s["conversation"]["expiration_timestamp"] = str(conv_start + 86_400)
                s["pricing"]["category"] = category
                if template and rng.random() < 0.5:
                    s["pricing"].update(billable=True, type="regular")
            if st == "failed":
                s["errors"] = [_wa_error(code)]
            statuses.append(s)
        # Emit out of order: shuffle which webhook slot carries which status.
        slots = [ts for ts, _ in stamped]
        order = list(range(len(statuses)))
        rng.shuffle(order)
        if order == sorted(order) and len(order) > 1 and rng.random() < 0.7:
            order.reverse()
        for slot, idx in zip(slots, order, strict=True):
            status = statuses[idx]
            add(slot + rng.random() * 3, "wa_status", status, user.status_card(status["status"]))
        expected[wamid] = ExpectedMessage(
            key=wamid,
            channel="whatsapp",
            direction="outbound",
            type="text",
            final_status=final_status_of(path),
            contact=user.sender,
            user=user.key,
        )
        outbound_ids.add(wamid)
        return wamid, path[-1] != "failed"

    def inbound(user: _WaUser, msg: dict[str, Any], msg_type: str) -> str:
        """Emit a message of ``user`` at their clock, and expect it."""
        wamid = str(msg["id"])
        if user.referral_due and msg_type != "system":
            msg["referral"] = _referral(rng)
            user.referral_due = False
        add(user.clock, "wa_msg", msg, None if msg_type == "system" else user.card())
        context = msg.get("context") or {}
        forwarded = bool(context.get("forwarded") or context.get("frequently_forwarded"))
        expected[wamid] = ExpectedMessage(
            key=wamid,
            channel="whatsapp",
            direction="inbound",
            type=msg_type,
            final_status="received",
            contact=user.sender,
            user=user.key,
            reply_to=None if forwarded else context.get("id"),
            forwarded=forwarded,
            referral="referral" in msg,
        )
        if msg_type != "system":
            user.own.append(wamid)
            if msg_type == "text":
                user.texts[wamid] = msg["text"]["body"]
        return wamid

    def quoting(user: _WaUser, quoted: str) -> dict[str, Any]:
        """The ``context`` of a reply to ``quoted``: who sent it, and its id."""
        if quoted in outbound_ids:
            return {"from": display_phone_number, "id": quoted}
        return {"from": user.phone, "id": quoted} if user.phone else {"id": quoted}

    def message(user: _WaUser, msg_type: str) -> dict[str, Any]:
        wamid = ids.wamid(user.sender, inbound=True)
        return wa_message(
            msg_type,
            wamid=wamid,
            from_=user.phone,
            from_user_id=user.user_id,
            timestamp=user.clock,
            rng=rng,
        )

    def text(user: _WaUser, quote: str | None = None) -> str:
        msg = message(user, "text")
        if quote is not None and "context" not in msg:
            msg["context"] = quoting(user, quote)
        return inbound(user, msg, "text")

    def emit_amendments(user: _WaUser, timed: list[tuple[int, dict[str, Any]]]) -> None:
        """Emit ``user``'s reactions or edits at their times; a change sometimes goes first."""
        slots = [at for at, _ in timed]
        order = list(range(len(timed)))
        if len(order) > 1 and rng.random() < 0.3:
            order.reverse()
        for slot, idx in zip(slots, order, strict=True):
            add(slot + rng.random() * 2, "wa_msg", timed[idx][1], user.card())
        user.clock = max(user.clock, *slots)

    def react(user: _WaUser, target: str) -> None:
        first = rng.choice(_EMOJIS)
        events: list[tuple[int, str, str | None]] = [
            (user.clock, ids.wamid(user.sender, inbound=True), first)
        ]
        if rng.random() < 0.4:  # changed, or removed (no emoji)
            then = None if rng.random() < 0.5 else rng.choice([e for e in _EMOJIS if e != first])
            events.append((user.clock + rng.randint(5, 600), ids.wamid(user.sender, inbound=True), then))
        timed = [
            (
                at,
                wa_reaction(
                    wamid=rid,
                    from_=user.phone,
                    from_user_id=user.user_id,
                    timestamp=at,
                    target=target,
                    emoji=emoji,
                ),
            )
            for at, rid, emoji in events
        ]
        emit_amendments(user, timed)
        reaction_events.setdefault((target, user.key), []).extend(events)

    def edit(user: _WaUser, target: str) -> None:
        events: list[tuple[int, str, str]] = []
        at, body = user.clock, user.texts[target]
        for n in range(2 if rng.random() < 0.3 else 1):
            at += rng.randint(5, 300) if n else 0
            body = rng.choice([t for t in _TEXTS if t != body])
            events.append((at, ids.wamid(user.sender, inbound=True), body))
        timed = [
            (
                at,
                wa_edit(
                    wamid=eid,
                    from_=user.phone,
                    from_user_id=user.user_id,
                    timestamp=at,
                    target=target,
                    body=body,
                ),
            )
            for at, eid, body in events
        ]
        emit_amendments(user, timed)
        edit_events.setdefault(target, []).extend(events)
        user.texts[target] = max(edit_events[target])[2]

    def revoke(user: _WaUser, target: str) -> None:
        rid = ids.wamid(user.sender, inbound=True)
        payload = wa_revoke(
            wamid=rid, from_=user.phone, from_user_id=user.user_id, timestamp=user.clock, target=target
        )
        add(user.clock, "wa_msg", payload, user.card())
        revokes[target] = ExpectedRevoke(target=target, user=user.key, revoke=rid)
        user.revoked.add(target)
        user.texts.pop(target, None)

    def change_number(user: _WaUser) -> None:
        """A ``system`` message: the user's number changed (and, since BSUIDs, their BSUID)."""
        assert user.phone is not None
        msg = message(user, "system")
        old_phone = user.phone
        while True:
            new_phone = old_phone[: len(old_phone) - 8] + _person(rng, used_numbers)[0][-8:]
            if new_phone not in used_numbers and new_phone != old_phone:
                break
        used_numbers.add(new_phone)
        if user.user_id is None:
            msg["system"] = _system_body(old_phone, new_phone, user.name)
        else:
            new_user_id = ids.bsuid(user.country)
            msg["system"] = {
                "body": f"User {user.name} changed from {old_phone} to {new_phone}",
                "wa_id": new_phone,
                "user_id": new_user_id,
                "previous_user_id": user.user_id,
                "type": "user_changed_number",
            }
            user.user_id = new_user_id
            user.user_ids.append(new_user_id)
            names[new_user_id] = user.name
        user.phone = new_phone
        user.phones.append(new_phone)
        names[new_phone] = user.name
        # Filed under the new ids; what came before is not pointed at any more.
        inbound(user, msg, "system")
        user.own, user.texts, user.last_out = [], {}, None

    # ---- WhatsApp users
    global_index = 0
    for c in range(contacts):
        kind = USER_KINDS[c % len(USER_KINDS)]
        phone, name, country = _person_in(rng, used_numbers)
        user_id = ids.bsuid(country) if kind != "phone" else None
        username = ids.username(name) if kind == "username" or (user_id and rng.random() < 0.3) else None
        user = _WaUser(
            key=user_id or phone,
            kind=kind,
            name=name,
            country=country,
            phone=None if kind == "username" else phone,
            user_id=user_id,
            username=username,
        )
        if user.phone is not None:
            user.phones.append(user.phone)
            names[user.phone] = name
        if user_id is not None:
            user.user_ids.append(user_id)
            names[user_id] = name
        users.append(user)
        user.clock = base_ts + rng.randint(0, 1800)
        user.referral_due = c == 0 or rng.random() < 0.25
        conv_start = user.clock
        out_count = 0
        for m in range(messages_per_contact):
            slot = _PLAN_SLOTS[global_index % len(_PLAN_SLOTS)]
            global_index += 1
            reachable = user.phone is not None  # the business can write to them
            if slot in ("interactive", "button") and not reachable:
                slot = "reply"
            elif slot == "system" and not reachable:
                slot = "text"
            to_business = slot == "reaction" and reachable and rng.random() < 0.6
            needs_out = slot in ("interactive", "button") or to_business
            if needs_out or (m > 0 and reachable and rng.random() < 0.35):
                # the business replies (or sends a template) before this message
                sent_at = user.clock + rng.randint(3, 60)
                out, arrived = outbound(
                    user, sent_at, conv_start, template=slot == "button", arrives=needs_out
                )
                if arrived:
                    user.last_out = out
                out_count += 1
                user.clock = sent_at + rng.randint(20, 300)
            else:
                user.clock += rng.randint(5, 240)

            if slot in ("reaction", "edit", "revoke"):
                if slot == "reaction":
                    own = user.candidates()
                    target = user.last_out if to_business else (rng.choice(own) if own else None)
                elif slot == "edit":
                    target = next(reversed(user.texts), None)
                else:
                    target = next(reversed(user.candidates()), None)
                if target is None:  # nothing to point at yet: a text first
                    target = text(user)
                    user.clock += rng.randint(5, 120)
                {"reaction": react, "edit": edit, "revoke": revoke}[slot](user, target)
            elif slot == "reply":
                own = user.candidates()
                text(user, quote=rng.choice(own) if own else None)
            elif slot == "system":
                change_number(user)
            else:
                msg = message(user, slot)
                if slot == "interactive":
                    msg["context"] = {"from": display_phone_number, "id": user.last_out}
                    msg["interactive"] = _interactive(
                        rng,
                        "button_reply" if (global_index // len(_PLAN_SLOTS)) % 2 == 0 else "list_reply",
                    )
                elif slot == "button":
                    msg["context"] = {"from": display_phone_number, "id": user.last_out}
                elif slot == "text" and "context" not in msg and rng.random() < 0.2:
                    own = user.candidates()
                    quoted = user.last_out if user.last_out and rng.random() < 0.5 else None
                    quoted = quoted or (rng.choice(own) if own else None)
                    if quoted is not None:
                        msg["context"] = quoting(user, quoted)
                inbound(user, msg, slot)
        if out_count == 0 and messages_per_contact > 0 and user.phone is not None:
            outbound(user, user.clock + rng.randint(5, 120), conv_start, template=False)

    # ---- Messenger and Instagram users
    if page_id is not None:
        ig_id = instagram_id if instagram_id is not None else "1784140" + ids.numeric(10)
        n_social = max(1, contacts // 4) if contacts else 0
        for channel, account_id in (("messenger", page_id), ("instagram", ig_id)):
            family = "page" if channel == "messenger" else "instagram"
            for _u in range(n_social):
                psid = ids.numeric(16 if channel == "messenger" else 17)
                names[psid] = _person(rng, used_numbers)[1]
                thread = _digits(rng, 38)
                clock_ms = (base_ts + rng.randint(0, 1800)) * 1000 + rng.randint(0, 999)
                for _m in range(messages_per_contact):
                    clock_ms += rng.randint(4_000, 240_000)
                    mid = ids.mid() if channel == "messenger" else ids.ig_mid(account_id, thread)
                    attach = rng.choice(("image", "video", "audio", "file")) if rng.random() < 0.3 else None
                    if channel == "instagram" and attach == "file":
                        attach = "image"
                    event = messenger_message(
                        mid=mid,
                        sender_id=psid,
                        recipient_id=account_id,
                        timestamp_ms=clock_ms,
                        text=None if attach else rng.choice(_TEXTS),
                        attachment_type=attach,
                        cdn_base=cdn_base,
                    )
                    add(clock_ms / 1000, family, event)
                    expected[mid] = ExpectedMessage(
                        key=mid,
                        channel=channel,
                        direction="inbound",
                        type=attach or "text",
                        final_status="received",
                        contact=psid,
                    )

    # ---- non-"messages" WABA fields
    if other_fields:
        add(
            base_ts + rng.randint(0, 900),
            "other",
            wa_other_change(
                "message_template_status_update",
                {
                    "event": "APPROVED",
                    "message_template_id": int(ids.numeric(15)),
                    "message_template_name": "order_update_v2",
                    "message_template_language": "en_US",
                    "reason": "NONE",
                },
            ),
        )
        add(
            base_ts + rng.randint(900, 1800),
            "other",
            wa_other_change(
                "account_update",
                {"event": "BUSINESS_PRIMARY_LOCATION_COUNTRY_UPDATE", "country": "US"},
            ),
        )

    items.sort()
    webhooks = _batch(
        items,
        rng,
        batch_max=batch_max,
        waba_id=waba_id,
        phone_number_id=phone_number_id,
        display_phone_number=display_phone_number,
        page_id=page_id,
        ig_id=ig_id,
    )

    # ---- duplicates: re-send some envelopes later in the list
    n_dup = round(len(webhooks) * duplicate_rate)
    originals = sorted(rng.sample(range(len(webhooks)), n_dup)) if n_dup else []
    after: dict[int, list[int]] = {}
    for i in originals:
        after.setdefault(rng.randint(i, len(webhooks) - 1), []).append(i)
    final: list[dict[str, Any]] = []
    for k, env in enumerate(webhooks):
        final.append(env)
        for i in after.get(k, []):
            final.append(copy.deepcopy(webhooks[i]))

    reactions = {
        key: ExpectedReaction(
            target=key[0],
            user=key[1],
            emoji=max(events)[2],
            reactions=tuple(rid for _, rid, _ in sorted(events)),
        )
        for key, events in reaction_events.items()
    }
    owner = {e.key: e.user for e in expected.values() if e.user is not None}
    edits = {
        target: ExpectedEdit(
            target=target,
            user=owner[target],
            body=max(events)[2],
            edits=tuple(eid for _, eid, _ in sorted(events)),
        )
        for target, events in edit_events.items()
    }
    return SimulationPlan(
        webhooks=final,
        expected=expected,
        duplicates=n_dup,
        contacts=names,
        users={
            u.key: ExpectedUser(
                key=u.key,
                kind=u.kind,
                name=u.name,
                phone=u.phone,
                user_id=u.user_id,
                username=u.username,
                phones=tuple(u.phones),
                user_ids=tuple(u.user_ids),
            )
            for u in users
        },
        reactions=reactions,
        edits=edits,
        revokes=revokes,
    )


def _batch(
    items: list[_Item],
    rng: random.Random,
    *,
    batch_max: int,
    waba_id: str,
    phone_number_id: str,
    display_phone_number: str,
    page_id: str | None,
    ig_id: str | None,
) -> list[dict[str, Any]]:
    """Group stream items into envelopes, sometimes several per envelope."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(items):
        first = items[i]
        size = rng.randint(2, batch_max) if batch_max > 1 and rng.random() < 0.3 else 1
        group = [first]
        j = i + 1
        wa = first.family in ("wa_msg", "wa_status")
        while len(group) < size and j < len(items):
            nxt = items[j]
            same = (nxt.family in ("wa_msg", "wa_status")) if wa else nxt.family == first.family
            if not same or first.family == "other":
                break
            group.append(nxt)
            j += 1
        i = j

        if first.family == "other":
            out.append(wa_envelope([first.payload], waba_id=waba_id, time=int(first.ts)))
        elif first.family in ("page", "instagram"):
            account = page_id if first.family == "page" else ig_id
            assert account is not None
            out.append(messenger_envelope([g.payload for g in group], page_id=account, object_=first.family))
        else:
            merge = rng.random() < 0.6  # one change per kind, else one change per item
            changes: list[dict[str, Any]] = []
            runs: list[list[_Item]] = []
            for g in group:
                if merge and runs and runs[-1][0].family == g.family:
                    runs[-1].append(g)
                else:
                    runs.append([g])
            for run in runs:
                # One contacts[] element per user of the change (by BSUID, else phone).
                cards: dict[str, dict[str, Any]] = {}
                for g in run:
                    if g.contact is not None:
                        cards.setdefault(str(g.contact.get("user_id") or g.contact.get("wa_id")), g.contact)
                if run[0].family == "wa_msg":
                    changes.append(
                        wa_change(
                            phone_number_id=phone_number_id,
                            display_phone_number=display_phone_number,
                            messages=[g.payload for g in run],
                            contacts=list(cards.values()),
                        )
                    )
                else:
                    changes.append(
                        wa_change(
                            phone_number_id=phone_number_id,
                            display_phone_number=display_phone_number,
                            statuses=[g.payload for g in run],
                            contacts=list(cards.values()),
                        )
                    )
            out.append(wa_envelope(changes, waba_id=waba_id))
    return out
