DROP TABLE reconcile_runs; DROP TABLE sync_cursors; DROP TABLE movements; DROP TABLE reservations; DROP TABLE stock;
