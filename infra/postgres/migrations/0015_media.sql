-- Media the agents can open: what a message carries (a photo, a voice note, a document, a
-- Messenger or Instagram attachment, a file an agent attached to a reply), fetched, kept and
-- served.
--
-- A media row belongs to a message by (company_id, message_external_id) and its position among
-- the message's attachments (WhatsApp: always 0; Messenger can send several). The webhook writer
-- makes it, pending, in the transaction that makes the message; the media agent fetches it and
-- marks it stored (with its object's key in the media store) or failed (with the reason); the
-- retention job deletes old objects and marks their rows expired. `id` is what the read API's URL
-- names: not a count, so one company cannot walk another's (which would get 404 anyway).

ALTER TABLE companies ADD COLUMN meta_access_token text;

CREATE TABLE media (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    company_id           bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    message_external_id  text NOT NULL,
    position             smallint NOT NULL DEFAULT 0,
    direction            text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    -- Where it comes from: 'whatsapp' (a Graph API media id), 'messenger' / 'instagram' (an
    -- attachment URL of its own), 'upload' (an agent's reply).
    source               text NOT NULL CHECK (source IN ('whatsapp', 'messenger', 'instagram', 'upload')),
    source_ref           text,              -- the media id or the attachment URL
    kind                 text NOT NULL,     -- image, audio, voice, video, document, sticker, file
    mime_type            text,
    file_name            text,
    caption              text,
    expected_sha256      text,              -- hex, as the webhook gave it
    size_bytes           bigint,
    sha256               text,              -- hex, of what was stored
    state                text NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'stored', 'failed', 'expired')),
    reason               text,              -- why it failed, or what the last attempt met
    attempts             integer NOT NULL DEFAULT 0,
    storage_key          text,
    stored_at            timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT media_message_position_key UNIQUE (company_id, message_external_id, position),
    CONSTRAINT media_stored_has_key CHECK (state <> 'stored' OR storage_key IS NOT NULL)
);
-- The console's failures, the retention job's oldest first.
CREATE INDEX media_failed_idx ON media (company_id, updated_at DESC) WHERE state = 'failed';
CREATE INDEX media_stored_at_idx ON media (stored_at) WHERE state = 'stored';
