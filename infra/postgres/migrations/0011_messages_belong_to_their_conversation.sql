-- A message no longer checks its company on insert; it goes with its conversation instead.
--
-- Why: the company key locked the company's row (FOR KEY SHARE) for every message inserted, and
-- every worker batch inserts messages of the same few companies: the workers' transactions
-- shared those locks (a MultiXact that each further check looks up). Without the check a record
-- costs 4 µs less Postgres CPU, with one writer or two (BENCHMARKS.md, "worker x2").
--
-- What stays true: every message has a conversation (NOT NULL, and the key below), and a
-- conversation a company (its own key); every writer files a message under a conversation of
-- the message's company. A deleted company deletes its conversations, which now take their messages
-- (and, by 0010's trigger, their notifications) with them, as the company key did. Hard-deleting a
-- conversation, which was refused while it had messages, now deletes them: nothing we ship
-- hard-deletes a conversation (the app sets deleted_at).

ALTER TABLE messages
    DROP CONSTRAINT messages_company_id_fkey,
    DROP CONSTRAINT messages_conversation_id_fkey,
    ADD CONSTRAINT messages_conversation_id_fkey
        FOREIGN KEY (conversation_id) REFERENCES conversations (id) ON DELETE CASCADE NOT VALID;

-- Every row already met the key it replaces: validating reads them without blocking writers.
ALTER TABLE messages VALIDATE CONSTRAINT messages_conversation_id_fkey;
