"""The console's SQL. Platform-wide by design: the console is for the people who run Cortexx."""

from __future__ import annotations

from api.db import Query

# The time of a webhook: an inbound message's arrival, or a delivery status of an outbound one.
# A company's WhatsApp contacts by how they are known (migration 0014): with a phone number, or
# by business-scoped user id and username alone (no phone to reply to); contacts merged into
# another (one user known by two ids) are not counted.
TENANTS = Query(
    "ops.tenants",
    """
    WITH contacts_by_identity AS (
        SELECT company_id,
               count(*) AS total,
               count(*) FILTER (WHERE phone_number IS NOT NULL) AS with_phone,
               count(*) FILTER (WHERE phone_number IS NULL AND username IS NOT NULL) AS username_only
          FROM contacts WHERE channel = 'whatsapp' AND deleted_at IS NULL GROUP BY company_id
    ), media_by_state AS (
        SELECT company_id,
               count(*) FILTER (WHERE state = 'stored') AS stored,
               count(*) FILTER (WHERE state = 'pending') AS pending,
               count(*) FILTER (WHERE state = 'failed') AS failed,
               coalesce(sum(size_bytes) FILTER (WHERE state = 'stored'), 0) AS bytes
          FROM media GROUP BY company_id
    ), events AS (
        SELECT company_id, created_at,
               CASE WHEN direction = 'inbound' THEN created_at ELSE status_at END AS webhook_at
          FROM messages
    ), per_company AS (
        SELECT company_id,
               count(*) AS total,
               count(*) FILTER (WHERE created_at > now() - interval '24 hours') AS last_24h,
               max(webhook_at) AS last_at,
               min(webhook_at) FILTER (WHERE webhook_at > now() - interval '7 days') AS first_7d,
               count(webhook_at) FILTER (WHERE webhook_at > now() - interval '7 days') AS n_7d
          FROM events GROUP BY company_id
    )
    SELECT c.slug, c.name, c.rate_limit_per_s, c.rate_limit_burst, c.wuzapi_token,
           coalesce(p.total, 0) AS total, coalesce(p.last_24h, 0) AS last_24h, p.last_at,
           CASE WHEN p.n_7d >= 3
                THEN extract(epoch FROM (p.last_at - p.first_7d)) / (p.n_7d - 1) END AS usual_gap_s,
           extract(epoch FROM (now() - p.last_at)) AS silent_s,
           coalesce(w.total, 0) AS wa_total, coalesce(w.with_phone, 0) AS wa_with_phone,
           coalesce(w.username_only, 0) AS wa_username_only,
           coalesce(md.stored, 0) AS media_stored, coalesce(md.pending, 0) AS media_pending,
           coalesce(md.failed, 0) AS media_failed, coalesce(md.bytes, 0) AS media_bytes
      FROM companies c LEFT JOIN per_company p ON p.company_id = c.id
      LEFT JOIN contacts_by_identity w ON w.company_id = c.id
      LEFT JOIN media_by_state md ON md.company_id = c.id
     ORDER BY c.slug
     LIMIT $1
    """,
)

# Files that could not be fetched (failed) or are being retried (pending with what the last
# attempt met), newest first, every company's.
MEDIA_FAILURES = Query(
    "ops.media_failures",
    """
    SELECT m.id::text AS id, c.slug AS tenant, m.message_external_id, m.kind, m.source, m.state,
           m.reason, m.attempts, m.updated_at
      FROM media m JOIN companies c ON c.id = m.company_id
     WHERE (m.state = 'failed' OR (m.state = 'pending' AND m.reason IS NOT NULL))
     ORDER BY m.updated_at DESC
     LIMIT $1
    """,
)

REPLAY_EVENTS = Query(
    "ops.replay_events",
    """
    SELECT dlq_id, source_topic, tenant, error_type, replayed_by, replayed_at
      FROM dlq_replay_events ORDER BY replayed_at DESC, id DESC LIMIT $1
    """,
)

REPLAY_EVENTS_OF = Query(
    "ops.replay_events_of",
    """
    SELECT dlq_id, source_topic, tenant, error_type, replayed_by, replayed_at
      FROM dlq_replay_events WHERE dlq_id = $1 ORDER BY replayed_at DESC, id DESC LIMIT 100
    """,
)

MESSAGE_STATUS = Query(
    "ops.message_status",
    "SELECT status FROM messages WHERE company_id = $1 AND external_id = $2",
)
