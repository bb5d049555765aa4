-- Snapshots of captured tables (change capture, docs/CDC.md#snapshots): one row per table whose
-- existing rows the relay is to publish, read in chunks by key between watermarks in the
-- replication stream, so no row is missed and none overtakes a concurrent change. `last_key`
-- is the key of the last row of the last chunk whose events were delivered (NULL: from the
-- start); a relay killed mid-snapshot resumes after it.
CREATE TABLE outbox_cdc_snapshots (
    table_name   text        PRIMARY KEY CHECK (table_name ~ '^[^.]+\.[^.]+$'),
    chunk_size   integer     NOT NULL DEFAULT 1000 CHECK (chunk_size BETWEEN 1 AND 100000),
    last_key     text[],
    rows_read    bigint      NOT NULL DEFAULT 0,
    requested_at timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
