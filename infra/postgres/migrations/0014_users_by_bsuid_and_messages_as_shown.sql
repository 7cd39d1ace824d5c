-- WhatsApp users known by business-scoped user id (BSUID) and username; messages as WhatsApp
-- shows them (reactions on their target, edits and revokes applied, replies linked).
--
-- Contacts. Since 2026 Meta names a WhatsApp user by BSUID (`user_id`, e.g. US.1349...), and by
-- phone number (`wa_id`) only where the user lets it be shared. A contact is found by any BSUID
-- it has had (`contact_user_ids`: a user_id_update adds the new one to the old contact), else by
-- phone; `contacts.user_id` is its current BSUID. Existing rows keep their phone as it is (no row
-- changes: each was found by phone and still is). Messenger and Instagram contacts keep their
-- page-scoped id in phone_number, as before.

ALTER TABLE contacts ALTER COLUMN phone_number DROP NOT NULL;
ALTER TABLE contacts
    ADD COLUMN user_id          text,
    ADD COLUMN username         text,
    ADD COLUMN parent_user_id   text,
    ADD CONSTRAINT contacts_identified CHECK (phone_number IS NOT NULL OR user_id IS NOT NULL);

CREATE TABLE contact_user_ids (
    company_id      bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    channel         text NOT NULL,
    user_id         text NOT NULL,
    contact_id      bigint NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, channel, user_id)
);
CREATE INDEX contact_user_ids_contact_idx ON contact_user_ids (contact_id);

-- Numbers a contact had before a number change: a record that names one (a redelivery, a late
-- status to the old number) and no BSUID still finds the contact, and does not take the number
-- back. A record with an unknown BSUID is another user, whatever number it names.
CREATE TABLE contact_former_phones (
    company_id      bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    channel         text NOT NULL,
    phone_number    text NOT NULL,
    contact_id      bigint NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, channel, phone_number)
);
CREATE INDEX contact_former_phones_contact_idx ON contact_former_phones (contact_id);

-- Two workers may hold records of one user under different ids (keys follow the ids, and an
-- id change moves them): whoever makes, finds-and-changes or links a user's contact first holds
-- its ids until its transaction ends, so the other finds what it made instead of making another.
CREATE FUNCTION contact_ids_lock(p_company bigint, p_channel text, VARIADIC p_ids text[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    one text;
BEGIN
    FOR one IN SELECT DISTINCT x FROM unnest(p_ids) AS x WHERE x IS NOT NULL ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(p_company || ':' || p_channel || ':' || one, 0));
    END LOOP;
END
$$;

-- Folds contact `p_gone` into `p_keep`: its ids, its conversation's messages and what hangs on
-- them. Used when two contacts turn out to be one user (a message from a BSUID seen alone before
-- names the phone of a contact known by phone alone; a user_id_update names two known ids).
CREATE FUNCTION contact_merge(p_keep bigint, p_gone bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    company bigint;
    keep_conversation bigint;
    gone_conversation bigint;
BEGIN
    IF p_keep = p_gone THEN
        RETURN;
    END IF;
    -- A writer that found either contact (and holds it FOR SHARE) finishes first; one that
    -- looks after this waits, then finds the kept one.
    PERFORM 1 FROM contacts WHERE id IN (p_keep, p_gone) ORDER BY id FOR UPDATE;
    -- Every lookup below names the company: each is then an index scan (BENCHMARKS.md,
    -- "Figures behind the code's choices": without, a merge scanned notifications whole).
    SELECT c.company_id INTO company FROM contacts c WHERE c.id = p_keep;
    UPDATE contact_user_ids SET contact_id = p_keep WHERE contact_id = p_gone;
    UPDATE contact_former_phones SET contact_id = p_keep WHERE contact_id = p_gone;
    -- One reaction per contact and message: the later of the two stays.
    DELETE FROM message_reactions g
     USING message_reactions k
     WHERE g.contact_id = p_gone AND k.contact_id = p_keep AND k.company_id = g.company_id
       AND k.message_external_id = g.message_external_id
       AND (k.reacted_at, k.reaction_external_id) >= (g.reacted_at, g.reaction_external_id);
    DELETE FROM message_reactions k
     USING message_reactions g
     WHERE g.contact_id = p_gone AND k.contact_id = p_keep AND k.company_id = g.company_id
       AND k.message_external_id = g.message_external_id;
    UPDATE message_reactions SET contact_id = p_keep WHERE contact_id = p_gone;
    SELECT id INTO keep_conversation FROM conversations
     WHERE company_id = company AND contact_id = p_keep AND deleted_at IS NULL FOR UPDATE;
    SELECT id INTO gone_conversation FROM conversations
     WHERE company_id = company AND contact_id = p_gone AND deleted_at IS NULL FOR UPDATE;
    IF gone_conversation IS NOT NULL AND keep_conversation IS NULL THEN
        UPDATE conversations SET contact_id = p_keep, updated_at = now() WHERE id = gone_conversation;
    ELSIF gone_conversation IS NOT NULL THEN
        -- Notifications are found by (agent, message), the index they have, from the arrays of
        -- both: as a join the planner scanned notifications whole for each merge.
        UPDATE notifications SET conversation_id = keep_conversation
         WHERE user_id = ANY (ARRAY(SELECT u.id FROM users u WHERE u.company_id = company))
           AND message_id = ANY (ARRAY(SELECT m.id FROM messages m
                                        WHERE m.conversation_id = gone_conversation));
        UPDATE messages SET conversation_id = keep_conversation, updated_at = now()
         WHERE conversation_id = gone_conversation;
        -- An auto-reply already due in both keeps the kept conversation's.
        DELETE FROM auto_replies g
         USING auto_replies k
         WHERE g.company_id = company AND g.conversation_id = gone_conversation
           AND k.company_id = company AND k.conversation_id = keep_conversation
           AND k.kind = g.kind AND k.window_key = g.window_key;
        UPDATE auto_replies SET conversation_id = keep_conversation
         WHERE company_id = company AND conversation_id = gone_conversation;
        UPDATE conversations k
           SET last_message_id = CASE WHEN k.last_message_at IS NULL OR k.last_message_at < g.last_message_at
                                      THEN g.last_message_id ELSE k.last_message_id END,
               last_message_preview = CASE WHEN k.last_message_at IS NULL OR k.last_message_at < g.last_message_at
                                           THEN g.last_message_preview ELSE k.last_message_preview END,
               last_message_at = GREATEST(k.last_message_at, g.last_message_at),
               unread_count = k.unread_count + g.unread_count,
               referral = COALESCE(k.referral, g.referral),
               status = CASE WHEN g.unread_count > 0 AND k.status = 'closed' THEN 'open' ELSE k.status END,
               updated_at = now()
          FROM conversations g
         WHERE k.id = keep_conversation AND g.id = gone_conversation;
        UPDATE conversations SET deleted_at = now(), updated_at = now() WHERE id = gone_conversation;
    END IF;
    UPDATE contacts k
       SET name = COALESCE(k.name, g.name),
           username = COALESCE(k.username, g.username),
           parent_user_id = COALESCE(k.parent_user_id, g.parent_user_id),
           updated_at = now()
      FROM contacts g
     WHERE k.id = p_keep AND g.id = p_gone;
    -- Deleted, it keeps what it was known by (the unique phone index skips deleted rows).
    UPDATE contacts SET deleted_at = now(), updated_at = now() WHERE id = p_gone;
END
$$;

-- The contact a webhook names, made or updated: found by BSUID (any it has had), else by phone.
-- A phone held by another contact moves to this one: a contact known by that phone alone is the
-- same user (merged in); one with a BSUID of its own is a user whose number was given to
-- someone else (it keeps its BSUID and loses the number). Given values overwrite (a username or
-- a name can change); missing ones leave what is known. Concurrent writers: a lost race to make
-- the contact or claim the id retries the lookup. Returns the contact and its phone number as
-- now known (the calling statement cannot see rows the function made).
CREATE FUNCTION contact_for(
    p_company bigint, p_channel text, p_phone text, p_user_id text, p_username text,
    p_parent text, p_name text, OUT id bigint, OUT phone_number text
)
LANGUAGE plpgsql AS $$
DECLARE
    found bigint;
    holder bigint;
    holder_user_id text;
    phone text;
    held bigint;
BEGIN
    IF p_phone IS NULL AND p_user_id IS NULL THEN
        RAISE EXCEPTION 'a contact needs a phone number or a user id';
    END IF;
    PERFORM contact_ids_lock(p_company, p_channel, 'u:' || p_user_id, 'p:' || p_phone);
    LOOP
        found := contact_known(p_company, p_channel, p_user_id, NULL);
        holder := NULL;
        phone := p_phone;
        IF found IS NOT NULL AND EXISTS (SELECT 1 FROM contacts c WHERE c.id = found
                                          AND c.user_id IS DISTINCT FROM p_user_id) THEN
            -- Named by a BSUID the user has had, not their current one: a record from before
            -- the change (a redelivery, a late one), whose phone number is no longer theirs.
            phone := NULL;
        END IF;
        IF phone IS NOT NULL THEN
            SELECT c.id, c.user_id INTO holder, holder_user_id FROM contacts c
             WHERE c.company_id = p_company AND c.channel = p_channel AND c.phone_number = p_phone
               AND c.deleted_at IS NULL;
        END IF;
        IF found IS NULL AND holder IS NULL AND p_user_id IS NULL THEN
            found := contact_known(p_company, p_channel, NULL, p_phone);  -- by a number it had
            IF found IS NOT NULL THEN
                phone := NULL;  -- a number the user had: theirs no longer
            END IF;
        END IF;

        IF found IS NULL AND holder IS NOT NULL
           AND (p_user_id IS NULL OR holder_user_id IS NULL OR holder_user_id = p_user_id) THEN
            found := holder;  -- known by phone: gains the BSUID, if one is given
        ELSIF found IS NOT NULL AND holder IS NOT NULL AND holder <> found THEN
            IF holder_user_id IS NULL THEN
                PERFORM contact_merge(found, holder);
            ELSE
                UPDATE contacts c SET phone_number = NULL, updated_at = now() WHERE c.id = holder;
            END IF;
        ELSIF found IS NULL AND holder IS NOT NULL THEN
            UPDATE contacts c SET phone_number = NULL, updated_at = now() WHERE c.id = holder;
        END IF;

        BEGIN
            IF found IS NULL THEN
                INSERT INTO contacts AS c (company_id, phone_number, channel, name, user_id, username,
                                           parent_user_id)
                VALUES (p_company, p_phone, p_channel, p_name, p_user_id, p_username, p_parent)
                RETURNING c.id INTO found;
            ELSE
                UPDATE contacts c
                   SET phone_number = COALESCE(phone, c.phone_number),
                       user_id = COALESCE(c.user_id, p_user_id),
                       name = COALESCE(p_name, c.name),
                       username = COALESCE(p_username, c.username),
                       parent_user_id = COALESCE(p_parent, c.parent_user_id),
                       updated_at = now()
                 WHERE c.id = found
                   AND (c.phone_number IS DISTINCT FROM COALESCE(phone, c.phone_number)
                        OR c.user_id IS DISTINCT FROM COALESCE(c.user_id, p_user_id)
                        OR c.name IS DISTINCT FROM COALESCE(p_name, c.name)
                        OR c.username IS DISTINCT FROM COALESCE(p_username, c.username)
                        OR c.parent_user_id IS DISTINCT FROM COALESCE(p_parent, c.parent_user_id));
            END IF;
            IF p_user_id IS NOT NULL THEN
                INSERT INTO contact_user_ids (company_id, channel, user_id, contact_id)
                VALUES (p_company, p_channel, p_user_id, found)
                ON CONFLICT DO NOTHING;
            END IF;
            -- Held until the batch commits, so that a merge cannot fold it away meanwhile; one
            -- that did since the lookup leaves it deleted: look again.
            held := NULL;
            SELECT c.id, c.phone_number INTO held, phone_number FROM contacts c
             WHERE c.id = found AND c.deleted_at IS NULL FOR SHARE;
            IF held IS NULL THEN
                CONTINUE;
            END IF;
            id := found;
            RETURN;
        EXCEPTION WHEN unique_violation THEN
            -- Another writer made the contact, or took the phone, since the lookup: look again.
        END;
    END LOOP;
END
$$;

-- The contact a BSUID (any it has had) names, else the one a phone number names (one it has had,
-- when no BSUID is given); NULL if none.
CREATE FUNCTION contact_known(p_company bigint, p_channel text, p_user_id text, p_phone text)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    found bigint;
BEGIN
    IF p_user_id IS NOT NULL THEN
        SELECT c.id INTO found
          FROM contact_user_ids cu JOIN contacts c ON c.id = cu.contact_id AND c.deleted_at IS NULL
         WHERE cu.company_id = p_company AND cu.channel = p_channel AND cu.user_id = p_user_id;
        IF found IS NOT NULL THEN
            RETURN found;
        END IF;
    END IF;
    IF p_phone IS NOT NULL THEN
        SELECT id INTO found FROM contacts
         WHERE company_id = p_company AND channel = p_channel AND phone_number = p_phone
           AND deleted_at IS NULL;
        IF found IS NULL AND p_user_id IS NULL THEN
            SELECT f.contact_id INTO found FROM contact_former_phones f
              JOIN contacts c ON c.id = f.contact_id AND c.deleted_at IS NULL
             WHERE f.company_id = p_company AND f.channel = p_channel AND f.phone_number = p_phone;
        END IF;
    END IF;
    RETURN found;
END
$$;

-- A user's BSUID changed (a user_id_update, or a system message: a new phone number makes a new
-- BSUID), or, before BSUIDs, their phone number: the new ids name the contact the old ones did,
-- and are its current ones. Either side may be known already, both (then they were one user:
-- merged into the old), or neither (the contact is made, known by both). Returns the contact.
CREATE FUNCTION contact_identity_changed(
    p_company bigint, p_channel text, p_old_user_id text, p_new_user_id text, p_old_phone text,
    p_new_phone text, p_parent text
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    old_contact bigint;
    new_contact bigint;
    current_user_id text;
BEGIN
    PERFORM contact_ids_lock(p_company, p_channel, 'u:' || p_old_user_id, 'u:' || p_new_user_id,
                             'p:' || p_old_phone, 'p:' || p_new_phone);
    old_contact := contact_known(p_company, p_channel, p_old_user_id, p_old_phone);
    new_contact := contact_known(p_company, p_channel, p_new_user_id,
                                 CASE WHEN p_new_user_id IS NULL THEN p_new_phone END);
    IF old_contact IS NULL AND new_contact IS NULL THEN
        old_contact := (contact_for(p_company, p_channel, p_new_phone,
                                    COALESCE(p_new_user_id, p_old_user_id), NULL, p_parent, NULL)).id;
    ELSIF old_contact IS NULL THEN
        old_contact := new_contact;
    ELSIF new_contact IS NOT NULL AND new_contact <> old_contact THEN
        PERFORM contact_merge(old_contact, new_contact);
    END IF;
    IF p_old_user_id IS NOT NULL THEN
        INSERT INTO contact_user_ids (company_id, channel, user_id, contact_id)
        VALUES (p_company, p_channel, p_old_user_id, old_contact)
        ON CONFLICT (company_id, channel, user_id) DO UPDATE SET contact_id = EXCLUDED.contact_id;
    END IF;
    IF p_new_user_id IS NOT NULL THEN
        INSERT INTO contact_user_ids (company_id, channel, user_id, contact_id)
        VALUES (p_company, p_channel, p_new_user_id, old_contact)
        ON CONFLICT (company_id, channel, user_id) DO UPDATE SET contact_id = EXCLUDED.contact_id;
        UPDATE contacts SET user_id = p_new_user_id, parent_user_id = COALESCE(p_parent, parent_user_id),
                            updated_at = now()
         WHERE id = old_contact;
    END IF;
    IF p_new_phone IS NOT NULL THEN
        INSERT INTO contact_former_phones (company_id, channel, phone_number, contact_id)
        SELECT p_company, p_channel, c.phone_number, c.id FROM contacts c
         WHERE c.id = old_contact AND c.phone_number IS NOT NULL AND c.phone_number <> p_new_phone
        ON CONFLICT (company_id, channel, phone_number) DO UPDATE SET contact_id = EXCLUDED.contact_id;
        IF p_old_phone IS NOT NULL AND p_old_phone <> p_new_phone THEN
            INSERT INTO contact_former_phones (company_id, channel, phone_number, contact_id)
            VALUES (p_company, p_channel, p_old_phone, old_contact)
            ON CONFLICT (company_id, channel, phone_number) DO UPDATE SET contact_id = EXCLUDED.contact_id;
        END IF;
        DELETE FROM contact_former_phones
         WHERE company_id = p_company AND channel = p_channel AND phone_number = p_new_phone;
        SELECT user_id INTO current_user_id FROM contacts WHERE id = old_contact;
        IF current_user_id IS NOT NULL THEN
            -- By its BSUID: the number moves to it from any contact that holds it.
            RETURN (contact_for(p_company, p_channel, p_new_phone, current_user_id, NULL, NULL, NULL)).id;
        END IF;
        -- Known by phone alone: the new number replaces the old (a contact that held the new
        -- one was found above, and merged in).
        UPDATE contacts SET phone_number = p_new_phone, updated_at = now() WHERE id = old_contact;
    END IF;
    RETURN old_contact;
END
$$;

-- Messages as WhatsApp shows them.
ALTER TABLE messages
    ADD COLUMN reply_to         text,       -- the external id of the message it quotes (context.id)
    ADD COLUMN forwarded        boolean NOT NULL DEFAULT false,
    ADD COLUMN referral         jsonb,      -- a click-to-WhatsApp ad's referral
    ADD COLUMN edited_at        timestamptz,
    ADD COLUMN original_body    text,       -- the body before its first edit
    ADD COLUMN deleted_at       timestamptz; -- revoked by its sender: kept, not shown

ALTER TABLE conversations ADD COLUMN referral jsonb;  -- of its first message that had one

-- Reactions: one per reacting contact and message, the latest winning; a removal is kept as a
-- NULL emoji, so that the reaction it removed, redelivered, stays removed. Keyed by the target's
-- external id: a reaction that arrives before its message is kept and shows once it lands.
CREATE TABLE message_reactions (
    company_id      bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    message_external_id text NOT NULL,
    contact_id      bigint NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    emoji           text,
    reacted_at      timestamptz NOT NULL,
    reaction_external_id text NOT NULL,  -- the reaction's own message id: breaks a tie in time
    PRIMARY KEY (company_id, message_external_id, contact_id)
);
CREATE INDEX message_reactions_contact_idx ON message_reactions (contact_id);  -- for merges

-- Edits and revokes, kept as they came (the audit trail and the earlier versions), by their own
-- message id; the latest edit is the target's body, a revoke marks it deleted. Also keyed by the
-- target's external id, for those that arrive first.
CREATE TABLE message_amendments (
    company_id      bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    external_id     text NOT NULL,
    message_external_id text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('edit', 'revoke')),
    body            text,
    content         jsonb NOT NULL,
    at              timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, external_id)
);
CREATE INDEX message_amendments_target_idx ON message_amendments (company_id, message_external_id, at);
