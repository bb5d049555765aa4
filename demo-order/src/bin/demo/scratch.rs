//! Step 1: the scratch databases (orders, inventory centre, one per warehouse) and the log
//! directory; dropped at the end unless `--keep` (with the replication slots on them).

use std::path::PathBuf;

use anyhow::{Context, Result};
use diesel::{Connection, PgConnection, RunQueryDsl};

/// A warehouse of the run: its sync path (also its name), database and URL.
pub(crate) struct WarehouseDb {
    pub(crate) path: String,
    pub(crate) name: String,
    db: String,
    pub(crate) url: String,
}

pub(crate) struct Scratch {
    admin: PgConnection,
    orders_db: String,
    inventory_db: String,
    pub(crate) orders_url: String,
    pub(crate) inventory_url: String,
    pub(crate) warehouses: Vec<WarehouseDb>,
    /// Names the run's replication slot (server-wide).
    pub(crate) suffix: String,
    pub(crate) logs: PathBuf,
}

impl Scratch {
    pub(crate) fn create(maintenance_url: &str, paths: &[String]) -> Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let (orders_db, inventory_db) = (
            format!("demo_orders_{suffix}"),
            format!("demo_inventory_{suffix}"),
        );
        let mut admin = PgConnection::establish(maintenance_url)
            .with_context(|| "connect to Postgres (scripts/setup starts it)".to_string())?;
        let warehouses: Vec<WarehouseDb> = paths
            .iter()
            .map(|p| {
                let db = format!("demo_wh_{p}_{suffix}");
                WarehouseDb {
                    path: p.clone(),
                    name: format!("wh-{p}"),
                    url: with_db(maintenance_url, &db),
                    db,
                }
            })
            .collect();
        for db in [&orders_db, &inventory_db]
            .into_iter()
            .chain(warehouses.iter().map(|w| &w.db))
        {
            diesel::sql_query(format!("CREATE DATABASE \"{db}\"")).execute(&mut admin)?;
        }
        let (orders_url, inventory_url) = (
            with_db(maintenance_url, &orders_db),
            with_db(maintenance_url, &inventory_db),
        );
        let logs = std::env::temp_dir().join(format!("outbox-demo-{suffix}"));
        std::fs::create_dir_all(&logs)?;
        println!(
            "databases  {orders_db}, {inventory_db}, {}",
            warehouses
                .iter()
                .map(|w| w.db.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("logs       {}", logs.display());
        Ok(Self {
            admin,
            orders_db,
            inventory_db,
            orders_url,
            inventory_url,
            warehouses,
            suffix,
            logs,
        })
    }

    pub(crate) fn connect(&self) -> Result<Conns> {
        Ok(Conns {
            orders: PgConnection::establish(&self.orders_url)?,
            inventory: PgConnection::establish(&self.inventory_url)?,
            warehouses: self
                .warehouses
                .iter()
                .map(|w| Ok((w.path.clone(), PgConnection::establish(&w.url)?)))
                .collect::<Result<_>>()?,
        })
    }

    pub(crate) fn clean_up(mut self, keep: bool, ok: bool) {
        if keep {
            println!(
                "kept: {} {} {} {}",
                self.orders_url,
                self.inventory_url,
                self.warehouses
                    .iter()
                    .map(|w| w.url.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                self.logs.display()
            );
            return;
        }
        let dbs: Vec<String> = [self.orders_db.clone(), self.inventory_db.clone()]
            .into_iter()
            .chain(self.warehouses.iter().map(|w| w.db.clone()))
            .collect();
        for db in &dbs {
            // A slot holds WAL on the server until dropped, and keeps its database from going.
            let slots = format!("FROM pg_replication_slots WHERE database = '{db}'");
            let _ = diesel::sql_query(format!(
                "SELECT pg_terminate_backend(active_pid) {slots} AND active_pid IS NOT NULL"
            ))
            .execute(&mut self.admin);
            for _ in 0..50 {
                let dropped = diesel::sql_query(format!(
                    "SELECT pg_drop_replication_slot(slot_name) {slots} AND NOT active"
                ))
                .execute(&mut self.admin);
                let left = diesel::sql_query(format!("SELECT 1 {slots}"))
                    .execute(&mut self.admin)
                    .unwrap_or(0);
                if dropped.is_ok() && left == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .execute(&mut self.admin);
        }
        if ok {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

pub(crate) struct Conns {
    pub(crate) orders: PgConnection,
    pub(crate) inventory: PgConnection,
    /// Each warehouse's database, by sync path.
    pub(crate) warehouses: Vec<(String, PgConnection)>,
}

fn with_db(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    query.map_or_else(|| format!("{base}/{db}"), |q| format!("{base}/{db}?{q}"))
}
