-- Every replay of a dead letter, by whom and when: a second replay of the same letter is skipped
-- unless forced, and the operators' console shows the audit.
CREATE TABLE dlq_replays (
    dlq_id          text PRIMARY KEY,
    source_topic    text NOT NULL,
    tenant          text,
    error_type      text NOT NULL,
    replayed_by     text NOT NULL,
    times           integer NOT NULL DEFAULT 1,
    replayed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dlq_replays_replayed_at_idx ON dlq_replays (replayed_at DESC);
