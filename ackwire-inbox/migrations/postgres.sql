-- ackwire-inbox schema, PostgreSQL. Idempotent: safe to run at every start. The
-- tables are created in the connection's current schema (its search_path).

-- One row per claimed message: the dedup record, committed in the same transaction
-- as the handler's effect. `id` is the encoded ackwire MessageId (17 or 29 bytes);
-- `claimed_at` is Unix time in milliseconds, for the retention cleanup.
CREATE TABLE IF NOT EXISTS ackwire_inbox (
    id         BYTEA  NOT NULL PRIMARY KEY,
    claimed_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ackwire_inbox_claimed_at ON ackwire_inbox (claimed_at);

-- Outgoing messages committed with the business change that caused them. `seq`
-- orders the rows of one (target, channel) stream (enqueue holds a transaction-level
-- advisory lock per stream, so seq order is commit order within a stream); `key` is
-- the 16-byte big-endian IdKey the relay sends the row under. `rejected` is NULL while
-- the row waits to be sent; the reason once its target refused it for good (it is
-- then in the target's dead letters and kept here for an operator, never resent).
CREATE TABLE IF NOT EXISTS ackwire_outbox (
    seq        BIGSERIAL NOT NULL PRIMARY KEY,
    target     BIGINT    NOT NULL,
    channel    BIGINT    NOT NULL,
    key        BYTEA     NOT NULL,
    payload    BYTEA     NOT NULL,
    created_at BIGINT    NOT NULL,
    rejected   TEXT
);
CREATE INDEX IF NOT EXISTS ackwire_outbox_stream ON ackwire_outbox (target, channel, seq);
