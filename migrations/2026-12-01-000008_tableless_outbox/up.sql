-- The tableless outbox (docs/TABLES.md#tableless-outbox-message-format-v1): a writer may emit an
-- event as a transactional logical decoding message instead of a row. It commits or rolls back
-- with the caller's transaction like a row would, but leaves no row, index entry or dead tuple:
-- the event exists only in the WAL until the relay's replication slot has confirmed it.
--
-- Both functions are created in the schema this migration runs in (the outbox's schema) and
-- name it as a constant, so an outbox in schema `svc` emits under its own prefix `outbox:svc`
-- whatever the caller's search_path is.
DO $migration$
DECLARE
    s text := pg_catalog.current_schema();
BEGIN
    IF s IS NULL THEN
        RAISE EXCEPTION 'no schema to create the tableless outbox functions in: search_path names no existing schema';
    END IF;

    -- The prefix of this outbox's messages. The relay calls it to learn which prefix to read.
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION %I.outbox_message_prefix() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
        s, pg_catalog.format('SELECT %L::text', 'outbox:' || s));

    -- Validates like the CHECK and NOT NULL constraints of `outbox` (same order as an INSERT
    -- checks them: NOT NULL by column, then CHECK by constraint name; same SQLSTATE, constraint
    -- or column, table and schema), then emits message format v1. Builtins are called through
    -- pg_catalog and this schema's prefix function through its schema, so the caller's
    -- search_path cannot replace them.
    EXECUTE pg_catalog.replace(pg_catalog.replace($fn$
CREATE FUNCTION @schema@.outbox_emit(
    topic         text,
    partition_key text,
    event_type    text,
    payload       bytea,
    headers       jsonb DEFAULT '{}',
    content_type  text  DEFAULT 'application/json',
    traceparent   text  DEFAULT NULL,
    new_event_id  uuid  DEFAULT NULL
) RETURNS TABLE (id bigint, event_id uuid)
LANGUAGE plpgsql VOLATILE
AS $body$
DECLARE
    failed text;
    detail text;
    lsn    pg_lsn;
BEGIN
    failed := CASE
        WHEN topic IS NULL THEN 'topic'
        WHEN partition_key IS NULL THEN 'partition_key'
        WHEN event_type IS NULL THEN 'event_type'
        WHEN payload IS NULL THEN 'payload'
        WHEN headers IS NULL THEN 'headers'
        WHEN content_type IS NULL THEN 'content_type'
    END;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'null value in column "%" of relation "outbox" violates not-null constraint', failed
            USING ERRCODE = 'not_null_violation', COLUMN = failed, TABLE = 'outbox',
                  SCHEMA = @schema_literal@,
                  DETAIL = pg_catalog.format('outbox_emit was called with %s NULL.', failed);
    END IF;

    IF NOT (content_type <> '') THEN
        failed := 'outbox_content_type_not_empty';
        detail := 'content_type must not be empty.';
    ELSIF NOT (event_type <> '') THEN
        failed := 'outbox_event_type_not_empty';
        detail := 'event_type must not be empty.';
    ELSIF NOT (pg_catalog.jsonb_typeof(headers) = 'object'
               AND NOT pg_catalog.jsonb_path_exists(headers, '$.* ? (@.type() != "string")')) THEN
        failed := 'outbox_headers_string_map';
        detail := 'headers must be a JSON object of string values.';
    ELSIF NOT (partition_key <> '') THEN
        failed := 'outbox_partition_key_not_empty';
        detail := 'partition_key must not be empty.';
    ELSIF NOT (topic ~ '^[A-Za-z0-9._-]{1,249}$' AND topic NOT IN ('.', '..')) THEN
        failed := 'outbox_topic_valid';
        detail := pg_catalog.format('topic %s is not 1-249 characters of [A-Za-z0-9._-] other than "." and "..".',
                                    pg_catalog.quote_literal(pg_catalog.left(topic, 300)));
    ELSIF NOT (traceparent IS NULL OR traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') THEN
        failed := 'outbox_traceparent_format';
        detail := 'traceparent must be NULL or 00-<32 hex>-<16 hex>-<2 hex> in lowercase hex.';
    END IF;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'new row for relation "outbox" violates check constraint "%"', failed
            USING ERRCODE = 'check_violation', CONSTRAINT = failed, TABLE = 'outbox',
                  SCHEMA = @schema_literal@, DETAIL = detail;
    END IF;

    -- Below wal_level = logical the message is written but can never be decoded: the event
    -- would be lost without an error.
    IF pg_catalog.current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'outbox_emit needs wal_level = logical, the server has %', pg_catalog.current_setting('wal_level')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Set wal_level = logical and restart the server, or write to the outbox table.';
    END IF;

    event_id := COALESCE(new_event_id, pg_catalog.gen_random_uuid());
    lsn := pg_catalog.pg_logical_emit_message(
        true,
        @schema@.outbox_message_prefix(),
        pg_catalog.concat(
            '{"v":1,"event_id":', pg_catalog.to_json(event_id),
            ',"topic":', pg_catalog.to_json(topic),
            ',"partition_key":', pg_catalog.to_json(partition_key),
            ',"event_type":', pg_catalog.to_json(event_type),
            ',"payload":"', pg_catalog.translate(pg_catalog.encode(payload, 'base64'), E'\n', ''),
            '","headers":{',
            (SELECT pg_catalog.string_agg(pg_catalog.concat(pg_catalog.to_json(h.key), ':', pg_catalog.to_json(h.value)), ',')
               FROM pg_catalog.jsonb_each_text(headers) AS h),
            '},"content_type":', pg_catalog.to_json(content_type),
            ',"traceparent":', COALESCE(pg_catalog.to_json(traceparent)::text, 'null'),
            ',"tx_id":"', pg_catalog.pg_current_xact_id(),
            '","created_at":"',
            pg_catalog.to_char(pg_catalog.timezone('UTC', pg_catalog.now()), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            '"}'));
    -- Negative: outbox row ids are positive, so the relay tells the two apart by sign.
    id := -(pg_catalog.pg_wal_lsn_diff(lsn, '0/0')::bigint);
    RETURN NEXT;
END
$body$
$fn$, '@schema_literal@', pg_catalog.quote_literal(s)), '@schema@', pg_catalog.quote_ident(s));
END
$migration$;

COMMENT ON FUNCTION outbox_message_prefix() IS
    'Prefix of this outbox''s tableless events (pg_logical_emit_message). Contract: docs/TABLES.md';
COMMENT ON FUNCTION outbox_emit(text, text, text, bytea, jsonb, text, text, uuid) IS
    'Enqueues one event without a row: a transactional logical decoding message, format v1. Contract: docs/TABLES.md';
