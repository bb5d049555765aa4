//! Leadership SQL: the state row, taking, renewing and giving up the lease (fenced by epoch,
//! on the database clock).

use diesel::sql_types::{BigInt, Text};
use diesel::{OptionalExtension, PgConnection, RunQueryDsl};

use super::{Acquired, Epoch, Fragments, Lease, Sql};
use crate::error::{Error, Result};

impl Sql {
    /// The leadership statements: the state row, taking, renewing and giving up the lease.
    pub(super) fn lease_statements(&mut self, f: &Fragments) {
        let Fragments {
            s,
            lease_cond,
            server,
            ..
        } = f;
        self.ensure_row =
            format!("INSERT INTO {s} (outbox_table) VALUES ($1) ON CONFLICT DO NOTHING");
        self.acquire = format!(
            "UPDATE {s} SET leader_id = $2, leader_epoch = leader_epoch + 1, \
             lease_expires_at = clock_timestamp() + $3 * interval '1 millisecond', \
             updated_at = clock_timestamp() \
             WHERE outbox_table = $1 AND (leader_id IS NULL \
             OR lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp()) \
             RETURNING leader_epoch, {server} AS server"
        );
        self.renew = format!(
            "UPDATE {s} SET lease_expires_at = clock_timestamp() + $4 * interval '1 millisecond', \
             updated_at = clock_timestamp() WHERE {lease_cond} RETURNING leader_epoch"
        );
        self.release = format!(
            "UPDATE {s} SET leader_id = NULL, lease_expires_at = NULL, \
             updated_at = clock_timestamp() \
             WHERE outbox_table = $1 AND leader_id = $2 AND leader_epoch = $3 \
             RETURNING leader_epoch"
        );
    }
}

/// Tries to become leader. `Ok(None)`: another instance holds a valid lease.
///
/// # Errors
/// [`Error::Database`].
pub fn try_acquire(
    conn: &mut PgConnection,
    sql: &Sql,
    instance: &str,
    lease_ms: u64,
) -> Result<Option<Lease>> {
    diesel::sql_query(&sql.ensure_row)
        .bind::<Text, _>(&sql.key)
        .execute(conn)?;
    let lease_ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
    let row: Option<Acquired> = diesel::sql_query(&sql.acquire)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(instance)
        .bind::<BigInt, _>(lease_ms)
        .get_result(conn)
        .optional()?;
    Ok(row.map(|r| Lease {
        instance: instance.to_owned(),
        epoch: r.leader_epoch,
        server: r.server,
    }))
}

pub(super) fn lost(sql: &Sql) -> Error {
    Error::LostLeadership(sql.key.clone())
}

/// Extends the lease.
///
/// # Errors
/// [`Error::LostLeadership`] when the lease is no longer ours.
pub fn renew(conn: &mut PgConnection, sql: &Sql, lease: &Lease, lease_ms: u64) -> Result<()> {
    let lease_ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
    let row: Option<Epoch> = diesel::sql_query(&sql.renew)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .bind::<BigInt, _>(lease_ms)
        .get_result(conn)
        .optional()?;
    row.map(|_| ()).ok_or_else(|| lost(sql))
}

/// Gives the lease up (graceful shutdown) so a standby takes over at once.
///
/// # Errors
/// [`Error::Database`].
pub fn release(conn: &mut PgConnection, sql: &Sql, lease: &Lease) -> Result<()> {
    diesel::sql_query(&sql.release)
        .bind::<Text, _>(&sql.key)
        .bind::<Text, _>(&lease.instance)
        .bind::<BigInt, _>(lease.epoch)
        .execute(conn)?;
    Ok(())
}
