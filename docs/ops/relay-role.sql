-- Least-privilege roles for outbox-relay (docs/OPERATIONS.md#security).
--
-- Run as the owner of the outbox tables (or a superuser), after `outbox-relay migrate`, in the
-- relay's database. The grants apply to the tables of the first schema on the search_path; for
-- a custom schema (`schema = "billing"`) run it with that search_path:
--
--   PGOPTIONS='-c search_path=billing' psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -f docs/ops/relay-role.sql
--
-- Then create the login role the relay uses, a member of outbox_relay:
--
--   CREATE ROLE relay LOGIN PASSWORD '...' IN ROLE outbox_relay;
--
-- Safe to run again (after a new migration, or for another database of the same cluster).
-- The relay checks these privileges at start-up and stops with the missing ones named.

DO $$
BEGIN
    CREATE ROLE outbox_relay NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE outbox_relay_operator NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
GRANT outbox_relay TO outbox_relay_operator;

-- The schema holding the tables (no CREATE: the relay never runs DDL).
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO outbox_relay', current_schema());
END $$;

-- `outbox-relay run`: fetch pages, remove them after Kafka acknowledged them, move poison
-- events to the dead letters. No INSERT, no UPDATE: the relay never writes events.
GRANT SELECT, DELETE ON outbox TO outbox_relay;

-- The move to the dead letters is an upsert (INSERT .. ON CONFLICT DO UPDATE); `hold-key`
-- reads the held keys; /metrics and `status` count the rows. No DELETE: only operators purge.
GRANT SELECT, INSERT, UPDATE ON outbox_dead_letters TO outbox_relay;

-- keep_delivered_hours > 0: the removal after acknowledgement moves delivered events to
-- outbox_delivered (INSERT), the leader purges expired ones (SELECT, DELETE); `replay` reads
-- them. Harmless when nothing is kept (the table stays empty).
GRANT SELECT, INSERT, DELETE ON outbox_delivered TO outbox_relay;

-- dead_letters_keep_days > 0 lets the leader delete dead letters older than that. Deleting
-- dead letters is an operator's decision, so it is not granted here; to use it, run:
--   GRANT DELETE ON outbox_dead_letters TO outbox_relay;

-- The lease (leader, epoch, expiry) and the open batch's snapshots.
GRANT SELECT, INSERT, UPDATE ON outbox_relay_state TO outbox_relay;

-- Change capture (capture_tables, docs/CDC.md): snapshot requests and their progress. The
-- relay also reads each captured table for a snapshot: grant SELECT on those tables (and
-- REPLICATION to stream them), e.g. GRANT SELECT ON public.stock TO outbox_relay;
GRANT SELECT, UPDATE ON outbox_cdc_snapshots TO outbox_relay;
GRANT INSERT, UPDATE ON outbox_cdc_snapshots TO outbox_relay_operator;

-- The start-up schema check reads which migrations were applied, and the inbox's columns;
-- `status` shows inbox sizes per consumer.
GRANT SELECT ON __diesel_schema_migrations TO outbox_relay;
GRANT SELECT ON inbox TO outbox_relay;

-- `status` and the outbox_relay_oldest_transaction_age_seconds gauge see every role's open
-- transactions (not only the relay's own) through pg_stat_activity. Read-only statistics; it
-- also shows other sessions' query text: drop this line if that is not acceptable, and the
-- long-transaction alert then sees only the relay role's own sessions.
GRANT pg_read_all_stats TO outbox_relay;

-- `outbox-relay dead-letters retry | purge` and `outbox-relay replay` (an operator, not the
-- running relay): put dead letters or delivered events back into the outbox, or delete dead
-- letters. `migrate` needs the tables' owner instead.
GRANT INSERT ON outbox TO outbox_relay_operator;
GRANT DELETE ON outbox_dead_letters TO outbox_relay_operator;

-- Streaming capture (`capture = "streaming"`) only: the login role (not outbox_relay: the
-- attribute is not inherited) needs REPLICATION to stream the slot, e.g.
--
--   ALTER ROLE relay REPLICATION;
--
-- A logical replication connection names its database, so it matches the same pg_hba.conf
-- lines as the relay's other connections (the `replication` keyword there is for physical
-- replication only). The heartbeat calls
-- pg_logical_emit_message (executable by PUBLIC by default); the slot and the publication are
-- created by `outbox-relay migrate --capture streaming` run as the tables' owner with REPLICATION.
