//! The inventory side of the demo: reserve stock for `OrderCreated`, restore it for
//! `OrderCancelled`, reply through the outbox. Every function runs inside the caller's
//! transaction, which the consumer runner opens with the inbox row, so each message's effect
//! happens once.

use diesel::sql_types::{Integer, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use serde::{Deserialize, Serialize};

/// The inventory's own tables (stock, ledger).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub mod reconcile;

/// Topic of the inventory's replies.
pub const REPLY_TOPIC: &str = "inventory.events";

/// Topic the order service publishes on (the inventory consumes it).
pub const ORDER_TOPIC: &str = "orders.events";

/// Errors of the inventory service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database error.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// An outbox error.
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// Invalid input.
    #[error("invalid input: {0}")]
    Invalid(String),
}

/// Applies the outbox/inbox migrations and the inventory's own.
///
/// # Errors
/// [`Error::Migration`].
pub fn migrate(conn: &mut PgConnection) -> Result<(), Error> {
    outbox::Outbox::new().migrate(conn)?;
    conn.run_pending_migrations(MIGRATIONS)
        .map_err(|e| Error::Migration(e.to_string()))?;
    Ok(())
}

/// What the inventory reads from an `OrderCreated` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Order id.
    pub order_id: String,
    /// Product.
    pub product: String,
    /// Units.
    pub quantity: i32,
}

/// What the inventory reads from an `OrderCancelled` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// Order id.
    pub order_id: String,
}

/// The reply to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Reply {
    /// Stock was deducted.
    InventoryReserved {
        /// Order id.
        order_id: String,
    },
    /// Not enough stock, or an unknown product.
    InventoryRejected {
        /// Order id.
        order_id: String,
        /// Why.
        reason: String,
    },
}

impl Reply {
    fn event_type(&self) -> &'static str {
        match self {
            Reply::InventoryReserved { .. } => "InventoryReserved",
            Reply::InventoryRejected { .. } => "InventoryRejected",
        }
    }

    fn order_id(&self) -> &str {
        match self {
            Reply::InventoryReserved { order_id } | Reply::InventoryRejected { order_id, .. } => {
                order_id
            }
        }
    }
}

/// Creates `product` with `available` units, recorded as its initial ledger entry.
///
/// # Errors
/// [`Error::Invalid`] for negative stock or an existing product; [`Error::Database`].
pub fn set_stock(conn: &mut PgConnection, product: &str, available: i32) -> Result<(), Error> {
    use diesel::Connection;
    if available < 0 {
        return Err(Error::Invalid(format!(
            "stock of {product} must not be negative"
        )));
    }
    conn.transaction(|conn| {
        let created = diesel::sql_query(
            "INSERT INTO stock (product, available) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind::<Text, _>(product)
        .bind::<Integer, _>(available)
        .execute(conn)?;
        if created == 0 {
            return Err(Error::Invalid(format!("product {product} already exists")));
        }
        diesel::sql_query(
            "INSERT INTO stock_ledger (order_id, product, delta, kind) \
             VALUES ('initial:' || $1, $1, $2, 'initial')",
        )
        .bind::<Text, _>(product)
        .bind::<Integer, _>(available)
        .execute(conn)?;
        Ok(())
    })
}

/// Units available of `product` (`None`: unknown product).
///
/// # Errors
/// [`Error::Database`].
pub fn available(conn: &mut PgConnection, product: &str) -> Result<Option<i32>, Error> {
    #[derive(QueryableByName)]
    struct A {
        #[diesel(sql_type = Integer)]
        available: i32,
    }
    Ok(
        diesel::sql_query("SELECT available FROM stock WHERE product = $1")
            .bind::<Text, _>(product)
            .load::<A>(conn)?
            .pop()
            .map(|a| a.available),
    )
}

/// Reserves stock for an order with ONE conditional UPDATE (never below zero, no read-modify-
/// write, no optimistic-lock retries), records the movement, and enqueues the reply.
///
/// # Errors
/// [`Error::Invalid`] for a non-positive quantity; [`Error::Database`], [`Error::Outbox`].
pub fn reserve(conn: &mut PgConnection, order: &OrderCreated) -> Result<Reply, Error> {
    #[derive(QueryableByName)]
    struct Left {
        #[diesel(sql_type = Integer)]
        #[allow(dead_code)]
        available: i32,
    }
    if order.quantity <= 0 {
        return Err(Error::Invalid(format!(
            "order {} has quantity {}",
            order.order_id, order.quantity
        )));
    }
    let reserved = diesel::sql_query(
        "UPDATE stock SET available = available - $2 \
         WHERE product = $1 AND available >= $2 RETURNING available",
    )
    .bind::<Text, _>(&order.product)
    .bind::<Integer, _>(order.quantity)
    .load::<Left>(conn)?;
    let reply = if reserved.is_empty() {
        let reason = match available(conn, &order.product)? {
            None => format!("unknown product {}", order.product),
            Some(a) => format!(
                "insufficient stock: {a} available, {} requested",
                order.quantity
            ),
        };
        Reply::InventoryRejected {
            order_id: order.order_id.clone(),
            reason,
        }
    } else {
        diesel::sql_query(
            "INSERT INTO stock_ledger (order_id, product, delta, kind) VALUES ($1, $2, $3, 'reserve')",
        )
        .bind::<Text, _>(&order.order_id)
        .bind::<Text, _>(&order.product)
        .bind::<Integer, _>(-order.quantity)
        .execute(conn)?;
        Reply::InventoryReserved {
            order_id: order.order_id.clone(),
        }
    };
    let event = outbox::Event::json(REPLY_TOPIC, reply.order_id(), reply.event_type(), &reply)?;
    outbox::Outbox::new().enqueue(conn, &event)?;
    Ok(reply)
}

/// Restores the stock of a cancelled order, once: the restore is a ledger row unique per order,
/// inserted only if the order had a reservation; the stock moves only when that row is new.
/// Returns the units restored (0: nothing reserved, or already restored).
///
/// # Errors
/// [`Error::Database`].
pub fn restore(conn: &mut PgConnection, cancelled: &OrderCancelled) -> Result<i32, Error> {
    #[derive(QueryableByName)]
    struct Restored {
        #[diesel(sql_type = Text)]
        product: String,
        #[diesel(sql_type = Integer)]
        delta: i32,
    }
    let restored: Vec<Restored> = diesel::sql_query(
        "INSERT INTO stock_ledger (order_id, product, delta, kind) \
         SELECT order_id, product, -delta, 'restore' FROM stock_ledger \
         WHERE order_id = $1 AND kind = 'reserve' \
         ON CONFLICT (order_id, kind) DO NOTHING RETURNING product, delta",
    )
    .bind::<Text, _>(&cancelled.order_id)
    .load(conn)?;
    let mut units = 0;
    for r in restored {
        diesel::sql_query("UPDATE stock SET available = available + $2 WHERE product = $1")
            .bind::<Text, _>(&r.product)
            .bind::<Integer, _>(r.delta)
            .execute(conn)?;
        units += r.delta;
    }
    Ok(units)
}
