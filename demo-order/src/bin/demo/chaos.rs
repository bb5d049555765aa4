//! `--chaos`: kill -9 and restart a relay per database and the inventory consumer, a quarter,
//! half and three quarters into the load (the steps a short load does not reach happen right
//! after it, while messages are still in flight).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::Services;

/// The processes chaos kills, in order.
const VICTIMS: [&str; 3] = ["relay-orders-a", "inventory-service", "relay-inventory-a"];

/// After how many placed orders step `step` happens.
fn threshold(step: usize, orders: usize) -> usize {
    match step {
        0 => orders / 4,
        1 => orders / 2,
        _ => orders * 3 / 4,
    }
}

/// What chaos did so far.
#[derive(Debug, Default)]
pub(crate) struct Chaos {
    /// Steps done.
    done: usize,
    /// One line per kill, for the report.
    pub(crate) log: Vec<String>,
    /// Counters (duplicates, dead-lettered) of inventory-service processes killed by chaos (a
    /// restart starts from zero).
    pub(crate) banked: (u64, u64),
}

impl Chaos {
    /// During the load: the next step, once `placed` orders reach its threshold.
    pub(crate) fn during_load(
        &mut self,
        services: &mut Services,
        placed: usize,
        orders: usize,
    ) -> Result<()> {
        if let Some(name) = VICTIMS.get(self.done) {
            if placed >= threshold(self.done, orders) {
                self.strike(services, name, &format!("at {placed} orders"))?;
            }
        }
        Ok(())
    }

    /// After the load: the steps it did not reach.
    pub(crate) fn after_load(&mut self, services: &mut Services) -> Result<()> {
        while let Some(name) = VICTIMS.get(self.done) {
            self.strike(services, name, "after the load")?;
        }
        Ok(())
    }

    /// Banks the victim's counters, SIGKILLs it, restarts it a second later, and logs it.
    fn strike(&mut self, services: &mut Services, name: &str, when: &str) -> Result<()> {
        if name == "inventory-service" {
            let stats = services.stats(&services.inventory_api);
            self.banked.0 += stats["duplicates"].as_u64().unwrap_or(0);
            self.banked.1 += stats["dead_lettered"].as_u64().unwrap_or(0);
        }
        let p = services.procs.get_mut(name).context("process")?;
        p.kill9();
        self.log
            .push(format!("kill -9 {} {when}, restarted 1 s later", p.name));
        std::thread::sleep(Duration::from_secs(1));
        p.spawn()?;
        self.done += 1;
        Ok(())
    }
}
