//! The order side of the demo. Creating an order writes the order (PENDING) and `OrderCreated`
//! in one transaction; the inventory's replies confirm or reject it; cancelling writes
//! `OrderCancelled`. Every status change is one conditional UPDATE, so no transition can happen
//! from a state that does not allow it (no CONFIRMED after CANCELLED).

use diesel::connection::Connection;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Uuid as SqlUuid};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The order service's own tables.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Topic of order events (key: order id).
pub const ORDER_TOPIC: &str = "orders.events";

pub mod report_html;

/// Errors of the order service, each with a clear message for the API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is invalid.
    #[error("invalid order: {0}")]
    Invalid(String),
    /// The Idempotency-Key was used before with a different request.
    #[error("idempotency key {0:?} was already used with a different request")]
    KeyReused(String),
    /// No such order.
    #[error("order {0} not found")]
    NotFound(Uuid),
    /// The order's status does not allow this.
    #[error("order {id} is {status}: cannot {action}")]
    InvalidTransition {
        /// Order.
        id: Uuid,
        /// Current status.
        status: String,
        /// What was attempted.
        action: &'static str,
    },
    /// Database error.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// Outbox error.
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
}

/// Applies the outbox/inbox migrations and the order service's own.
///
/// # Errors
/// [`Error::Migration`].
pub fn migrate(conn: &mut PgConnection) -> Result<(), Error> {
    outbox::Outbox::new().migrate(conn)?;
    conn.run_pending_migrations(MIGRATIONS)
        .map_err(|e| Error::Migration(e.to_string()))?;
    Ok(())
}

/// A new order as the API receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// Who orders.
    pub user: String,
    /// What.
    pub product: String,
    /// How many (> 0).
    pub quantity: i32,
    /// Price in cents (> 0).
    pub amount_cents: i64,
}

impl NewOrder {
    fn validate(&self) -> Result<(), Error> {
        if self.user.trim().is_empty() {
            return Err(Error::Invalid("user must not be empty".into()));
        }
        if self.product.trim().is_empty() {
            return Err(Error::Invalid("product must not be empty".into()));
        }
        if self.quantity <= 0 {
            return Err(Error::Invalid(format!(
                "quantity must be > 0, got {}",
                self.quantity
            )));
        }
        if self.amount_cents <= 0 {
            return Err(Error::Invalid(format!(
                "amount_cents must be > 0, got {}",
                self.amount_cents
            )));
        }
        Ok(())
    }

    fn canonical(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, QueryableByName)]
pub struct Order {
    /// Id.
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    /// Who.
    #[diesel(sql_type = Text)]
    pub user_id: String,
    /// What.
    #[diesel(sql_type = Text)]
    pub product: String,
    /// How many.
    #[diesel(sql_type = Integer)]
    pub quantity: i32,
    /// Price in cents.
    #[diesel(sql_type = BigInt)]
    pub amount_cents: i64,
    /// PENDING, CONFIRMED, REJECTED or CANCELLED.
    #[diesel(sql_type = Text)]
    pub status: String,
    /// Why it was rejected.
    #[diesel(sql_type = Nullable<Text>)]
    pub reason: Option<String>,
    /// Where the stock is reserved (set on confirmation).
    #[diesel(sql_type = Nullable<Text>)]
    pub warehouse: Option<String>,
}

/// `OrderCreated` as published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Order id.
    pub order_id: String,
    /// Who.
    pub user: String,
    /// What.
    pub product: String,
    /// How many.
    pub quantity: i32,
    /// Price in cents.
    pub amount_cents: i64,
}

/// `OrderCancelled` as published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// Order id.
    pub order_id: String,
}

const COLUMNS: &str = "id, user_id, product, quantity, amount_cents, status, reason, warehouse";

/// Reads an order.
///
/// # Errors
/// [`Error::NotFound`], [`Error::Database`].
pub fn get(conn: &mut PgConnection, id: Uuid) -> Result<Order, Error> {
    diesel::sql_query(format!("SELECT {COLUMNS} FROM orders WHERE id = $1"))
        .bind::<SqlUuid, _>(id)
        .load::<Order>(conn)?
        .pop()
        .ok_or(Error::NotFound(id))
}

/// Creates an order and its `OrderCreated` event in one transaction. With an idempotency key, a
/// repeat of the same request returns the first order and writes nothing (`false`); the same key
/// with another request is refused.
///
/// # Errors
/// [`Error::Invalid`], [`Error::KeyReused`], [`Error::Database`], [`Error::Outbox`].
pub fn create(
    conn: &mut PgConnection,
    idempotency_key: Option<&str>,
    new: &NewOrder,
) -> Result<(Order, bool), Error> {
    new.validate()?;
    if idempotency_key.is_some_and(|k| k.trim().is_empty() || k.len() > 255) {
        return Err(Error::Invalid(
            "Idempotency-Key must be 1 to 255 characters".into(),
        ));
    }
    conn.transaction(|conn| {
        let id = Uuid::now_v7();
        if let Some(key) = idempotency_key {
            // Claim the key first: a concurrent request with the same key waits here for our
            // commit, then finds the key taken.
            let claimed = diesel::sql_query(
                "INSERT INTO idempotency_keys (key, request, order_id) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind::<Text, _>(key)
            .bind::<Text, _>(new.canonical())
            .bind::<SqlUuid, _>(id)
            .execute(conn)?;
            if claimed == 0 {
                #[derive(QueryableByName)]
                struct Claim {
                    #[diesel(sql_type = Text)]
                    request: String,
                    #[diesel(sql_type = SqlUuid)]
                    order_id: Uuid,
                }
                let claim: Claim = diesel::sql_query(
                    "SELECT request, order_id FROM idempotency_keys WHERE key = $1",
                )
                .bind::<Text, _>(key)
                .get_result(conn)?;
                if claim.request != new.canonical() {
                    return Err(Error::KeyReused(key.to_owned()));
                }
                return Ok((get(conn, claim.order_id)?, false));
            }
        }
        let order: Order = diesel::sql_query(format!(
            "INSERT INTO orders (id, user_id, product, quantity, amount_cents, status) \
             VALUES ($1, $2, $3, $4, $5, 'PENDING') RETURNING {COLUMNS}"
        ))
        .bind::<SqlUuid, _>(id)
        .bind::<Text, _>(&new.user)
        .bind::<Text, _>(&new.product)
        .bind::<Integer, _>(new.quantity)
        .bind::<BigInt, _>(new.amount_cents)
        .get_result(conn)?;
        let event = OrderCreated {
            order_id: id.to_string(),
            user: new.user.clone(),
            product: new.product.clone(),
            quantity: new.quantity,
            amount_cents: new.amount_cents,
        };
        outbox::Outbox::new().enqueue(
            conn,
            &outbox::Event::json(ORDER_TOPIC, id.to_string(), "OrderCreated", &event)?,
        )?;
        Ok((order, true))
    })
}

/// Moves an order from one of `from` to `to`; `Ok(false)` when its status does not allow it.
fn transition(
    conn: &mut PgConnection,
    id: Uuid,
    from: &[&str],
    to: &str,
    reason: Option<&str>,
) -> Result<bool, Error> {
    transition_at(conn, id, from, to, reason, None)
}

fn transition_at(
    conn: &mut PgConnection,
    id: Uuid,
    from: &[&str],
    to: &str,
    reason: Option<&str>,
    warehouse: Option<&str>,
) -> Result<bool, Error> {
    let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
    let n = diesel::sql_query(
        "UPDATE orders SET status = $2, reason = coalesce($3, reason), updated_at = clock_timestamp(), \
         warehouse = coalesce($5, warehouse), \
         confirmed_at = CASE WHEN $2 = 'CONFIRMED' THEN clock_timestamp() ELSE confirmed_at END, \
         shipped_at = CASE WHEN $2 = 'SHIPPED' THEN clock_timestamp() ELSE shipped_at END \
         WHERE id = $1 AND status = ANY($4)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<Text, _>(to)
    .bind::<Nullable<Text>, _>(reason)
    .bind::<diesel::sql_types::Array<Text>, _>(&from)
    .bind::<Nullable<Text>, _>(warehouse)
    .execute(conn)?;
    Ok(n == 1)
}

/// Applies an inventory reply (inside the consumer's inbox transaction): `InventoryReserved`
/// confirms a PENDING order (recording the warehouse), `InventoryRejected` rejects it,
/// `OrderShipped` moves a CONFIRMED order to SHIPPED. A reply for an order that is no
/// longer PENDING (cancelled meanwhile) changes nothing. Returns whether the status changed.
///
/// # Errors
/// [`Error::Invalid`] for an unknown reply type; [`Error::Database`].
pub fn apply_reply(
    conn: &mut PgConnection,
    event_type: &str,
    order_id: Uuid,
    reason: Option<&str>,
    warehouse: Option<&str>,
) -> Result<bool, Error> {
    match event_type {
        "InventoryReserved" => {
            transition_at(conn, order_id, &["PENDING"], "CONFIRMED", None, warehouse)
        }
        "InventoryRejected" => transition(conn, order_id, &["PENDING"], "REJECTED", reason),
        // Shipped from the warehouse (it was handed over by `fulfil`).
        "OrderShipped" => transition(conn, order_id, &["SHIPPING"], "SHIPPED", None),
        other => Err(Error::Invalid(format!("unknown reply type {other}"))),
    }
}

/// Hands a CONFIRMED order to its warehouse to ship: CONFIRMED -> SHIPPING, one conditional
/// UPDATE, so a cancellation and a shipment of one order cannot both be accepted (a cancel
/// after it is refused, and it is refused after a cancel).
///
/// # Errors
/// [`Error::NotFound`], [`Error::InvalidTransition`], [`Error::Database`].
pub fn fulfil(conn: &mut PgConnection, id: Uuid) -> Result<Order, Error> {
    conn.transaction(|conn| {
        if !transition(conn, id, &["CONFIRMED"], "SHIPPING", None)? {
            let order = get(conn, id)?;
            return Err(Error::InvalidTransition {
                id,
                status: order.status,
                action: "ship",
            });
        }
        get(conn, id)
    })
}

/// Cancels a PENDING or CONFIRMED order and writes `OrderCancelled` (the inventory restores any
/// reserved stock), in one transaction.
///
/// # Errors
/// [`Error::NotFound`], [`Error::InvalidTransition`], [`Error::Database`].
pub fn cancel(conn: &mut PgConnection, id: Uuid) -> Result<Order, Error> {
    conn.transaction(|conn| {
        if !transition(conn, id, &["PENDING", "CONFIRMED"], "CANCELLED", None)? {
            let order = get(conn, id)?;
            return Err(Error::InvalidTransition {
                id,
                status: order.status,
                action: "cancel",
            });
        }
        let event = OrderCancelled {
            order_id: id.to_string(),
        };
        outbox::Outbox::new().enqueue(
            conn,
            &outbox::Event::json(ORDER_TOPIC, id.to_string(), "OrderCancelled", &event)?,
        )?;
        get(conn, id)
    })
}
