//! The embedded migrations (the table contract) and schema checks.

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::sql_types::Text;
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::contract::{Function, Table, TableRef};
use crate::{Error, Result};

/// The migrations in `migrations/` at the workspace root, embedded at compile time.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Runs `f` with `search_path` set to the schema of `tables` (created if missing), restoring the
/// previous `search_path` afterwards.
fn in_schema<T>(
    conn: &mut PgConnection,
    tables: &TableRef,
    create: bool,
    f: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    let Some(schema) = tables.schema() else {
        return f(conn);
    };
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        v: String,
    }
    let previous = diesel::sql_query("SELECT current_setting('search_path') AS v")
        .get_result::<Setting>(conn)?
        .v;
    if create {
        conn.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted()))?;
    }
    conn.batch_execute(&format!("SET search_path TO {}", schema.quoted()))?;
    let result = f(conn);
    diesel::sql_query("SELECT set_config('search_path', $1, false) AS v")
        .bind::<Text, _>(previous)
        .get_result::<Setting>(conn)?;
    result
}

/// Applies the pending migrations (in `tables`' schema, created if missing). Returns the versions
/// applied. Safe to call on every start: applied migrations are skipped.
///
/// # Errors
/// [`Error::Migration`] when a migration fails; nothing of that migration is kept.
pub(crate) fn run_migrations(conn: &mut PgConnection, tables: &TableRef) -> Result<Vec<String>> {
    in_schema(conn, tables, true, |conn| {
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| Error::Migration(e.to_string()))?;
        Ok(applied.iter().map(ToString::to_string).collect())
    })
}

/// Checks that every migration is applied, that the tables have the columns and types this
/// library expects and that the functions of the tableless outbox exist.
///
/// # Errors
/// [`Error::SchemaMismatch`] listing pending migrations, missing/mistyped columns or missing
/// functions.
pub(crate) fn verify_schema(conn: &mut PgConnection, tables: &TableRef) -> Result<()> {
    let pending = in_schema(conn, tables, false, |conn| {
        let has_table = diesel::sql_query(
            "SELECT NULL::text AS name, 'x' AS v FROM pg_catalog.pg_tables \
             WHERE schemaname = current_schema() AND tablename = $1",
        )
        .bind::<Text, _>(Table::Migrations.name())
        .load::<Column>(conn)?;
        if has_table.is_empty() {
            return Ok(vec!["all (no migrations were ever applied here)".to_owned()]);
        }
        // Read the applied versions directly: `pending_migrations` first runs
        // `CREATE TABLE IF NOT EXISTS`, which a role without CREATE on the schema (the relay's
        // least-privilege role) may not do even when the table exists.
        let applied: Vec<String> = diesel::sql_query(format!(
            "SELECT NULL::text AS name, version AS v FROM {}",
            TableRef::default().qualify(Table::Migrations)
        ))
        .load::<Column>(conn)?
        .into_iter()
        .map(|c| c.v)
        .collect();
        let known = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
            .map_err(|e| Error::Migration(e.to_string()))?;
        Ok(known
            .iter()
            .filter(|m| !applied.contains(&m.name().version().to_string()))
            .map(|m| m.name().to_string())
            .collect())
    })?;
    let mut problems = Vec::new();
    if !pending.is_empty() {
        problems.push(format!(
            "pending migrations: {} (run `outbox-relay migrate` or outbox::Outbox::migrate)",
            pending.join(", ")
        ));
    }
    // The tables a service reads and writes; the relay checks its own with its grants.
    for table in [Table::Outbox, Table::Inbox] {
        let found = diesel::sql_query(
            "SELECT column_name AS name, udt_name AS v FROM information_schema.columns \
             WHERE table_schema = coalesce($1, current_schema()) AND table_name = $2",
        )
        .bind::<diesel::sql_types::Nullable<Text>, _>(tables.schema().map(|s| s.as_str()))
        .bind::<Text, _>(table.name())
        .load::<Column>(conn)?;
        if found.is_empty() {
            problems.push(format!("table {table} does not exist"));
            continue;
        }
        for expected in table.columns() {
            let (name, ty) = (expected.name, expected.udt);
            match found.iter().find(|c| c.name.as_deref() == Some(name)) {
                None => problems.push(format!("{table}.{name} is missing")),
                Some(c) if c.v != ty => {
                    problems.push(format!("{table}.{name} has type {}, expected {ty}", c.v));
                }
                Some(_) => {}
            }
        }
    }
    let found = diesel::sql_query(
        "SELECT p.proname::text AS name, 'x' AS v FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = coalesce($1, current_schema()) AND p.proname = ANY($2)",
    )
    .bind::<diesel::sql_types::Nullable<Text>, _>(tables.schema().map(|s| s.as_str()))
    .bind::<diesel::sql_types::Array<Text>, _>(Function::ALL.map(Function::name).to_vec())
    .load::<Column>(conn)?;
    for function in Function::ALL {
        if !found
            .iter()
            .any(|c| c.name.as_deref() == Some(function.name()))
        {
            problems.push(format!("function {function} does not exist"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::SchemaMismatch(problems.join("; ")))
    }
}

#[derive(QueryableByName)]
struct Column {
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    #[diesel(column_name = name)]
    name: Option<String>,
    #[diesel(sql_type = Text)]
    v: String,
}
