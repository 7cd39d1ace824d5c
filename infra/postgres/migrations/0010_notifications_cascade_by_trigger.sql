-- Notifications lose their last two foreign keys (user_id, message_id); statement triggers keep
-- what those keys gave: deleting a user or a message deletes its notifications.
--
-- Why: a foreign key checks every inserted row by locking the row it references (FOR KEY SHARE).
-- Every worker batch notifies the same few agents of a company, so the workers' transactions all
-- share locks on the same `users` rows, and Postgres keeps a shared lock as a MultiXact that each
-- further check must look up. With two workers these two checks cost 26 µs of Postgres CPU per
-- record of some 60; without them, 11 of 40 (BENCHMARKS.md, "worker x2").
--
-- What the keys still checked that nothing else does: none of the worker's rows can miss them.
-- The worker inserts a notification in the transaction that inserted its message, for users it
-- reads in the same statement. The one thing lost is a race: a user deleted while a batch that
-- notifies them is in flight leaves that batch's notifications for nobody. Users are deactivated,
-- not deleted, by everything we ship; a deleted company takes its users, and with them these rows.

ALTER TABLE notifications
    DROP CONSTRAINT notifications_user_id_fkey,
    DROP CONSTRAINT notifications_message_id_fkey;

-- Statement-level, over transition tables: one DELETE per statement, whatever it deletes (a
-- company's cascade deletes its users in one statement).
CREATE FUNCTION notifications_forget_users() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM notifications n USING gone WHERE n.user_id = gone.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_delete_notifications
    AFTER DELETE ON users
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION notifications_forget_users();

-- No index on message_id (it would cost every insert what the key did): nothing we ship deletes a
-- message, and a company's deletion, which does, reads notifications once for all its messages.
CREATE FUNCTION notifications_forget_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM notifications n USING gone WHERE n.message_id = gone.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_delete_notifications
    AFTER DELETE ON messages
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION notifications_forget_messages();
