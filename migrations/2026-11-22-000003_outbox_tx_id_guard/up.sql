-- tx_id must be the writing transaction's id: capture decides by its commit visibility, so a
-- supplied value (a hand-written re-queue copying every column, rows copied from another
-- cluster) could make a row invisible to the relay forever. Rows are immutable once written.
-- NOT VALID: existing rows (written by other transactions) are not re-checked.
ALTER TABLE outbox
    ADD CONSTRAINT outbox_tx_id_is_writer CHECK (tx_id = pg_current_xact_id()) NOT VALID;
