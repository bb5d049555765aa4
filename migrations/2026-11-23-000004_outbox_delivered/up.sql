-- Delivered events, kept for replay when the relay runs with keep_delivered_hours > 0
-- (docs/RELAY.md#retention). The relay moves a row here in the same statement that removes it
-- from `outbox` (so `outbox` still holds only the backlog: no delivered rows are kept in the hot
-- table and updated), and its leader purges rows older than the configured hours in small
-- batches by `delivered_at`. With the default (keep_delivered_hours = 0) this table stays empty.
CREATE TABLE outbox_delivered (
    id            bigint      PRIMARY KEY,
    event_id      uuid        NOT NULL,
    topic         text        NOT NULL,
    partition_key text        NOT NULL,
    event_type    text        NOT NULL,
    payload       bytea       NOT NULL,
    headers       jsonb       NOT NULL,
    content_type  text        NOT NULL,
    traceparent   text,
    tx_id         xid8        NOT NULL,
    created_at    timestamptz NOT NULL,
    delivered_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_delivered_delivered_at_idx ON outbox_delivered (delivered_at);

COMMENT ON TABLE outbox_delivered IS
    'Events outbox-relay delivered, kept keep_delivered_hours for `outbox-relay replay`, then purged. Contract: docs/TABLES.md';

-- The leader's dead-letter purge (dead_letters_keep_days > 0) goes by age.
CREATE INDEX outbox_dead_letters_dead_lettered_at_idx ON outbox_dead_letters (dead_lettered_at);
