//! A deliberately broken relay for the fault suite's broken variants: it removes rows BEFORE
//! sending them (the "mark sent, then publish" order of many hand-rolled pollers). Killed between
//! the two steps, it loses what it had removed. `naive-relay DATABASE_URL BROKERS`.

use std::time::Duration;

use anyhow::{Context, Result};
use diesel::{Connection, PgConnection, RunQueryDsl};
use outbox::StoredEvent;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, brokers] = args.as_slice() else {
        anyhow::bail!("usage: naive-relay DATABASE_URL BROKERS");
    };
    let producer = outbox_tests::naive::producer(brokers)?;
    let mut conn = PgConnection::establish(url).context("connect")?;
    loop {
        let rows: Vec<StoredEvent> = conn.transaction(|c| {
            diesel::sql_query(format!(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 200) \
                 RETURNING {}",
                outbox::STORED_EVENT_COLUMNS
            ))
            .load(c)
        })?;
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // The window: removed and committed, not yet published (a slow network, a GC pause).
        tokio::time::sleep(Duration::from_millis(200)).await;
        for row in &rows {
            outbox_tests::naive::publish(&producer, row).await?;
        }
    }
}
