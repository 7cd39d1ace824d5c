"""Every SQL statement of the read API, named for the slow-query log and the query metrics.

Lists are keyset-paginated, newest first: `(created_at, id) < ($n, $m)` walks the indexes of
0001 and 0003 without an OFFSET, and a first page passes a position past every row.
"""

from __future__ import annotations

from api.db import CompanyQuery, Query, UserQuery

# Sessions and login: looked up by sid or email, before any company is known.

SESSION_CREATE = Query(
    "session.create",
    """
INSERT INTO user_sessions (sid, sess, expire)
VALUES ($1, $2, now() + make_interval(secs => $3::float8))
RETURNING expire
""",
)

# Expiry is judged by the database clock. The session is renewed (rolling) only when it has
# not been for `$3` seconds, so a busy user costs a write a minute, not one per request.
SESSION_LOAD = Query(
    "session.load",
    """
WITH s AS (
    SELECT sid, sess, expire FROM user_sessions WHERE sid = $1 AND expire > now()
), touched AS (
    UPDATE user_sessions us
       SET expire = now() + make_interval(secs => $2::float8)
      FROM s
     WHERE us.sid = s.sid AND s.expire < now() + make_interval(secs => $2::float8 - $3::float8)
    RETURNING us.expire
)
SELECT u.id, u.company_id, u.email, u.name, u.role, c.slug AS company_slug, c.name AS company_name,
       COALESCE((SELECT expire FROM touched), s.expire) AS expire,
       EXISTS (SELECT 1 FROM touched) AS touched
  FROM s
  JOIN users u ON u.id = (s.sess->>'user_id')::bigint
              AND u.company_id = (s.sess->>'company_id')::bigint
              AND u.is_active
  JOIN companies c ON c.id = u.company_id
""",
)

SESSION_DELETE = Query("session.delete", "DELETE FROM user_sessions WHERE sid = $1")

# SKIP LOCKED: replicas pruning at once split the work instead of queueing behind each other.
SESSION_PRUNE = Query(
    "session.prune",
    """
DELETE FROM user_sessions
 WHERE sid IN (SELECT sid FROM user_sessions
                WHERE expire <= now()
                ORDER BY expire
                LIMIT $1
                FOR UPDATE SKIP LOCKED)
""",
)

USER_FOR_LOGIN = Query(
    "user.for_login",
    """
SELECT id, company_id, password_hash, is_active
  FROM users
 WHERE lower(email) = lower($1)
 ORDER BY id
 LIMIT 1
""",
)

USER_LOGGED_IN = Query(
    "user.logged_in",
    "UPDATE users SET last_login_at = now(), password_hash = COALESCE($2, password_hash) WHERE id = $1",
)

# Health.

PING = Query("health.ping", "SELECT 1")

BREAKERS = Query(
    "health.breakers",
    "SELECT instance, state, failures, opened_at, updated_at FROM wuzapi_breakers ORDER BY instance",
)

# Conversations: newest first by creation, a key that never changes (see 0003_api.sql).

LIST_CONVERSATIONS = CompanyQuery(
    "conversations.list",
    """
SELECT c.id, c.status, c.channel, c.last_message_at, c.last_message_preview, c.unread_count,
       c.created_at, c.updated_at, c.referral, ct.id AS contact_id, ct.phone_number,
       ct.user_id, ct.username, ct.parent_user_id, ct.name AS contact_name
  FROM conversations c
  JOIN contacts ct ON ct.id = c.contact_id
 WHERE c.company_id = $1 AND c.deleted_at IS NULL
   AND (c.created_at, c.id) < ($2, $3)
 ORDER BY c.created_at DESC, c.id DESC
 LIMIT $4
""",
)

LIST_CONVERSATIONS_BY_STATUS = CompanyQuery(
    "conversations.list_by_status",
    """
SELECT c.id, c.status, c.channel, c.last_message_at, c.last_message_preview, c.unread_count,
       c.created_at, c.updated_at, c.referral, ct.id AS contact_id, ct.phone_number,
       ct.user_id, ct.username, ct.parent_user_id, ct.name AS contact_name
  FROM conversations c
  JOIN contacts ct ON ct.id = c.contact_id
 WHERE c.company_id = $1 AND c.deleted_at IS NULL AND c.status = $4
   AND (c.created_at, c.id) < ($2, $3)
 ORDER BY c.created_at DESC, c.id DESC
 LIMIT $5
""",
)

# The sum of the company's deltas, kept by triggers on conversations (see 0006): a few dozen rows
# whatever the company's size, where count(*) grew with it (BENCHMARKS.md, Read).
# `rows` says how many deltas were summed, so that the route can fold a company left with many.
CONVERSATION_COUNTS = CompanyQuery(
    "conversations.counts",
    """
SELECT status, sum(n)::bigint AS n, count(*) AS rows
  FROM conversation_status_counts
 WHERE company_id = $1
 GROUP BY status
""",
)

# Folds the company's deltas into one row per status, in its own short transaction and without
# waiting on any lock (see 0006); the sums do not change.
FOLD_CONVERSATION_COUNTS = CompanyQuery(
    "conversations.counts_fold",
    """
SELECT conversation_status_counts_fold(scope.company_id)
  FROM (VALUES ($1::bigint)) AS scope (company_id)
 WHERE company_id = $1
""",
)

GET_CONVERSATION = CompanyQuery(
    "conversations.get",
    """
SELECT c.id, c.status, c.channel, c.last_message_at, c.last_message_preview, c.unread_count,
       c.created_at, c.updated_at, c.referral, ct.id AS contact_id, ct.phone_number,
       ct.user_id, ct.username, ct.parent_user_id, ct.name AS contact_name
  FROM conversations c
  JOIN contacts ct ON ct.id = c.contact_id
 WHERE c.company_id = $1 AND c.id = $2 AND c.deleted_at IS NULL
""",
)

CONVERSATION_EXISTS = CompanyQuery(
    "conversations.exists",
    "SELECT true FROM conversations WHERE company_id = $1 AND id = $2 AND deleted_at IS NULL",
)

# A message as the read API shows it (`MessageOut`, its fields in its order): a revoked one
# without its body (kept for audit, not shown), the message it quotes (by external id: it may be
# unknown here, then only its id is given), and its reactions (removals are kept as NULL emoji,
# and not shown). `m` is the message; the joins go after its FROM.
MESSAGE_FIELDS = """
m.id, m.conversation_id, m.external_id, m.direction, m.type,
CASE WHEN m.deleted_at IS NULL THEN m.body END AS body,
m.status, m.status_at, m.error, m.sent_at, m.created_at, m.edited_at,
m.deleted_at IS NOT NULL AS deleted, m.forwarded, m.referral,
CASE WHEN m.reply_to IS NOT NULL THEN json_build_object(
    'external_id', m.reply_to, 'id', q.id, 'direction', q.direction, 'type', q.type,
    'body', CASE WHEN q.deleted_at IS NULL THEN q.body END) END AS reply_to,
COALESCE(r.reactions, '[]'::json) AS reactions,
COALESCE(md.media, '[]'::json) AS media
"""
MESSAGE_JOINS = """
LEFT JOIN messages q ON q.company_id = m.company_id AND q.external_id = m.reply_to
LEFT JOIN LATERAL (
    SELECT json_agg(json_build_object(
               'emoji', x.emoji, 'contact_id', x.contact_id,
               'at', to_char(x.reacted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
               ORDER BY x.reacted_at, x.contact_id) AS reactions
      FROM message_reactions x
     WHERE x.company_id = m.company_id AND x.message_external_id = m.external_id
       AND x.emoji IS NOT NULL
) r ON true
LEFT JOIN LATERAL (
    SELECT json_agg(json_build_object(
               'id', f.id, 'type', f.kind, 'mime_type', f.mime_type, 'size', f.size_bytes,
               'file_name', f.file_name, 'caption', f.caption, 'state', f.state,
               'reason', f.reason,
               'url', CASE WHEN f.state = 'stored' THEN '/api/v1/media/' || f.id END)
               ORDER BY f.position) AS media
      FROM media f
     WHERE f.company_id = m.company_id AND f.message_external_id = m.external_id
) md ON true
"""

# Messages of one conversation: append-only, so the keyset is stable by nature. The statement
# answers nothing unless the conversation is there and not deleted (a one-time check, not per
# row), so that a page costs one round trip; CONVERSATION_EXISTS then tells an empty page from
# a missing conversation. The joins run for the page's rows only (after the LIMIT).

LIST_MESSAGES = CompanyQuery(
    "messages.list",
    f"""
SELECT {MESSAGE_FIELDS}
  FROM (SELECT *
          FROM messages
         WHERE company_id = $1 AND conversation_id = $2
           AND (created_at, id) < ($3, $4)
           AND EXISTS (SELECT 1 FROM conversations
                        WHERE company_id = $1 AND id = $2 AND deleted_at IS NULL)
         ORDER BY created_at DESC, id DESC
         LIMIT $5) AS m
{MESSAGE_JOINS}
 ORDER BY m.created_at DESC, m.id DESC
""",
)

# A reply: the conversation row is locked so concurrent replies bump it one after the other.
REPLY_TARGET = CompanyQuery(
    "reply.target",
    """
SELECT c.id, c.channel, ct.phone_number, ct.username, co.slug
  FROM conversations c
  JOIN contacts ct ON ct.id = c.contact_id
  JOIN companies co ON co.id = c.company_id
 WHERE c.company_id = $1 AND c.id = $2 AND c.deleted_at IS NULL
   FOR UPDATE OF c
""",
)

# ON CONFLICT: a retried reply (same client id) finds its row instead of making a second one.
REPLY_INSERT = CompanyQuery(
    "reply.insert",
    """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, sent_at)
SELECT c.company_id, c.id, $3, 'outbound', 'text', $4, $5, 'pending', 0, now()
  FROM conversations c
 WHERE c.company_id = $1 AND c.id = $2
ON CONFLICT (company_id, external_id) DO NOTHING
RETURNING id, conversation_id, external_id, direction, type, body, status, status_at, error,
          sent_at, created_at, edited_at, false AS deleted, forwarded, referral,
          NULL::json AS reply_to, '[]'::json AS reactions, '[]'::json AS media
""",
)

# A reply carrying a file: its message (typed by the file) and its media row, stored already.
ATTACHMENT_INSERT = CompanyQuery(
    "reply.attachment_insert",
    """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, sent_at)
SELECT c.company_id, c.id, $3, 'outbound', $4, $5, $6, 'pending', 0, now()
  FROM conversations c
 WHERE c.company_id = $1 AND c.id = $2
ON CONFLICT (company_id, external_id) DO NOTHING
RETURNING id, sent_at
""",
)

ATTACHMENT_MEDIA_INSERT = CompanyQuery(
    "reply.attachment_media_insert",
    """
INSERT INTO media (id, company_id, message_external_id, direction, source, kind, mime_type,
                   file_name, caption, size_bytes, sha256, state, storage_key, stored_at)
SELECT $2, m.company_id, m.external_id, 'outbound', 'upload', $4, $5, $6, $7, $8, $9, 'stored',
       $10, now()
  FROM messages m
 WHERE m.company_id = $1 AND m.external_id = $3
""",
)

# A media file to serve: the session's company's only (anyone else's is a 404 like an absent one).
MEDIA_FOR_SERVING = CompanyQuery(
    "media.get",
    """
SELECT id, kind, mime_type, file_name, size_bytes, sha256, state, reason, storage_key
  FROM media
 WHERE company_id = $1 AND id = $2
""",
)

REPLY_EXISTING = CompanyQuery(
    "reply.existing",
    f"""
SELECT {MESSAGE_FIELDS}
  FROM messages m
{MESSAGE_JOINS}
 WHERE m.company_id = $1 AND m.external_id = $2
""",
)

REPLY_BUMP_CONVERSATION = CompanyQuery(
    "reply.bump_conversation",
    """
UPDATE conversations
   SET last_message_id = CASE WHEN last_message_at IS NULL OR last_message_at <= $4
                              THEN $3 ELSE last_message_id END,
       last_message_preview = CASE WHEN last_message_at IS NULL OR last_message_at <= $4
                                   THEN $5 ELSE last_message_preview END,
       last_message_at = GREATEST(last_message_at, $4),
       updated_at = now()
 WHERE company_id = $1 AND id = $2
""",
)

# Notifications: each user's own, inside the company.

LIST_NOTIFICATIONS = UserQuery(
    "notifications.list",
    """
SELECT id, kind, conversation_id, message_id, title, body, is_read, created_at
  FROM notifications
 WHERE company_id = $1 AND user_id = $2
   AND (created_at, id) < ($3, $4)
 ORDER BY created_at DESC, id DESC
 LIMIT $5
""",
)

UNREAD_NOTIFICATIONS = UserQuery(
    "notifications.unread_count",
    "SELECT count(*) FROM notifications WHERE company_id = $1 AND user_id = $2 AND NOT is_read",
)

MARK_NOTIFICATION_READ = UserQuery(
    "notifications.mark_read",
    """
UPDATE notifications SET is_read = true
 WHERE company_id = $1 AND user_id = $2 AND id = $3
RETURNING id, kind, conversation_id, message_id, title, body, is_read, created_at
""",
)

MARK_ALL_NOTIFICATIONS_READ = UserQuery(
    "notifications.mark_all_read",
    "UPDATE notifications SET is_read = true WHERE company_id = $1 AND user_id = $2 AND NOT is_read",
)
