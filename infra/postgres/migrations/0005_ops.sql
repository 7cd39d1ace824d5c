-- The operators' console: every replay of a dead letter as its own row (dlq_replays keeps one
-- row per letter, with the last replay only), written by a trigger so that the CLI's replays
-- and the console's are audited alike.
CREATE TABLE dlq_replay_events (
    id              bigserial PRIMARY KEY,
    dlq_id          text NOT NULL,
    source_topic    text NOT NULL,
    tenant          text,
    error_type      text NOT NULL,
    replayed_by     text NOT NULL,
    replayed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dlq_replay_events_replayed_at_idx ON dlq_replay_events (replayed_at DESC, id DESC);
CREATE INDEX dlq_replay_events_dlq_id_idx ON dlq_replay_events (dlq_id, replayed_at DESC);

INSERT INTO dlq_replay_events (dlq_id, source_topic, tenant, error_type, replayed_by, replayed_at)
SELECT dlq_id, source_topic, tenant, error_type, replayed_by, replayed_at FROM dlq_replays;

CREATE FUNCTION dlq_replay_logged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dlq_replay_events (dlq_id, source_topic, tenant, error_type, replayed_by, replayed_at)
    VALUES (NEW.dlq_id, NEW.source_topic, NEW.tenant, NEW.error_type, NEW.replayed_by, NEW.replayed_at);
    RETURN NEW;
END
$$;

CREATE TRIGGER dlq_replays_audit AFTER INSERT OR UPDATE ON dlq_replays
    FOR EACH ROW EXECUTE FUNCTION dlq_replay_logged();
