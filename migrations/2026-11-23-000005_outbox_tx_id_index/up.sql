-- Capture reads a batch by transaction id, as PgQ does: the transactions that started after the
-- previous snapshot (tx_id >= its xmax) plus the few that were running then (its xip list). This
-- index finds them without walking the rows removed since a long transaction began (those stay
-- in the id index as dead entries until that transaction ends). xid8 grows, so inserts append.
CREATE INDEX outbox_tx_id_idx ON outbox (tx_id);
