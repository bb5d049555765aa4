//! The inventory centre of the demo: stock per product and warehouse in three numbers (on hand,
//! reserved, available), reserved for `OrderCreated`, released for `OrderCancelled` before
//! shipment, and following each warehouse's movements (inbound, shipment, stocktake) by one of
//! four sync paths (push, change capture, pull, and the dual write as a contrast). Every function
//! runs inside the caller's transaction, which the consumer runner opens with the inbox row, so
//! each message's effect happens once; a movement is also applied at most once by its id,
//! whatever path (or repair) brings it.

use diesel::sql_types::{Integer, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use serde::{Deserialize, Serialize};

/// The inventory centre's own tables (stock, reservations, movements).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub mod reconcile;
pub mod warehouse;

/// Topic of the inventory's replies.
pub const REPLY_TOPIC: &str = "inventory.events";

/// Topic the order service publishes on (the inventory consumes it).
pub const ORDER_TOPIC: &str = "orders.events";

/// Topic of the warehouses' movement events written through their outbox (the push path).
pub const PUSH_TOPIC: &str = "warehouse.movements";

/// Topic the relay publishes the captured `wh_movements` rows on (the change-capture path).
pub const CAPTURE_TOPIC: &str = "warehouse.capture";

/// Topic a dual-writing warehouse sends to after its commit (no outbox: the contrast).
pub const DUAL_TOPIC: &str = "warehouse.dual";

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
    /// Stock was reserved at `warehouse`.
    InventoryReserved {
        /// Order id.
        order_id: String,
        /// Where the stock is reserved (and ships from).
        warehouse: String,
    },
    /// Not enough stock, or an unknown product.
    InventoryRejected {
        /// Order id.
        order_id: String,
        /// Why.
        reason: String,
    },
    /// The warehouse shipped the order (its reservation is consumed).
    OrderShipped {
        /// Order id.
        order_id: String,
        /// Where it shipped from.
        warehouse: String,
    },
}

impl Reply {
    fn event_type(&self) -> &'static str {
        match self {
            Reply::InventoryReserved { .. } => "InventoryReserved",
            Reply::InventoryRejected { .. } => "InventoryRejected",
            Reply::OrderShipped { .. } => "OrderShipped",
        }
    }

    fn order_id(&self) -> &str {
        match self {
            Reply::InventoryReserved { order_id, .. }
            | Reply::InventoryRejected { order_id, .. }
            | Reply::OrderShipped { order_id, .. } => order_id,
        }
    }
}

/// A warehouse movement as every sync path carries it (the push event's payload, the captured
/// row's columns, the pull answer's rows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    /// The warehouse's id of the movement: applied once, whatever path brings it.
    pub movement_id: uuid::Uuid,
    /// Warehouse.
    pub warehouse: String,
    /// Product.
    pub product: String,
    /// `inbound`, `shipment` or `stocktake`.
    pub kind: String,
    /// Change of on hand (a stocktake's is counted - on hand before).
    pub delta: i32,
    /// The order a shipment ships.
    pub order_id: Option<String>,
    /// When the warehouse wrote it (RFC 3339).
    pub created_at: String,
}

/// Units available of `product` over all warehouses (`None`: unknown product).
///
/// # Errors
/// [`Error::Database`].
pub fn available(conn: &mut PgConnection, product: &str) -> Result<Option<i32>, Error> {
    #[derive(QueryableByName)]
    struct A {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
        available: Option<i64>,
    }
    let a = diesel::sql_query(
        "SELECT sum(available)::bigint AS available FROM stock WHERE product = $1",
    )
    .bind::<Text, _>(product)
    .get_result::<A>(conn)?;
    Ok(a.available.map(|n| i32::try_from(n).unwrap_or(i32::MAX)))
}

/// Reserves stock for an order at the warehouse with the most available, with ONE conditional
/// UPDATE (never past available, no read-modify-write), records the reservation, and enqueues
/// the reply.
///
/// # Errors
/// [`Error::Invalid`] for a non-positive quantity; [`Error::Database`], [`Error::Outbox`].
pub fn reserve(conn: &mut PgConnection, order: &OrderCreated) -> Result<Reply, Error> {
    #[derive(QueryableByName)]
    struct At {
        #[diesel(sql_type = Text)]
        warehouse: String,
    }
    if order.quantity <= 0 {
        return Err(Error::Invalid(format!(
            "order {} has quantity {}",
            order.order_id, order.quantity
        )));
    }
    // The picked row can stop qualifying while this waits for its lock (a concurrent
    // reservation took it): then the pick comes back empty although another warehouse may have
    // enough, so it is tried again while the product's total available would cover the order.
    let mut reserved = Vec::new();
    for _ in 0..3 {
        reserved = diesel::sql_query(
            "WITH pick AS (SELECT product, warehouse FROM stock \
                           WHERE product = $1 AND available >= $2 \
                           ORDER BY available DESC, warehouse LIMIT 1 FOR UPDATE) \
             UPDATE stock s SET reserved = s.reserved + $2 FROM pick \
             WHERE s.product = pick.product AND s.warehouse = pick.warehouse \
               AND s.on_hand - s.reserved >= $2 \
             RETURNING s.warehouse",
        )
        .bind::<Text, _>(&order.product)
        .bind::<Integer, _>(order.quantity)
        .load::<At>(conn)?;
        if !reserved.is_empty() || available(conn, &order.product)?.unwrap_or(0) < order.quantity {
            break;
        }
    }
    let reply = if let Some(at) = reserved.into_iter().next() {
        diesel::sql_query(
            "INSERT INTO reservations (order_id, product, warehouse, quantity, state) \
             VALUES ($1, $2, $3, $4, 'RESERVED')",
        )
        .bind::<Text, _>(&order.order_id)
        .bind::<Text, _>(&order.product)
        .bind::<Text, _>(&at.warehouse)
        .bind::<Integer, _>(order.quantity)
        .execute(conn)?;
        Reply::InventoryReserved {
            order_id: order.order_id.clone(),
            warehouse: at.warehouse,
        }
    } else {
        let reason = match available(conn, &order.product)? {
            None => format!("unknown product {}", order.product),
            Some(a) => format!(
                "insufficient stock: {a} available (in all warehouses), {} requested from one",
                order.quantity
            ),
        };
        Reply::InventoryRejected {
            order_id: order.order_id.clone(),
            reason,
        }
    };
    reply_through_outbox(conn, &reply)?;
    Ok(reply)
}

fn reply_through_outbox(conn: &mut PgConnection, reply: &Reply) -> Result<(), Error> {
    let event = outbox::Event::json(REPLY_TOPIC, reply.order_id(), reply.event_type(), reply)?;
    outbox::Outbox::new().enqueue(conn, &event)?;
    Ok(())
}

/// What a cancellation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The reservation was released: its units are available again.
    Released(i32),
    /// Nothing was reserved (rejected order), or it was released before.
    Nothing,
    /// The order had shipped: nothing can be released (a return, not a cancellation).
    AlreadyShipped,
}

/// Releases the reservation of a cancelled order, once: the reservation's state moves
/// RESERVED -> RELEASED in one conditional UPDATE, and only then does the stock move.
///
/// # Errors
/// [`Error::Database`].
pub fn release(conn: &mut PgConnection, cancelled: &OrderCancelled) -> Result<Release, Error> {
    #[derive(QueryableByName)]
    struct Released {
        #[diesel(sql_type = Text)]
        product: String,
        #[diesel(sql_type = Text)]
        warehouse: String,
        #[diesel(sql_type = Integer)]
        quantity: i32,
    }
    let released: Vec<Released> = diesel::sql_query(
        "UPDATE reservations SET state = 'RELEASED', updated_at = clock_timestamp() \
         WHERE order_id = $1 AND state = 'RESERVED' RETURNING product, warehouse, quantity",
    )
    .bind::<Text, _>(&cancelled.order_id)
    .load(conn)?;
    if let Some(r) = released.into_iter().next() {
        unreserve(conn, &r.product, &r.warehouse, r.quantity)?;
        return Ok(Release::Released(r.quantity));
    }
    #[derive(QueryableByName)]
    struct State {
        #[diesel(sql_type = Text)]
        state: String,
    }
    let state: Vec<State> = diesel::sql_query("SELECT state FROM reservations WHERE order_id = $1")
        .bind::<Text, _>(&cancelled.order_id)
        .load(conn)?;
    Ok(match state.first().map(|s| s.state.as_str()) {
        Some("SHIPPED") => Release::AlreadyShipped,
        _ => Release::Nothing,
    })
}

/// Takes `quantity` off the reserved units of a stock row (its reservation was released or
/// shipped, in the same transaction).
fn unreserve(
    conn: &mut PgConnection,
    product: &str,
    warehouse: &str,
    quantity: i32,
) -> Result<(), Error> {
    diesel::sql_query(
        "UPDATE stock SET reserved = reserved - $3 WHERE product = $1 AND warehouse = $2",
    )
    .bind::<Text, _>(product)
    .bind::<Text, _>(warehouse)
    .bind::<Integer, _>(quantity)
    .execute(conn)?;
    Ok(())
}

/// Applies a warehouse movement once (by its id): on hand moves by its delta; a shipment also
/// consumes its order's reservation (RESERVED -> SHIPPED, reserved down) and tells the order
/// service through the outbox. Returns false when the movement was applied before.
///
/// # Errors
/// [`Error::Invalid`] for an unknown kind or an unreadable time; [`Error::Database`],
/// [`Error::Outbox`].
pub fn apply_movement(conn: &mut PgConnection, m: &Movement, path: &str) -> Result<bool, Error> {
    use diesel::sql_types::{Nullable, Uuid as SqlUuid};
    if !matches!(m.kind.as_str(), "inbound" | "shipment" | "stocktake") {
        return Err(Error::Invalid(format!(
            "movement {} has kind {:?}",
            m.movement_id, m.kind
        )));
    }
    let new = diesel::sql_query(
        "INSERT INTO movements (movement_id, warehouse, product, kind, delta, order_id, path, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::timestamptz) ON CONFLICT (movement_id) DO NOTHING",
    )
    .bind::<SqlUuid, _>(m.movement_id)
    .bind::<Text, _>(&m.warehouse)
    .bind::<Text, _>(&m.product)
    .bind::<Text, _>(&m.kind)
    .bind::<Integer, _>(m.delta)
    .bind::<Nullable<Text>, _>(m.order_id.as_deref())
    .bind::<Text, _>(path)
    .bind::<Text, _>(&m.created_at)
    .execute(conn)?;
    if new == 0 {
        // Applied before; if by a reconciliation, the path did deliver it after all.
        diesel::sql_query(
            "UPDATE movements SET arrived_by = $2, arrived_at = clock_timestamp() \
             WHERE movement_id = $1 AND path = 'repair' AND arrived_by IS NULL AND $2 <> 'repair'",
        )
        .bind::<SqlUuid, _>(m.movement_id)
        .bind::<Text, _>(path)
        .execute(conn)?;
        return Ok(false);
    }
    diesel::sql_query(
        "INSERT INTO stock (product, warehouse, on_hand) VALUES ($1, $2, $3) \
         ON CONFLICT (product, warehouse) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand",
    )
    .bind::<Text, _>(&m.product)
    .bind::<Text, _>(&m.warehouse)
    .bind::<Integer, _>(m.delta)
    .execute(conn)?;
    if m.kind == "shipment" {
        let order_id = m.order_id.clone().unwrap_or_default();
        #[derive(QueryableByName)]
        struct Q {
            #[diesel(sql_type = Integer)]
            quantity: i32,
        }
        let shipped: Vec<Q> = diesel::sql_query(
            "UPDATE reservations SET state = 'SHIPPED', updated_at = clock_timestamp() \
             WHERE order_id = $1 AND state = 'RESERVED' AND product = $2 AND warehouse = $3 \
             RETURNING quantity",
        )
        .bind::<Text, _>(&order_id)
        .bind::<Text, _>(&m.product)
        .bind::<Text, _>(&m.warehouse)
        .load(conn)?;
        if let Some(q) = shipped.first() {
            unreserve(conn, &m.product, &m.warehouse, q.quantity)?;
        } else {
            // No open reservation of this order for this product at this warehouse (released
            // by a cancellation, or a shipment of something else): on hand moved, nothing
            // reserved did; reconcile reports it.
            diesel::sql_query("UPDATE movements SET unreserved = true WHERE movement_id = $1")
                .bind::<SqlUuid, _>(m.movement_id)
                .execute(conn)?;
        }
        reply_through_outbox(
            conn,
            &Reply::OrderShipped {
                order_id,
                warehouse: m.warehouse.clone(),
            },
        )?;
    }
    Ok(true)
}

/// A movement from a change-capture event (`docs/CDC.md` envelope v1) of `wh_movements`:
/// `None` for what is not a new movement (the table's rows are only ever inserted).
///
/// # Errors
/// [`Error::Invalid`] for an envelope that is not v1 or lacks a column.
pub fn movement_from_change(envelope: &serde_json::Value) -> Result<Option<Movement>, Error> {
    if envelope["v"] != 1 {
        return Err(Error::Invalid(format!(
            "change envelope version {} (this reads v1)",
            envelope["v"]
        )));
    }
    if !matches!(envelope["op"].as_str(), Some("insert" | "read")) {
        return Ok(None);
    }
    let after = &envelope["after"];
    let text = |c: &str| -> Result<String, Error> {
        after[c]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Invalid(format!("captured movement without {c}")))
    };
    Ok(Some(Movement {
        movement_id: text("movement_id")?
            .parse()
            .map_err(|e| Error::Invalid(format!("movement_id: {e}")))?,
        warehouse: text("warehouse")?,
        product: text("product")?,
        kind: text("kind")?,
        delta: after["delta"]
            .as_i64()
            .and_then(|d| i32::try_from(d).ok())
            .ok_or_else(|| Error::Invalid("captured movement without delta".into()))?,
        order_id: after["order_id"].as_str().map(str::to_owned),
        created_at: text("created_at")?,
    }))
}

/// The pull path's cursor for `warehouse` (`0:0` before the first pull).
///
/// # Errors
/// [`Error::Database`].
pub fn pull_cursor(conn: &mut PgConnection, warehouse: &str) -> Result<String, Error> {
    #[derive(QueryableByName)]
    struct P {
        #[diesel(sql_type = Text)]
        position: String,
    }
    Ok(
        diesel::sql_query("SELECT position FROM sync_cursors WHERE warehouse = $1")
            .bind::<Text, _>(warehouse)
            .load::<P>(conn)?
            .pop()
            .map_or_else(|| "0:0".to_owned(), |p| p.position),
    )
}

/// Stores the pull path's cursor (in the transaction that applied the movements before it).
///
/// # Errors
/// [`Error::Database`].
pub fn save_pull_cursor(
    conn: &mut PgConnection,
    warehouse: &str,
    position: &str,
) -> Result<(), Error> {
    diesel::sql_query(
        "INSERT INTO sync_cursors (warehouse, position) VALUES ($1, $2) \
         ON CONFLICT (warehouse) DO UPDATE SET position = excluded.position, updated_at = clock_timestamp()",
    )
    .bind::<Text, _>(warehouse)
    .bind::<Text, _>(position)
    .execute(conn)?;
    Ok(())
}
