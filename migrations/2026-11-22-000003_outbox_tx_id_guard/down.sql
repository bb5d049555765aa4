ALTER TABLE outbox DROP CONSTRAINT outbox_tx_id_is_writer;
