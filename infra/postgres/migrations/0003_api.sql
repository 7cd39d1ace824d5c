-- The read API: login bits on users, and the indexes behind its keyset lists.

ALTER TABLE users
    ADD COLUMN last_login_at timestamptz,
    ADD CONSTRAINT users_role_check CHECK (role IN ('agent', 'admin'));

-- Login looks users up by email whatever its case.
CREATE INDEX users_email_lower_idx ON users (lower(email));

-- Conversations are listed newest first by creation, a key that never changes: paging while
-- messages arrive neither repeats nor skips a row (updated_at moves under the reader's feet).
CREATE INDEX conversations_company_created_idx
    ON conversations (company_id, created_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX conversations_company_status_created_idx
    ON conversations (company_id, status, created_at DESC, id DESC) WHERE deleted_at IS NULL;

-- A user's notifications, read or not, newest first (the 0001 index leads with is_read).
CREATE INDEX notifications_user_created_idx
    ON notifications (user_id, created_at DESC, id DESC);
