DROP TABLE outbox_cdc_snapshots;
