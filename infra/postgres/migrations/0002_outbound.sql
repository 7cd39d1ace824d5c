-- Outbound through WUZAPI: per-company gateway token, rate limit and auto-replies; breaker state
-- shared with the read API; the auto-reply ledger that makes each reply once per window.

ALTER TABLE companies
    ADD COLUMN wuzapi_token        text,
    ADD COLUMN rate_limit_per_s    real NOT NULL DEFAULT 20 CHECK (rate_limit_per_s > 0),
    ADD COLUMN rate_limit_burst    integer NOT NULL DEFAULT 20 CHECK (rate_limit_burst > 0),
    ADD COLUMN welcome_message     text,
    ADD COLUMN away_message        text,
    ADD COLUMN timezone            text NOT NULL DEFAULT 'UTC',
    -- {"mon": ["09:00", "18:00"], ...}; a missing day is closed; NULL means always open.
    ADD COLUMN business_hours      jsonb;

-- One row per WUZAPI instance (token), written by the workers on every breaker transition.
CREATE TABLE wuzapi_breakers (
    instance        text PRIMARY KEY,
    state           text NOT NULL CHECK (state IN ('closed', 'open', 'half-open')),
    failures        integer NOT NULL DEFAULT 0,
    opened_at       timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- An auto-reply is sent at most once per conversation, kind and window (a day for away
-- messages, the conversation's life for the welcome): the unique key makes it so under redelivery.
CREATE TABLE auto_replies (
    company_id          bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    conversation_id     bigint NOT NULL REFERENCES conversations(id),
    kind                text NOT NULL CHECK (kind IN ('welcome', 'away')),
    window_key          text NOT NULL,
    outbound_id         text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, conversation_id, kind, window_key)
);
