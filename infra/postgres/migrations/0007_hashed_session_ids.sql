-- Sessions are keyed by the SHA-256 of their sid (api/sessions.py), so that the table names no
-- live session. Sessions open before this migration keep working: their keys are hashed too.
UPDATE user_sessions SET sid = encode(sha256(convert_to(sid, 'UTF8')), 'hex');
