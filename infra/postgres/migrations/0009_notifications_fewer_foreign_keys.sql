-- Notifications keep the foreign keys that say something and lose the two that only repeat
-- what the others enforce. Each foreign key costs every inserted row a lookup and a row lock on
-- the row it references (FOR KEY SHARE, on a company or conversation row that every worker
-- batch touches); for these two that was 11 µs of Postgres CPU per record, 15% of the worker's
-- database cost (BENCHMARKS.md).
-- * company_id: a notification belongs to its user's company (the worker joins users on it),
--   and deleting a company deletes its users and, through user_id, their notifications.
-- * conversation_id: the conversation of its message; message_id still references messages,
--   which reference conversations, so nothing a notification points to can vanish under it.
ALTER TABLE notifications
    DROP CONSTRAINT notifications_company_id_fkey,
    DROP CONSTRAINT notifications_conversation_id_fkey;
