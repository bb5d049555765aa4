-- A warehouse system's (WMS) own tables: what it physically holds, and every movement of it.
CREATE TABLE wh_stock (
    product   text    NOT NULL,
    warehouse text    NOT NULL,
    on_hand   integer NOT NULL CHECK (on_hand >= 0),
    PRIMARY KEY (product, warehouse)
);

-- One row per movement, written in the movement's transaction. The change-capture path reads
-- this table from the WAL (the warehouse code writes no event); the pull path reads it by
-- (tx_id, id) below the oldest running transaction, so a late commit is never skipped.
CREATE TABLE wh_movements (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    movement_id   uuid        NOT NULL UNIQUE,
    warehouse     text        NOT NULL,
    product       text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('inbound', 'shipment', 'stocktake')),
    delta         integer     NOT NULL,
    on_hand_after integer     NOT NULL,
    order_id      text,
    tx_id         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- An order ships once.
CREATE UNIQUE INDEX wh_movements_one_shipment ON wh_movements (order_id) WHERE kind = 'shipment';
CREATE INDEX wh_movements_tx_idx ON wh_movements (tx_id, id);
-- The change-capture path keys each movement's event by (warehouse, product), so a product's
-- movements stay in order on one partition; a key outside the primary key must be in the
-- replica identity (rows are only ever inserted here, so FULL costs nothing).
ALTER TABLE wh_movements REPLICA IDENTITY FULL;
