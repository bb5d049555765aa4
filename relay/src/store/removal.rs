//! Removal SQL: the fenced delete (or move to `outbox_delivered`) of acknowledged rows, and the
//! move to the dead letters, under the lease and on the server it was taken on.

use diesel::sql_types::{Array, BigInt, Bytea, Integer, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use outbox::contract::StoredEvent;

use super::lease::lost;
use super::prepared::{Prepared, Value};
use super::{DeadLetter, Fenced, Fragments, Lease, Sql};
use crate::error::Result;

impl Sql {
    /// The fenced removals: delete, move to `outbox_delivered`, move to the dead letters.
    pub(super) fn removal_statements(&mut self, f: &Fragments) {
        let Fragments {
            t,
            d,
            k,
            all,
            dead_letter_updates,
            locked_lease,
            ..
        } = f;
        self.delete = format!(
            "WITH lease AS ({locked_lease}), \
             del AS (DELETE FROM {t} WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM lease) \
             RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM del) AS affected"
        );
        // The same fenced removal, keeping the rows in `outbox_delivered` (one statement:
        // a row is either still pending or kept, never both, never neither). An id already
        // kept can only come from a reset identity (a restore); the old copy stays.
        self.move_delivered = format!(
            "WITH lease AS ({locked_lease}), \
             del AS (DELETE FROM {t} WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM lease) \
             RETURNING *), \
             ins AS (INSERT INTO {k} ({all}) SELECT {all} FROM del \
                     ON CONFLICT (id) DO NOTHING RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM del) AS affected"
        );
        // The same removals naming what they removed (streaming capture: a row the stream
        // delivers can still be invisible to a new snapshot for a moment after its commit
        // record was flushed, and a removal that missed it must be tried again, not counted).
        self.delete_returning = format!(
            "WITH lease AS ({locked_lease}), \
             del AS (DELETE FROM {t} WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM lease) \
             RETURNING id) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             coalesce((SELECT array_agg(id) FROM del), '{{}}') AS ids"
        );
        self.move_delivered_returning = format!(
            "WITH lease AS ({locked_lease}), \
             del AS (DELETE FROM {t} WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM lease) \
             RETURNING *), \
             ins AS (INSERT INTO {k} ({all}) SELECT {all} FROM del \
                     ON CONFLICT (id) DO NOTHING RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             coalesce((SELECT array_agg(id) FROM del), '{{}}') AS ids"
        );
        self.dead_letter = format!(
            "WITH lease AS ({locked_lease}), \
             f AS (SELECT * FROM unnest($4::bigint[], $6::text[], $7::int[]) \
                   AS f(id, error, attempts)), \
             moved AS (DELETE FROM {t} o USING f \
                       WHERE o.id = f.id AND EXISTS (SELECT 1 FROM lease) \
                       RETURNING o.*, f.error AS dl_error, f.attempts AS dl_attempts), \
             ins AS (INSERT INTO {d} ({all}, attempts, last_error) \
                     SELECT {all}, dl_attempts, dl_error FROM moved \
                     ON CONFLICT (id, event_id) DO UPDATE SET \
                       {dead_letter_updates}, dead_lettered_at = now() \
                     RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM ins) AS affected, \
             coalesce((SELECT array_agg(id) FROM moved), '{{}}') AS ids"
        );
        // A tableless event (no row to move): written from its content, same fencing.
        self.dead_letter_event = format!(
            "WITH lease AS ({locked_lease}), \
             ins AS (INSERT INTO {d} ({all}, attempts, last_error) \
                     SELECT $4, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14::text::xid8, $15, \
                            $16, $17 WHERE EXISTS (SELECT 1 FROM lease) \
                     ON CONFLICT (id, event_id) DO UPDATE SET \
                       {dead_letter_updates}, dead_lettered_at = now() \
                     RETURNING 1) \
             SELECT (SELECT count(*) FROM lease) AS leased, \
             (SELECT count(*) FROM ins) AS affected"
        );
    }
}

/// Removes delivered rows (or moves them to `outbox_delivered`, see [`Sql::keep_delivered`]),
/// only while the lease is ours. Returns how many were removed.
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership) (nothing removed), [`Error::Database`](crate::Error::Database).
pub fn delete(conn: &mut PgConnection, sql: &Sql, lease: &Lease, ids: &[i64]) -> Result<u64> {
    let statement = if sql.keep_delivered {
        &sql.hot.move_delivered
    } else {
        &sql.hot.delete
    };
    let binds = [
        Value::Text(&sql.key),
        Value::Text(&lease.instance),
        Value::BigInt(lease.epoch),
        Value::BigIntArray(ids),
        Value::Text(&lease.server),
    ];
    let r: Fenced = Prepared::new(statement, &binds).get_result(conn)?;
    if r.leased == 0 {
        return Err(lost(sql));
    }
    Ok(u64::try_from(r.affected).unwrap_or(0))
}

/// As [`delete`], returning the ids it removed.
///
/// # Errors
/// As [`delete`].
pub fn delete_returning(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    ids: &[i64],
    keep_delivered: bool,
) -> Result<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Removed {
        #[diesel(sql_type = BigInt)]
        leased: i64,
        #[diesel(sql_type = Array<BigInt>)]
        ids: Vec<i64>,
    }
    let statement = if keep_delivered {
        &sql.move_delivered_returning
    } else {
        &sql.delete_returning
    };
    let r: Removed = diesel::sql_query(statement)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Text, _>(&lease.server)
        .get_result(conn)?;
    if r.leased == 0 {
        return Err(lost(sql));
    }
    Ok(r.ids)
}

/// Of these writing transactions (`xid8` as text), the ones a new snapshot does not see as
/// committed yet.
///
/// # Errors
/// [`Error::Database`](crate::Error::Database).
pub fn not_yet_visible(conn: &mut PgConnection, tx_ids: &[String]) -> Result<Vec<String>> {
    #[derive(QueryableByName)]
    struct T {
        #[diesel(sql_type = Text)]
        t: String,
    }
    Ok(diesel::sql_query(
        "SELECT t FROM unnest($1::text[]) t \
         WHERE NOT pg_visible_in_snapshot(t::xid8, pg_current_snapshot())",
    )
    .bind::<Array<Text>, _>(tx_ids)
    .load::<T>(conn)?
    .into_iter()
    .map(|t| t.t)
    .collect())
}

/// Moves rows to the dead letters, only while the lease is ours.
///
/// # Errors
/// [`Error::LostLeadership`](crate::Error::LostLeadership) (nothing moved), [`Error::Database`](crate::Error::Database).
pub fn dead_letter(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    rows: &[DeadLetter],
) -> Result<u64> {
    #[derive(QueryableByName)]
    struct Moved {
        #[diesel(sql_type = BigInt)]
        leased: i64,
        #[diesel(sql_type = BigInt)]
        affected: i64,
        #[diesel(sql_type = Array<BigInt>)]
        ids: Vec<i64>,
    }
    // Rows are moved by id; what has no row (a tableless event), or whose row a new snapshot
    // does not see yet (streaming delivers a commit a moment before it is visible), is written
    // from the event's content when the event is at hand.
    let rows_by_id: Vec<&DeadLetter> = rows.iter().filter(|r| r.id > 0).collect();
    let mut affected = 0;
    let mut moved = std::collections::HashSet::new();
    if !rows_by_id.is_empty() {
        let ids: Vec<i64> = rows_by_id.iter().map(|r| r.id).collect();
        let errors: Vec<&str> = rows_by_id.iter().map(|r| r.error.as_str()).collect();
        let attempts: Vec<i32> = rows_by_id.iter().map(|r| r.attempts).collect();
        let r: Moved = diesel::sql_query(&sql.dead_letter)
            .bind::<Text, _>(&sql.key)
            .bind::<Text, _>(&lease.instance)
            .bind::<BigInt, _>(lease.epoch)
            .bind::<Array<BigInt>, _>(&ids)
            .bind::<Text, _>(&lease.server)
            .bind::<Array<Text>, _>(&errors)
            .bind::<Array<Integer>, _>(&attempts)
            .get_result(conn)?;
        if r.leased == 0 {
            return Err(lost(sql));
        }
        affected += u64::try_from(r.affected).unwrap_or(0);
        moved.extend(r.ids);
    }
    for r in rows.iter().filter(|r| !moved.contains(&r.id)) {
        if let Some(e) = &r.event {
            affected += dead_letter_event(conn, sql, lease, e, &r.error, r.attempts)?;
        }
    }
    Ok(affected)
}

/// Writes one tableless event to the dead letters from its content, only while the lease is
/// ours.
fn dead_letter_event(
    conn: &mut PgConnection,
    sql: &Sql,
    lease: &Lease,
    e: &StoredEvent,
    error: &str,
    attempts: i32,
) -> Result<u64> {
    let headers = serde_json::to_string(&e.headers).unwrap_or_else(|_| "{}".into());
    let r: Fenced = diesel::sql_query(&sql.dead_letter_event)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .bind::<BigInt, _>(e.id)
        .bind::<Text, _>(&lease.server)
        .bind::<diesel::sql_types::Uuid, _>(e.event_id)
        .bind::<Text, _>(&e.topic)
        .bind::<Text, _>(&e.partition_key)
        .bind::<Text, _>(&e.event_type)
        .bind::<Bytea, _>(&e.payload)
        .bind::<Text, _>(headers)
        .bind::<Text, _>(&e.content_type)
        .bind::<Nullable<Text>, _>(e.traceparent.as_deref())
        .bind::<Text, _>(e.tx_id.to_string())
        .bind::<Timestamptz, _>(e.created_at)
        .bind::<Integer, _>(attempts)
        .bind::<Text, _>(error)
        .get_result(conn)?;
    if r.leased == 0 {
        return Err(lost(sql));
    }
    Ok(u64::try_from(r.affected).unwrap_or(0))
}
