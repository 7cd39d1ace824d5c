-- A user's sessions end when their password changes or they are deactivated, whatever made the
-- change (`cortexx users add`, the console, plain SQL): a trigger, so no write path can forget.
-- Before this, a stolen session outlived a password reset, and reactivating a user revived the
-- sessions they had before.
CREATE INDEX IF NOT EXISTS user_sessions_user_id ON user_sessions (((sess->>'user_id')::bigint));

CREATE OR REPLACE FUNCTION end_sessions_of_changed_user() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.password_hash IS DISTINCT FROM OLD.password_hash
       OR (OLD.is_active AND NOT NEW.is_active) THEN
        DELETE FROM user_sessions WHERE (sess->>'user_id')::bigint = NEW.id;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS users_end_sessions ON users;
CREATE TRIGGER users_end_sessions
    AFTER UPDATE OF password_hash, is_active ON users
    FOR EACH ROW EXECUTE FUNCTION end_sessions_of_changed_user();

-- Deactivated users have no session to come back to.
DELETE FROM user_sessions s
 USING users u
 WHERE u.id = (s.sess->>'user_id')::bigint AND NOT u.is_active;
