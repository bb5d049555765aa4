//! The table privileges `outbox-relay run` needs, checked at start-up so a role with a missing
//! grant stops with a clear error instead of failing (and re-sending) batch after batch.
//!
//! The least-privilege role that grants exactly these is `docs/ops/relay-role.sql`.

use diesel::sql_types::{Array, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use outbox::contract::Table;

use crate::config::RelayConfig;
use crate::error::{Error, Result};

/// `(table, privilege)` pairs the relay uses, and why.
pub const REQUIRED: &[(Table, &str)] = &[
    // fetch pages; removal after acknowledgement, and the move to the dead letters
    (Table::Outbox, "SELECT"),
    (Table::Outbox, "DELETE"),
    // the dead-letter move is an upsert; `hold-key` reads the held keys; metrics count them
    (Table::DeadLetters, "SELECT"),
    (Table::DeadLetters, "INSERT"),
    (Table::DeadLetters, "UPDATE"),
    // the lease and the open batch's snapshots (`FOR SHARE` needs UPDATE too)
    (Table::RelayState, "SELECT"),
    (Table::RelayState, "INSERT"),
    (Table::RelayState, "UPDATE"),
    // the start-up schema check reads which migrations were applied
    (Table::Migrations, "SELECT"),
];

/// More privileges when delivered events are kept (`keep_delivered_hours > 0`): the fenced
/// removal moves them to `outbox_delivered`, and the leader purges expired ones.
pub const KEEP_DELIVERED: &[(Table, &str)] = &[
    (Table::Delivered, "SELECT"),
    (Table::Delivered, "INSERT"),
    (Table::Delivered, "DELETE"),
];

/// More privileges when the leader purges old dead letters (`dead_letters_keep_days > 0`).
pub const PURGE_DEAD_LETTERS: &[(Table, &str)] = &[(Table::DeadLetters, "DELETE")];

/// More privileges when tables are captured (`capture_tables`): snapshot requests are read and
/// their progress saved.
pub const SNAPSHOTS: &[(Table, &str)] =
    &[(Table::Snapshots, "SELECT"), (Table::Snapshots, "UPDATE")];

/// Every `(table, privilege)` pair `cfg` needs: [`REQUIRED`], plus [`KEEP_DELIVERED`],
/// [`PURGE_DEAD_LETTERS`] and [`SNAPSHOTS`] when those are configured.
#[must_use]
pub fn required(cfg: &RelayConfig) -> Vec<(Table, &'static str)> {
    let mut all = REQUIRED.to_vec();
    if cfg.capture_tables.is_some() {
        all.extend_from_slice(SNAPSHOTS);
    }
    if cfg.keep_delivered_hours > 0 {
        all.extend_from_slice(KEEP_DELIVERED);
    }
    if cfg.dead_letters_keep_days > 0 {
        all.extend_from_slice(PURGE_DEAD_LETTERS);
    }
    all
}

/// Checks that the connected role holds every privilege in `required` (see [`required`]) on the
/// tables at `tables`. Tables that do not exist are left to the schema check.
///
/// # Errors
/// [`Error::MissingGrants`] naming the role and each missing privilege; [`Error::Database`].
pub fn check(
    conn: &mut PgConnection,
    tables: &outbox::TableRef,
    required: &[(Table, &str)],
) -> Result<()> {
    #[derive(QueryableByName)]
    struct Missing {
        #[diesel(sql_type = Text)]
        role: String,
        #[diesel(sql_type = Text)]
        tbl: String,
        #[diesel(sql_type = Text)]
        privilege: String,
    }
    let names: Vec<String> = required.iter().map(|(t, _)| tables.qualify(*t)).collect();
    let privileges: Vec<&str> = required.iter().map(|(_, p)| *p).collect();
    let missing: Vec<Missing> = diesel::sql_query(
        "SELECT current_user::text AS role, r.tbl, r.privilege \
         FROM unnest($1::text[], $2::text[]) AS r(tbl, privilege) \
         WHERE to_regclass(r.tbl) IS NOT NULL \
         AND NOT has_table_privilege(to_regclass(r.tbl), r.privilege)",
    )
    .bind::<Array<Text>, _>(&names)
    .bind::<Array<Text>, _>(&privileges)
    .load(conn)?;
    let Some(first) = missing.first() else {
        return Ok(());
    };
    let list: Vec<String> = missing
        .iter()
        .map(|m| format!("{} on {}", m.privilege, m.tbl.replace('"', "")))
        .collect();
    Err(Error::MissingGrants {
        role: first.role.clone(),
        missing: list,
    })
}
