-- ackwire-inbox schema, SQLite. Idempotent: safe to run at every start.

-- One row per claimed message: the dedup record, committed in the same transaction
-- as the handler's effect. `id` is the encoded ackwire MessageId (17 or 29 bytes);
-- `claimed_at` is Unix time in milliseconds, for the retention cleanup.
CREATE TABLE IF NOT EXISTS ackwire_inbox (
    id         BLOB    NOT NULL PRIMARY KEY,
    claimed_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ackwire_inbox_claimed_at ON ackwire_inbox (claimed_at);

-- Outgoing messages committed with the business change that caused them. `seq`
-- orders the rows of one (target, channel) stream (AUTOINCREMENT: never reused);
-- `key` is the 16-byte big-endian IdKey the relay sends the row under. `rejected` is
-- NULL while the row waits to be sent; the reason once its target refused it for good
-- (it is then in the target's dead letters and kept here for an operator, never resent).
CREATE TABLE IF NOT EXISTS ackwire_outbox (
    seq        INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    target     INTEGER NOT NULL,
    channel    INTEGER NOT NULL,
    key        BLOB    NOT NULL,
    payload    BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    rejected   TEXT
);
CREATE INDEX IF NOT EXISTS ackwire_outbox_stream ON ackwire_outbox (target, channel, seq);
