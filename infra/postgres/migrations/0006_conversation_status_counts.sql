-- Conversation counts per company and status, kept by triggers on conversations in the writer's
-- own transaction, so that the read API's status counts read a few rows instead of counting a
-- company's conversations (count(*) of 200,000 rows: 48 ms p99; this: well under 1 ms).
--
-- Design: insert-only delta rows, folded without waiting.
-- * Not one counter row per (company, status): such a row is a lock that every writer of the
--   company holds until it commits. Worker batches of one company would queue behind each other,
--   and two transactions that touch (c, 'open') and (c, 'closed') in opposite orders (one opens a
--   conversation while the other closes one) deadlock.
-- * Instead every change INSERTs a delta (+1 / -1) for its (company, status). Inserts of new rows
--   never wait for one another, so the triggers add no lock wait and no deadlock to any writer.
--   The count is the sum of the company's rows; a snapshot sees whole transactions, so that sum
--   equals count(*) ... GROUP BY status in the same snapshot, whatever runs concurrently.
-- * conversation_status_counts_fold(company) keeps the rows per company few: it DELETEs the rows
--   it can lock at once (FOR UPDATE SKIP LOCKED: it never waits either) and INSERTs their sum per
--   status, in the caller's transaction. It re-inserts exactly what it deleted, so any number of
--   folds, concurrent with each other and with writers, keep every sum. The trigger folds the
--   company it touched on about one change in 32, at most once per transaction (no job to
--   schedule; a company keeps about a transaction's deltas, a few dozen to a few hundred rows);
--   only under READ COMMITTED, where a row that a concurrent fold deleted is skipped (under
--   REPEATABLE READ, locking it would raise a serialization failure instead). A bulk statement
--   (thousands of rows in one transaction) leaves about as many deltas: the API's counts read
--   folds a company it finds with more than a few hundred rows, in its own short transaction.
-- No foreign key to companies: the rows are derived, and a company deleted with its
-- conversations leaves deltas that sum to zero (and vanish at the next fold).

-- No writer may change conversations between the triggers' creation and the backfill: a
-- transaction already writing is waited for (its rows are then in the backfill), later ones wait
-- for this migration to commit (and then fire the triggers).
LOCK TABLE conversations IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE conversation_status_counts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id  bigint NOT NULL,
    status      text NOT NULL,
    n           bigint NOT NULL
);
CREATE INDEX conversation_status_counts_company_idx
    ON conversation_status_counts (company_id, status) INCLUDE (n);

-- Index scans only: between vacuums the table is small but full of folded (dead) rows, and a
-- sequential scan of it costs more than the company's few rows.
CREATE FUNCTION conversation_status_counts_fold(p_company bigint) RETURNS void
LANGUAGE sql SET enable_seqscan = off AS $$
    WITH taken AS (
        DELETE FROM conversation_status_counts
         WHERE company_id = p_company
           AND id = ANY (ARRAY(SELECT id FROM conversation_status_counts
                                WHERE company_id = p_company
                                  FOR UPDATE SKIP LOCKED))
        RETURNING status, n
    )
    INSERT INTO conversation_status_counts (company_id, status, n)
    SELECT p_company, status, sum(n) FROM taken GROUP BY status HAVING sum(n) <> 0
$$;

-- Row-level, AFTER: only rows really written count (an ON CONFLICT that updates instead of
-- inserting fires no INSERT row trigger; a BEFORE trigger would also see rows then dropped).
CREATE FUNCTION conversation_status_counts_track() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    company bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        company := NEW.company_id;
        INSERT INTO conversation_status_counts (company_id, status, n) VALUES (company, NEW.status, 1);
    ELSIF TG_OP = 'DELETE' THEN
        company := OLD.company_id;
        INSERT INTO conversation_status_counts (company_id, status, n) VALUES (company, OLD.status, -1);
    ELSE
        company := NEW.company_id;
        IF OLD.deleted_at IS NULL AND NEW.deleted_at IS NULL THEN
            INSERT INTO conversation_status_counts (company_id, status, n)
            VALUES (OLD.company_id, OLD.status, -1), (NEW.company_id, NEW.status, 1);
        ELSIF OLD.deleted_at IS NULL THEN
            INSERT INTO conversation_status_counts (company_id, status, n)
            VALUES (OLD.company_id, OLD.status, -1);
        ELSE
            INSERT INTO conversation_status_counts (company_id, status, n)
            VALUES (NEW.company_id, NEW.status, 1);
        END IF;
    END IF;
    -- At most one fold per transaction: a fold in a transaction that already wrote many deltas
    -- scans them all (its own dead rows included), so folding on every 32nd row would be
    -- quadratic in a bulk insert; one fold costs the company's rows once.
    IF random() < 1.0 / 32
       AND current_setting('transaction_isolation') = 'read committed'
       AND current_setting('cortexx.counts_folded', true) IS DISTINCT FROM 'on' THEN
        PERFORM set_config('cortexx.counts_folded', 'on', true);
        PERFORM conversation_status_counts_fold(company);
    END IF;
    RETURN NULL;
END
$$;

-- The WHEN clauses run without calling the function: the worker's per-message bump sets status
-- to itself (a reopen CASE), and that fires nothing unless the value really changes.
CREATE TRIGGER conversations_status_counts_insert
    AFTER INSERT ON conversations
    FOR EACH ROW WHEN (NEW.deleted_at IS NULL)
    EXECUTE FUNCTION conversation_status_counts_track();

CREATE TRIGGER conversations_status_counts_update
    AFTER UPDATE OF status, deleted_at, company_id ON conversations
    FOR EACH ROW WHEN (
        (OLD.deleted_at IS NULL OR NEW.deleted_at IS NULL)
        AND (OLD.status IS DISTINCT FROM NEW.status
             OR OLD.company_id IS DISTINCT FROM NEW.company_id
             OR (OLD.deleted_at IS NULL) <> (NEW.deleted_at IS NULL))
    )
    EXECUTE FUNCTION conversation_status_counts_track();

CREATE TRIGGER conversations_status_counts_delete
    AFTER DELETE ON conversations
    FOR EACH ROW WHEN (OLD.deleted_at IS NULL)
    EXECUTE FUNCTION conversation_status_counts_track();

-- TRUNCATE fires no row trigger (the worker benchmark truncates between runs).
CREATE FUNCTION conversation_status_counts_reset() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM conversation_status_counts;
    RETURN NULL;
END
$$;

CREATE TRIGGER conversations_status_counts_truncate
    AFTER TRUNCATE ON conversations
    FOR EACH STATEMENT EXECUTE FUNCTION conversation_status_counts_reset();

INSERT INTO conversation_status_counts (company_id, status, n)
SELECT company_id, status, count(*)
  FROM conversations
 WHERE deleted_at IS NULL
 GROUP BY company_id, status;
