DROP INDEX outbox_tx_id_idx;
