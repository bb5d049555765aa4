CREATE TABLE orders (
    id           uuid        PRIMARY KEY,
    user_id      text        NOT NULL CHECK (user_id <> ''),
    product      text        NOT NULL CHECK (product <> ''),
    quantity     integer     NOT NULL CHECK (quantity > 0),
    amount_cents bigint      NOT NULL CHECK (amount_cents > 0),
    status       text        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'REJECTED', 'CANCELLED', 'SHIPPING', 'SHIPPED')),
    -- Where the inventory centre reserved the stock (and the order ships from).
    warehouse    text,
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    confirmed_at timestamptz,
    shipped_at   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_status_idx ON orders (status);

-- One order per Idempotency-Key; the request is kept to refuse a reused key with another body.
CREATE TABLE idempotency_keys (
    key        text        PRIMARY KEY CHECK (key <> ''),
    request    text        NOT NULL,
    order_id   uuid        NOT NULL REFERENCES orders (id) DEFERRABLE INITIALLY DEFERRED,
    created_at timestamptz NOT NULL DEFAULT now()
);
