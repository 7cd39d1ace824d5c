-- Login attempts per account and per client address (api/login_limits.py), in Postgres so that
-- every API replica counts the same attempts. One row per key: `failures` attempts since the
-- window began, and the window's end (the row is dead after it, and the pruning job deletes it).
-- An attempt takes a slot before its password is checked and gives it back when it succeeds, so
-- concurrent guesses cannot overshoot the limit. The key is an HMAC of the normalised email or
-- of the address, never the value: the table holds no email (nor a password typed in its place)
-- and no address.
CREATE TABLE IF NOT EXISTS login_attempts (
    kind        text        NOT NULL CHECK (kind IN ('account', 'address')),
    key         bytea       NOT NULL,
    failures    integer     NOT NULL CHECK (failures >= 0),
    window_ends timestamptz NOT NULL,
    PRIMARY KEY (kind, key)
) WITH (fillfactor = 70);  -- room for HOT updates: a row is rewritten at every attempt

CREATE INDEX IF NOT EXISTS login_attempts_window_ends ON login_attempts (window_ends);
