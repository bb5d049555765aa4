-- The outbox table is a public, stable contract (docs/TABLES.md). Any service, in any language,
-- may enqueue with a plain INSERT naming only topic, partition_key, event_type and payload;
-- every other column has a default. The CHECK constraints reject what the relay could never
-- deliver, at INSERT time, with the constraint name in the error.
CREATE TABLE outbox (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    topic         text        NOT NULL,
    partition_key text        NOT NULL,
    event_type    text        NOT NULL,
    payload       bytea       NOT NULL,
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    content_type  text        NOT NULL DEFAULT 'application/json',
    traceparent   text,
    -- The writing transaction's id: capture takes rows by commit visibility, never by id order.
    tx_id         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT outbox_event_id_key UNIQUE (event_id),
    CONSTRAINT outbox_topic_valid CHECK (
        topic ~ '^[A-Za-z0-9._-]{1,249}$' AND topic NOT IN ('.', '..')
    ),
    CONSTRAINT outbox_partition_key_not_empty CHECK (partition_key <> ''),
    CONSTRAINT outbox_event_type_not_empty CHECK (event_type <> ''),
    CONSTRAINT outbox_content_type_not_empty CHECK (content_type <> ''),
    CONSTRAINT outbox_headers_string_map CHECK (
        jsonb_typeof(headers) = 'object'
        AND NOT jsonb_path_exists(headers, '$.* ? (@.type() != "string")')
    ),
    CONSTRAINT outbox_traceparent_format CHECK (
        traceparent IS NULL OR traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
    )
);

COMMENT ON TABLE outbox IS
    'Transactional outbox: rows are written in the business transaction and removed by outbox-relay once Kafka acknowledged them. Contract: docs/TABLES.md';

-- Events that were permanently rejected (too large, unknown topic, not authorised) or failed
-- too often. They leave the hot table so they never block other keys; operators list, retry or
-- purge them with `outbox-relay dead-letters`.
CREATE TABLE outbox_dead_letters (
    id               bigint      PRIMARY KEY,
    event_id         uuid        NOT NULL,
    topic            text        NOT NULL,
    partition_key    text        NOT NULL,
    event_type       text        NOT NULL,
    payload          bytea       NOT NULL,
    headers          jsonb       NOT NULL,
    content_type     text        NOT NULL,
    traceparent      text,
    tx_id            xid8        NOT NULL,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    last_error       text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_dead_letters_topic_key_idx ON outbox_dead_letters (topic, partition_key);

-- One row per outbox table: who leads, under which fencing epoch, until when, and the PgQ-style
-- snapshot pair of the batch in progress. Only outbox-relay writes here.
CREATE TABLE outbox_relay_state (
    outbox_table     text        PRIMARY KEY,
    leader_id        text,
    leader_epoch     bigint      NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    prev_snapshot    pg_snapshot,
    cur_snapshot     pg_snapshot,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
