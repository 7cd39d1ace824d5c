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
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MESSAGE_TYPES",
    "STATUSES",
    "ExpectedMessage",
    "SimulationPlan",
    "build_plan",
    "final_status_of",
    "messenger_envelope",
    "messenger_message",
    "sign",
    "wa_change",
    "wa_envelope",
    "wa_message",
    "wa_other_change",
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


# --------------------------------------------------------------------------- WhatsApp


def wa_message(
    msg_type: str,
    *,
    wamid: str,
    from_: str,
    timestamp: int,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """One element of ``value.messages[]`` of type ``msg_type``, as Meta sends it.

    ``from_`` is the user's wa_id (E.164 digits, no ``+``); ``timestamp`` is unix seconds
    (serialised as a string, like Meta). Content is drawn from ``rng`` (default: seeded from
    ``wamid``, so the same arguments always give the same message). ``interactive`` picks a
    ``button_reply`` or ``list_reply`` at random; ``interactive`` and ``button`` carry a
    ``context`` ``{from, id}`` pointing at the business message they answer (placeholder
    values here; :func:`build_plan` points them at real outbound messages).
    """
    if msg_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown WhatsApp message type {msg_type!r}")
    r = rng if rng is not None else random.Random(wamid)
    msg: dict[str, Any] = {"from": from_, "id": wamid, "timestamp": str(timestamp)}
    placeholder_context = {
        "from": "1555" + _digits(r, 7),
        "id": _make_wamid(r, from_, inbound=False),
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
        media["sha256"] = _sha256_b64(r)
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
) -> dict[str, Any]:
    """One element of ``value.statuses[]`` for a message the business sent.

    ``sent`` carries ``conversation`` (with ``expiration_timestamp``) and ``pricing``;
    ``delivered`` carries them without the expiration; ``read`` carries neither; ``failed``
    carries ``errors[]`` (``code, title, message, error_data.details, href``). The
    conversation id is derived from ``recipient_id`` so all statuses for one user agree.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown WhatsApp status {status!r}")
    out: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": str(timestamp),
        "recipient_id": recipient_id,
    }
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


def wa_change(
    *,
    phone_number_id: str,
    display_phone_number: str,
    messages: Sequence[dict[str, Any]] = (),
    statuses: Sequence[dict[str, Any]] = (),
    contacts: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """A ``field == "messages"`` change: ``{"value": {...}, "field": "messages"}``.

    ``contacts`` are ``(wa_id, profile name)`` pairs, one per user whose messages are in
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
        value["contacts"] = [{"profile": {"name": name}, "wa_id": wa_id} for wa_id, name in contacts]
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
) -> dict[str, Any]:
    """One ``entry[].messaging[]`` event for a message a user sent to the Page/IG account.

    ``attachment_type`` is ``image``, ``video``, ``audio`` or ``file`` (Messenger) and adds
    ``message.attachments = [{"type": ..., "payload": {"url": ...}}]``. With neither text nor
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
    contact: str  # wa_id or PSID/IGSID


@dataclass
class SimulationPlan:
    """A deterministic stream of webhook bodies plus the outcome it should produce."""

    webhooks: list[dict[str, Any]]
    expected: dict[str, ExpectedMessage]
    duplicates: int
    contacts: dict[str, str] = field(default_factory=dict)  # wa_id/PSID -> display name


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
    return number, name


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


@dataclass(order=True)
class _Item:
    """One unit of the stream before batching."""

    ts: float
    seq: int
    family: str = field(compare=False)  # "wa_msg" | "wa_status" | "page" | "instagram" | "other"
    payload: dict[str, Any] = field(compare=False)
    contact: tuple[str, str] | None = field(compare=False, default=None)


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
) -> SimulationPlan:
    """Build a deterministic stream of signed-ready webhook bodies and its expected outcome.

    * ``contacts`` WhatsApp users (realistic names, E.164 numbers) each send
      ``messages_per_contact`` inbound messages; types cycle over :data:`MESSAGE_TYPES`
      across the whole plan, so 14+ inbound messages cover every type. A ``system``
      (``customer_changed_number``) message switches that user to the new number.
    * The business sends outbound messages (only their statuses appear). Each gets
      ``sent``/``delivered``/``read`` (some stop at delivered, some skip delivered, some
      fail), emitted in shuffled order in separate webhooks; status timestamps stay
      chronological, as Meta stamps them.
    * Interactive/button replies carry ``context`` pointing at a real earlier outbound
      message; reactions point at one too.
    * Some envelopes batch up to ``batch_max`` items (several messages from different users
      in one change, several changes in one entry, several statuses in one change).
    * With ``page_id``, Messenger and Instagram users send messages too (Instagram account id
      = ``instagram_id`` or a generated one).
    * With ``other_fields``, an ``account_update`` and a ``message_template_status_update``
      envelope are mixed in (they mention no message).
    * ``round(len * duplicate_rate)`` envelopes are re-sent later in the list.
    * ``start_ts`` (unix seconds) defaults to a fixed instant so a seed always gives the
      same plan; pass ``int(time.time())`` for "now".
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
    seq = 0

    def add(ts: float, family: str, payload: dict[str, Any], contact: tuple[str, str] | None = None) -> None:
        nonlocal seq
        items.append(_Item(ts, seq, family, payload, contact))
        seq += 1

    def outbound(wa_id: str, sent_at: int, conv_start: int, *, template: bool) -> str:
        wamid = ids.wamid(wa_id, inbound=False)
        roll = rng.random()
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
            s = wa_status(st, wamid=wamid, recipient_id=wa_id, timestamp=ts)
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
            add(slot + rng.random() * 3, "wa_status", statuses[idx])
        expected[wamid] = ExpectedMessage(
            key=wamid,
            channel="whatsapp",
            direction="outbound",
            type="text",
            final_status=final_status_of(path),
            contact=wa_id,
        )
        return wamid

    # ---- WhatsApp users
    global_index = 0
    for _c in range(contacts):
        wa_id, name = _person(rng, used_numbers)
        names[wa_id] = name
        clock = base_ts + rng.randint(0, 1800)
        conv_start = clock
        last_out: str | None = None
        last_in: str | None = None
        out_count = 0
        for m in range(messages_per_contact):
            msg_type = MESSAGE_TYPES[global_index % len(MESSAGE_TYPES)]
            global_index += 1
            needs_ref = msg_type in ("interactive", "button", "reaction")
            if needs_ref or (m > 0 and rng.random() < 0.35):
                # the business replies (or sends a template) before this message
                sent_at = clock + rng.randint(3, 60)
                last_out = outbound(wa_id, sent_at, conv_start, template=msg_type == "button")
                out_count += 1
                clock = sent_at + rng.randint(20, 300)
            else:
                clock += rng.randint(5, 240)
            wamid = ids.wamid(wa_id, inbound=True)
            msg = wa_message(msg_type, wamid=wamid, from_=wa_id, timestamp=clock, rng=rng)
            if msg_type == "interactive":
                msg["context"] = {"from": display_phone_number, "id": last_out}
                msg["interactive"] = _interactive(
                    rng,
                    "button_reply" if (global_index // len(MESSAGE_TYPES)) % 2 == 0 else "list_reply",
                )
            elif msg_type == "button":
                msg["context"] = {"from": display_phone_number, "id": last_out}
            elif msg_type == "reaction":
                msg["reaction"]["message_id"] = last_out if last_out is not None else last_in
            contact_pair: tuple[str, str] | None = (wa_id, name)
            if msg_type == "system":
                new_wa_id, _ = _person(rng, used_numbers)
                new_wa_id = wa_id[: len(wa_id) - 8] + new_wa_id[-8:]
                used_numbers.add(new_wa_id)
                msg["system"] = _system_body(wa_id, new_wa_id, name)
                contact_pair = None  # system notifications carry no contacts[]
            add(clock, "wa_msg", msg, contact_pair)
            expected[wamid] = ExpectedMessage(
                key=wamid,
                channel="whatsapp",
                direction="inbound",
                type=msg_type,
                final_status="received",
                contact=wa_id,
            )
            last_in = wamid
            if msg_type == "system":
                wa_id = msg["system"]["wa_id"]
                names[wa_id] = name
        if out_count == 0 and messages_per_contact > 0:
            outbound(wa_id, clock + rng.randint(5, 120), conv_start, template=False)

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

    return SimulationPlan(webhooks=final, expected=expected, duplicates=n_dup, contacts=names)


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
                if run[0].family == "wa_msg":
                    pairs: list[tuple[str, str]] = []
                    for g in run:
                        if g.contact is not None and g.contact not in pairs:
                            pairs.append(g.contact)
                    changes.append(
                        wa_change(
                            phone_number_id=phone_number_id,
                            display_phone_number=display_phone_number,
                            messages=[g.payload for g in run],
                            contacts=pairs,
                        )
                    )
                else:
                    changes.append(
                        wa_change(
                            phone_number_id=phone_number_id,
                            display_phone_number=display_phone_number,
                            statuses=[g.payload for g in run],
                        )
                    )
            out.append(wa_envelope(changes, waba_id=waba_id))
    return out
