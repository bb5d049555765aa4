-- Stock per product: never below zero, enforced by the database.
CREATE TABLE stock (
    product   text    PRIMARY KEY,
    available integer NOT NULL CHECK (available >= 0)
);

-- Every movement of stock, including the initial stock (kind 'initial', order_id
-- 'initial:<product>'), so stock = sum(delta) per product. One reservation and at most one
-- restore per order: the unique key makes "restore exactly once" a constraint.
CREATE TABLE stock_ledger (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   text        NOT NULL,
    product    text        NOT NULL REFERENCES stock (product),
    delta      integer     NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('initial', 'reserve', 'restore')),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT stock_ledger_once UNIQUE (order_id, kind)
);
