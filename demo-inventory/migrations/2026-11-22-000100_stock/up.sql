-- The inventory centre's stock, per product and warehouse, in three numbers: on hand (what the
-- warehouse holds, mirrored from its movements), reserved (by confirmed orders not yet shipped)
-- and available = on hand - reserved. An order reserves with ONE conditional UPDATE on
-- available; a shipment deducts on hand and the reservation; a cancellation before shipment
-- releases the reservation. on_hand has no CHECK here: it mirrors the warehouse, whose own
-- table refuses negative stock, and movements of one product may arrive in another order than
-- the warehouse committed them (the mirror can dip for a moment).
CREATE TABLE stock (
    product   text    NOT NULL,
    warehouse text    NOT NULL,
    on_hand   integer NOT NULL DEFAULT 0,
    reserved  integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    available integer GENERATED ALWAYS AS (on_hand - reserved) STORED,
    PRIMARY KEY (product, warehouse)
);

-- One reservation per order (the key makes "reserve once" a constraint); its state moves
-- RESERVED -> RELEASED (cancelled before shipment) or RESERVED -> SHIPPED, each once.
CREATE TABLE reservations (
    order_id   text        PRIMARY KEY,
    product    text        NOT NULL,
    warehouse  text        NOT NULL,
    quantity   integer     NOT NULL CHECK (quantity > 0),
    state      text        NOT NULL CHECK (state IN ('RESERVED', 'RELEASED', 'SHIPPED')),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    FOREIGN KEY (product, warehouse) REFERENCES stock (product, warehouse)
);
CREATE INDEX reservations_stock_idx ON reservations (product, warehouse) WHERE state = 'RESERVED';

-- Every warehouse movement applied to on_hand, once (its id is the warehouse's), with how it
-- arrived (push, capture, pull, dual, repair) and when: the sync delay is applied_at -
-- created_at (both clocks are the same server's in the demo).
CREATE TABLE movements (
    movement_id uuid        PRIMARY KEY,
    warehouse   text        NOT NULL,
    product     text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('inbound', 'shipment', 'stocktake')),
    delta       integer     NOT NULL,
    order_id    text,
    path        text        NOT NULL,
    created_at  timestamptz NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- A shipment whose order held no reservation (cancelled while it shipped): a return case.
    unreserved  boolean     NOT NULL DEFAULT false,
    -- For a movement a reconciliation applied (path 'repair'): the path that brought it later,
    -- if any. NULL: the path lost it (real drift); set: the reconciliation ran ahead of a slow
    -- path (its settle window was shorter than an outage), and nothing was applied twice.
    arrived_by  text,
    arrived_at  timestamptz
);
CREATE INDEX movements_applied_idx ON movements (applied_at);

-- The pull path's position in each warehouse's movements (see demo-warehouse's GET /movements).
CREATE TABLE sync_cursors (
    warehouse  text        PRIMARY KEY,
    position   text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- What each reconciliation found and repaired.
CREATE TABLE reconcile_runs (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    warehouse  text        NOT NULL,
    missing    integer     NOT NULL,
    repaired   integer     NOT NULL,
    on_hand_off integer    NOT NULL
);
