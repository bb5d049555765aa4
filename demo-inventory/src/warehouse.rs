//! The warehouse system (WMS) of the demo: what one warehouse physically holds and every
//! movement of it (inbound, shipment, stocktake), in its own database. How the inventory centre
//! learns of a movement is the warehouse's sync path:
//!
//! - [`Sync::Push`]: the movement's event goes through the warehouse's outbox, in the movement's
//!   transaction (the relay delivers it);
//! - [`Sync::Capture`]: the warehouse writes no event at all; the relay captures `wh_movements`
//!   from the WAL (change capture, docs/CDC.md);
//! - [`Sync::Pull`]: the centre asks for the movements after a cursor ([`movements_after`]),
//!   which never skips a late commit;
//! - [`Sync::Dual`]: the contrast: the service sends the event to Kafka after its commit (no
//!   outbox), which a crash between the two loses.

use diesel::connection::Connection;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Uuid as SqlUuid};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::{Error, Movement, PUSH_TOPIC};

/// The warehouse's own tables (`wh_stock`, `wh_movements`).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations-warehouse");

/// How the centre learns of this warehouse's movements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Through the outbox, in the movement's transaction.
    Push,
    /// Change capture of `wh_movements` by the relay (no event written by the warehouse).
    Capture,
    /// The centre pulls by a commit-safe cursor.
    Pull,
    /// Sent to Kafka after the commit (no outbox): loses what a crash interrupts.
    Dual,
}

impl std::str::FromStr for Sync {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "push" => Ok(Self::Push),
            "capture" => Ok(Self::Capture),
            "pull" => Ok(Self::Pull),
            "dual" => Ok(Self::Dual),
            other => Err(Error::Invalid(format!(
                "sync path {other:?}: expected push, capture, pull or dual"
            ))),
        }
    }
}

impl Sync {
    /// Its name (as in the report).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Capture => "capture",
            Self::Pull => "pull",
            Self::Dual => "dual",
        }
    }
}

/// Applies the warehouse's migrations (and the outbox's, which only the push path writes to).
///
/// # Errors
/// [`Error::Migration`].
pub fn migrate(conn: &mut PgConnection) -> Result<(), Error> {
    outbox::Outbox::new().migrate(conn)?;
    conn.run_pending_migrations(MIGRATIONS)
        .map_err(|e| Error::Migration(e.to_string()))?;
    Ok(())
}

/// A movement asked of the warehouse.
#[derive(Debug, Clone)]
pub enum Request {
    /// Goods received: on hand up by `quantity`.
    Inbound {
        /// Product.
        product: String,
        /// Units (> 0).
        quantity: i32,
    },
    /// An order shipped: on hand down by `quantity`, once per order.
    Shipment {
        /// The order.
        order_id: String,
        /// Product.
        product: String,
        /// Units (> 0).
        quantity: i32,
    },
    /// A count: on hand becomes `counted`.
    Stocktake {
        /// Product.
        product: String,
        /// Units counted (>= 0).
        counted: i32,
    },
}

/// What a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Recorded: the movement (to send, on the dual path).
    Moved(Movement),
    /// The order had shipped before (the same movement, not a second one).
    AlreadyShipped,
    /// Not enough on hand to ship: refused, nothing moved (an oversell reached the warehouse).
    Short {
        /// On hand when refused.
        on_hand: i32,
    },
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = SqlUuid)]
    movement_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    warehouse: String,
    #[diesel(sql_type = Text)]
    product: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Integer)]
    delta: i32,
    #[diesel(sql_type = Nullable<Text>)]
    order_id: Option<String>,
    #[diesel(sql_type = Text)]
    created_at: String,
}

impl From<Row> for Movement {
    fn from(r: Row) -> Self {
        Movement {
            movement_id: r.movement_id,
            warehouse: r.warehouse,
            product: r.product,
            kind: r.kind,
            delta: r.delta,
            order_id: r.order_id,
            created_at: r.created_at,
        }
    }
}

/// `created_at` as RFC 3339 in UTC, as the change envelope writes timestamps.
const CREATED_AT: &str =
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// Records one movement in ONE transaction: the stock row (refusing negative stock), the
/// movement row, and on the push path its event through the outbox.
///
/// # Errors
/// [`Error::Invalid`] for a non-positive quantity or a negative count; [`Error::Database`],
/// [`Error::Outbox`].
pub fn record(
    conn: &mut PgConnection,
    warehouse: &str,
    sync: Sync,
    request: &Request,
) -> Result<Outcome, Error> {
    #[derive(QueryableByName)]
    struct OnHand {
        #[diesel(sql_type = Integer)]
        before: i32,
        #[diesel(sql_type = Integer)]
        after: i32,
    }
    let (product, kind, order_id) = match request {
        Request::Inbound { product, quantity }
        | Request::Shipment {
            product, quantity, ..
        } if *quantity <= 0 => {
            return Err(Error::Invalid(format!(
                "{product}: quantity must be > 0, got {quantity}"
            )))
        }
        Request::Stocktake { product, counted } if *counted < 0 => {
            return Err(Error::Invalid(format!(
                "{product}: a count must be >= 0, got {counted}"
            )))
        }
        Request::Inbound { product, .. } => (product, "inbound", None),
        Request::Shipment {
            product, order_id, ..
        } => (product, "shipment", Some(order_id.as_str())),
        Request::Stocktake { product, .. } => (product, "stocktake", None),
    };
    if product.trim().is_empty() || order_id.is_some_and(|o| o.trim().is_empty()) {
        return Err(Error::Invalid(
            "product and order_id must not be empty".into(),
        ));
    }
    let r = conn.transaction(|conn| {
        if let Some(order) = order_id {
            #[derive(QueryableByName)]
            struct N {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            let shipped = diesel::sql_query(
                "SELECT count(*) AS n FROM wh_movements WHERE order_id = $1 AND kind = 'shipment'",
            )
            .bind::<Text, _>(order)
            .get_result::<N>(conn)?;
            if shipped.n > 0 {
                return Ok(Outcome::AlreadyShipped);
            }
        }
        // The row lock orders this product's movements; on hand never goes below zero.
        let moved: Vec<OnHand> = match request {
            Request::Inbound { quantity, .. } => diesel::sql_query(
                "INSERT INTO wh_stock (product, warehouse, on_hand) VALUES ($1, $2, $3) \
                 ON CONFLICT (product, warehouse) DO UPDATE SET on_hand = wh_stock.on_hand + excluded.on_hand \
                 RETURNING on_hand - $3 AS before, on_hand AS after",
            )
            .bind::<Text, _>(product)
            .bind::<Text, _>(warehouse)
            .bind::<Integer, _>(*quantity)
            .load(conn)?,
            Request::Shipment { quantity, .. } => diesel::sql_query(
                "UPDATE wh_stock SET on_hand = on_hand - $3 \
                 WHERE product = $1 AND warehouse = $2 AND on_hand >= $3 \
                 RETURNING on_hand + $3 AS before, on_hand AS after",
            )
            .bind::<Text, _>(product)
            .bind::<Text, _>(warehouse)
            .bind::<Integer, _>(*quantity)
            .load(conn)?,
            Request::Stocktake { counted, .. } => diesel::sql_query(
                "WITH old AS (SELECT on_hand FROM wh_stock WHERE product = $1 AND warehouse = $2 FOR UPDATE) \
                 UPDATE wh_stock s SET on_hand = $3 FROM old \
                 WHERE s.product = $1 AND s.warehouse = $2 \
                 RETURNING old.on_hand AS before, s.on_hand AS after",
            )
            .bind::<Text, _>(product)
            .bind::<Text, _>(warehouse)
            .bind::<Integer, _>(*counted)
            .load(conn)?,
        };
        let Some(m) = moved.into_iter().next() else {
            #[derive(QueryableByName)]
            struct H {
                #[diesel(sql_type = Integer)]
                on_hand: i32,
            }
            let h: Vec<H> = diesel::sql_query(
                "SELECT on_hand FROM wh_stock WHERE product = $1 AND warehouse = $2",
            )
            .bind::<Text, _>(product)
            .bind::<Text, _>(warehouse)
            .load(conn)?;
            return match (request, h.first()) {
                (Request::Shipment { .. }, Some(h)) => Ok(Outcome::Short { on_hand: h.on_hand }),
                _ => Err(Error::Invalid(format!(
                    "{product} is not stocked in {warehouse}"
                ))),
            };
        };
        let movement: Movement = diesel::sql_query(format!(
            "INSERT INTO wh_movements (movement_id, warehouse, product, kind, delta, on_hand_after, order_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             RETURNING movement_id, warehouse, product, kind, delta, order_id, {CREATED_AT} AS created_at"
        ))
        .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
        .bind::<Text, _>(warehouse)
        .bind::<Text, _>(product)
        .bind::<Text, _>(kind)
        .bind::<Integer, _>(m.after - m.before)
        .bind::<Integer, _>(m.after)
        .bind::<Nullable<Text>, _>(order_id)
        .get_result::<Row>(conn)?
        .into();
        if sync == Sync::Push {
            let event = outbox::Event::json(
                PUSH_TOPIC,
                format!("{}/{}", movement.warehouse, movement.product),
                "StockMoved",
                &movement,
            )?;
            outbox::Outbox::new().enqueue(conn, &event)?;
        }
        Ok(Outcome::Moved(movement))
    });
    match r {
        // The same order shipped by a concurrent request: its movement is the one.
        Err(Error::Database(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            info,
        ))) if info.constraint_name() == Some("wh_movements_one_shipment") => {
            Ok(Outcome::AlreadyShipped)
        }
        Err(Error::Database(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::CheckViolation
            | diesel::result::DatabaseErrorKind::Unknown,
            info,
        ))) if info.message().contains("out of range") => Err(Error::Invalid(format!(
            "{product}: the quantity would take on hand out of range"
        ))),
        other => other,
    }
}

/// A pull cursor: the (transaction id, row id) of the last movement taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// `tx_id` of the last movement taken (0: none yet).
    pub tx: i64,
    /// Its row id.
    pub id: i64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.tx, self.id)
    }
}

impl std::str::FromStr for Cursor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Invalid(format!("cursor {s:?}: expected TX:ID (e.g. 0:0)"));
        let (tx, id) = s.split_once(':').ok_or_else(bad)?;
        let (tx, id): (i64, i64) = (
            tx.parse().map_err(|_| bad())?,
            id.parse().map_err(|_| bad())?,
        );
        if tx < 0 || id < 0 {
            return Err(bad());
        }
        Ok(Self { tx, id })
    }
}

/// The movements after `cursor`, at most `limit`, in (transaction id, row id) order, and the
/// cursor to ask from next. Only transactions older than the oldest one still running are
/// served (`tx_id < pg_snapshot_xmin(pg_current_snapshot())`): every one of them has ended, so a
/// movement committed later can never fall behind a cursor already handed out. A cursor of
/// "changed since the last sync time" (or of the last id) skips a transaction that commits
/// after a later one was served; this one cannot.
///
/// # Errors
/// [`Error::Database`].
pub fn movements_after(
    conn: &mut PgConnection,
    cursor: Cursor,
    limit: i64,
) -> Result<(Vec<Movement>, Cursor), Error> {
    #[derive(QueryableByName)]
    struct Pulled {
        #[diesel(sql_type = BigInt)]
        tx: i64,
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(embed)]
        row: Row,
    }
    let rows: Vec<Pulled> = diesel::sql_query(format!(
        "SELECT tx_id::text::bigint AS tx, id, movement_id, warehouse, product, kind, delta, order_id, \
                {CREATED_AT} AS created_at \
         FROM wh_movements \
         WHERE (tx_id, id) > ($1::text::xid8, $2) \
           AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY tx_id, id LIMIT $3"
    ))
    .bind::<Text, _>(cursor.tx.to_string())
    .bind::<BigInt, _>(cursor.id)
    .bind::<BigInt, _>(limit.clamp(1, 10_000))
    .load(conn)?;
    let next = rows
        .last()
        .map_or(cursor, |r| Cursor { tx: r.tx, id: r.id });
    Ok((rows.into_iter().map(|r| r.row.into()).collect(), next))
}

/// The movements with these ids (text uuids), for a repair.
///
/// # Errors
/// [`Error::Database`].
pub fn movements_by_id(
    conn: &mut PgConnection,
    ids: &[String],
) -> Result<(Vec<Movement>, usize), Error> {
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT movement_id, warehouse, product, kind, delta, order_id, {CREATED_AT} AS created_at \
         FROM wh_movements WHERE movement_id::text = ANY($1) ORDER BY tx_id, id"
    ))
    .bind::<diesel::sql_types::Array<Text>, _>(ids)
    .load(conn)?;
    let n = rows.len();
    Ok((rows.into_iter().map(Into::into).collect(), n))
}
