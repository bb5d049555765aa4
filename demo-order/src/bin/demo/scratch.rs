//! Step 1: the run's scratch space, two fresh databases and a log folder named by one random
//! suffix, and what removes it at the end.

use std::path::PathBuf;

use anyhow::{Context, Result};
use diesel::{Connection, PgConnection, RunQueryDsl};

/// The two databases (created on the maintenance database) and the log folder of one run.
pub(crate) struct Scratch {
    admin: PgConnection,
    orders_db: String,
    inventory_db: String,
    pub(crate) orders_url: String,
    pub(crate) inventory_url: String,
    pub(crate) logs: PathBuf,
}

impl Scratch {
    /// Creates both databases and the log folder, and prints their names.
    pub(crate) fn create(maintenance_url: &str) -> Result<Self> {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let (orders_db, inventory_db) = (
            format!("demo_orders_{suffix}"),
            format!("demo_inventory_{suffix}"),
        );
        let mut admin = PgConnection::establish(maintenance_url)
            .with_context(|| "connect to Postgres (scripts/setup starts it)".to_string())?;
        for db in [&orders_db, &inventory_db] {
            diesel::sql_query(format!("CREATE DATABASE \"{db}\"")).execute(&mut admin)?;
        }
        let (orders_url, inventory_url) = (
            with_db(maintenance_url, &orders_db),
            with_db(maintenance_url, &inventory_db),
        );
        let logs = std::env::temp_dir().join(format!("outbox-demo-{suffix}"));
        std::fs::create_dir_all(&logs)?;
        println!("databases  {orders_db}, {inventory_db}");
        println!("logs       {}", logs.display());
        Ok(Self {
            admin,
            orders_db,
            inventory_db,
            orders_url,
            inventory_url,
            logs,
        })
    }

    /// One connection to each database.
    pub(crate) fn connect(&self) -> Result<Conns> {
        Ok(Conns {
            orders: PgConnection::establish(&self.orders_url)?,
            inventory: PgConnection::establish(&self.inventory_url)?,
        })
    }

    /// With `keep`, prints where everything is; otherwise drops both databases and, after a
    /// consistent run, the logs.
    pub(crate) fn clean_up(mut self, keep: bool, ok: bool) {
        if keep {
            println!(
                "kept: {} {} {}",
                self.orders_url,
                self.inventory_url,
                self.logs.display()
            );
        } else {
            for db in [&self.orders_db, &self.inventory_db] {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                    .execute(&mut self.admin);
            }
            if ok {
                let _ = std::fs::remove_dir_all(&self.logs);
            }
        }
    }
}

/// The demo's own connections to the two databases (progress, settling, the report).
pub(crate) struct Conns {
    pub(crate) orders: PgConnection,
    pub(crate) inventory: PgConnection,
}

/// `url` with its database name replaced by `db` (query string kept).
fn with_db(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    query.map_or_else(|| format!("{base}/{db}"), |q| format!("{base}/{db}?{q}"))
}
