-- The foundation schema: tenants, their users and sessions, and the conversation model.

CREATE TABLE companies (
    id              bigserial PRIMARY KEY,
    slug            text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name            text NOT NULL,
    app_secret      text NOT NULL,
    verify_token    text NOT NULL,
    settings        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id              bigserial PRIMARY KEY,
    company_id      bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    email           text NOT NULL UNIQUE,
    name            text NOT NULL DEFAULT '',
    password_hash   text NOT NULL DEFAULT '',
    role            text NOT NULL DEFAULT 'agent',
    is_active       boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_company_idx ON users (company_id) WHERE is_active;

CREATE TABLE user_sessions (
    sid             text PRIMARY KEY,
    sess            jsonb NOT NULL,
    expire          timestamptz NOT NULL
);
CREATE INDEX user_sessions_expire_idx ON user_sessions (expire);

-- A contact is a WhatsApp number (wa_id) or a Messenger / Instagram scoped id.
CREATE TABLE contacts (
    id              bigserial PRIMARY KEY,
    company_id      bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    phone_number    text NOT NULL,
    channel         text NOT NULL DEFAULT 'whatsapp',
    name            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
CREATE UNIQUE INDEX contacts_company_phone_idx
    ON contacts (company_id, phone_number, channel) WHERE deleted_at IS NULL;

CREATE TABLE conversations (
    id                      bigserial PRIMARY KEY,
    company_id              bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    contact_id              bigint NOT NULL REFERENCES contacts(id),
    channel                 text NOT NULL DEFAULT 'whatsapp',
    status                  text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'pending', 'closed')),
    last_message_id         bigint,
    last_message_at         timestamptz,
    last_message_preview    text,
    unread_count            integer NOT NULL DEFAULT 0,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    deleted_at              timestamptz
);
CREATE UNIQUE INDEX conversations_contact_idx
    ON conversations (company_id, contact_id) WHERE deleted_at IS NULL;
CREATE INDEX conversations_company_status_updated_idx
    ON conversations (company_id, status, updated_at DESC, id DESC) WHERE deleted_at IS NULL;

-- status: received (inbound), pending < sent < delivered < read; failed is terminal.
CREATE TABLE messages (
    id                  bigserial PRIMARY KEY,
    company_id          bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    conversation_id     bigint NOT NULL REFERENCES conversations(id),
    external_id         text NOT NULL,
    direction           text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    type                text NOT NULL,
    body                text,
    content             jsonb NOT NULL DEFAULT '{}'::jsonb,
    status              text NOT NULL,
    status_rank         smallint NOT NULL DEFAULT 0,
    status_at           timestamptz,
    error               jsonb,
    sent_at             timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_company_external_key UNIQUE (company_id, external_id)
);
CREATE INDEX messages_conversation_created_idx
    ON messages (conversation_id, created_at DESC, id DESC);

CREATE TABLE notifications (
    id                  bigserial PRIMARY KEY,
    company_id          bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    user_id             bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind                text NOT NULL,
    conversation_id     bigint REFERENCES conversations(id),
    message_id          bigint REFERENCES messages(id),
    title               text NOT NULL,
    body                text NOT NULL DEFAULT '',
    is_read             boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notifications_user_message_key UNIQUE (user_id, message_id)
);
CREATE INDEX notifications_user_read_created_idx
    ON notifications (user_id, is_read, created_at DESC, id DESC);

-- Changes we do not turn into rows yet (account updates, template status, ...): kept, once.
CREATE TABLE webhook_events (
    id              bigserial PRIMARY KEY,
    company_id      bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    object          text NOT NULL,
    field           text NOT NULL,
    event_key       text NOT NULL,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_events_company_key UNIQUE (company_id, event_key)
);
