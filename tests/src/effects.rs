//! A business effect for consumer tests: each application of a message bumps its row, so an
//! effect applied twice is visible as `applied = 2`; `applied_order` records the order.

use anyhow::Result;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{Array, BigInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

/// Creates the `effects` table.
pub fn create(conn: &mut PgConnection) -> Result<()> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS effects (
             message_id text PRIMARY KEY,
             key text NOT NULL,
             applied int NOT NULL,
             applied_order bigserial
         )",
    )?;
    Ok(())
}

/// Applies the effect of `message_id` (inside the caller's transaction).
pub fn apply(conn: &mut PgConnection, message_id: &str, key: &str) -> diesel::QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO effects (message_id, key, applied) VALUES ($1, $2, 1) \
         ON CONFLICT (message_id) DO UPDATE SET applied = effects.applied + 1",
    )
    .bind::<Text, _>(message_id)
    .bind::<Text, _>(key)
    .execute(conn)?;
    Ok(())
}

/// Applies the effects of several messages in ONE statement (a batch handler's business write).
/// The message ids must be distinct (the inbox guarantees it for one batch).
pub fn apply_batch(
    conn: &mut PgConnection,
    message_ids: &[&str],
    keys: &[&str],
) -> diesel::QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO effects (message_id, key, applied) \
         SELECT m, k, 1 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(m, k, n) \
         ORDER BY n \
         ON CONFLICT (message_id) DO UPDATE SET applied = effects.applied + 1",
    )
    .bind::<Array<Text>, _>(message_ids)
    .bind::<Array<Text>, _>(keys)
    .execute(conn)?;
    Ok(())
}

/// `(distinct messages applied, messages applied more than once, total applications)`.
pub fn summary(conn: &mut PgConnection) -> Result<(i64, i64, i64)> {
    #[derive(QueryableByName)]
    struct S {
        #[diesel(sql_type = BigInt)]
        distinct_ids: i64,
        #[diesel(sql_type = BigInt)]
        twice: i64,
        #[diesel(sql_type = BigInt)]
        total: i64,
    }
    let s: S = diesel::sql_query(
        "SELECT count(*) AS distinct_ids, count(*) FILTER (WHERE applied > 1) AS twice, \
         coalesce(sum(applied), 0)::bigint AS total FROM effects",
    )
    .get_result(conn)?;
    Ok((s.distinct_ids, s.twice, s.total))
}
