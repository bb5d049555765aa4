-- Consumer-side deduplication. A consumer inserts (consumer, message_id) with
-- INSERT ... ON CONFLICT DO NOTHING in the same transaction as its business change and applies
-- the change only when a row was inserted. Retention: docs/TABLES.md#inbox-retention.
CREATE TABLE inbox (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    topic        text,
    kafka_partition integer,
    kafka_offset bigint,
    processed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_pkey PRIMARY KEY (consumer, message_id),
    CONSTRAINT inbox_consumer_not_empty CHECK (consumer <> ''),
    CONSTRAINT inbox_message_id_not_empty CHECK (message_id <> '')
);
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);
