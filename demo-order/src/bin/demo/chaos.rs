//! `--chaos`: kill -9 and restart, one after the other spread over the load, a relay of each
//! database, the inventory consumer and the warehouse services (the dual-writing one loses what
//! it had not sent yet; the others lose nothing). The steps a short load does not reach happen
//! right after it, while messages are still in flight.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::Services;

/// The processes chaos kills, in order (those the run has).
const VICTIMS: [&str; 8] = [
    "relay-orders-a",
    "wh-dual",
    "inventory-service",
    "relay-wh-push-a",
    "relay-inventory-a",
    "relay-wh-capture-a",
    "wh-pull",
    "wh-push",
];

/// What chaos did so far.
#[derive(Debug)]
pub(crate) struct Chaos {
    victims: Vec<&'static str>,
    /// Steps done.
    done: usize,
    /// One line per kill, for the report.
    pub(crate) log: Vec<String>,
    /// When each kill happened (for the HTML report's marks).
    pub(crate) marks: Vec<(Instant, String)>,
    /// Counters (duplicates, dead-lettered) of inventory-service processes killed by chaos (a
    /// restart starts from zero).
    pub(crate) banked: (u64, u64),
}

impl Chaos {
    /// Chaos over the processes `services` has.
    pub(crate) fn new(services: &Services) -> Self {
        Self {
            victims: VICTIMS
                .iter()
                .copied()
                .filter(|v| services.procs.contains_key(v))
                .collect(),
            done: 0,
            log: Vec::new(),
            marks: Vec::new(),
            banked: (0, 0),
        }
    }

    /// During the load: the next step, once `placed` orders reach its threshold.
    pub(crate) fn during_load(
        &mut self,
        services: &mut Services,
        placed: usize,
        orders: usize,
    ) -> Result<()> {
        if let Some(name) = self.victims.get(self.done).copied() {
            let threshold = orders * (self.done + 1) / (self.victims.len() + 1);
            if placed >= threshold {
                self.strike(services, name, &format!("at {placed} orders"))?;
            }
        }
        Ok(())
    }

    /// After the load: the steps it did not reach.
    pub(crate) fn after_load(&mut self, services: &mut Services) -> Result<()> {
        while let Some(name) = self.victims.get(self.done).copied() {
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
        // A warehouse is killed right after a burst of receipts it answered (committed): what it
        // still had to send then is the dual write's loss; the other paths lose nothing.
        let burst = if name.starts_with("wh-") {
            burst(services, name)
        } else {
            0
        };
        let p = services.procs.get_mut(name).context("process")?;
        p.kill9();
        self.marks.push((Instant::now(), format!("kill -9 {name}")));
        self.log.push(if burst > 0 {
            format!(
                "kill -9 {} {when}, right after {burst} receipts it committed, restarted 1 s later",
                p.name
            )
        } else {
            format!("kill -9 {} {when}, restarted 1 s later", p.name)
        });
        std::thread::sleep(Duration::from_secs(1));
        p.spawn()?;
        self.done += 1;
        Ok(())
    }
}

/// 30 receipts of one unit (10 clients at once) at warehouse `name`; returns how many it
/// answered as committed.
fn burst(services: &Services, name: &str) -> usize {
    let Some((_, api)) = services.warehouse_apis.iter().find(|(n, _)| n == name) else {
        return 0;
    };
    let threads: Vec<_> = (0..10)
        .map(|t| {
            let (agent, api) = (services.agent.clone(), api.clone());
            std::thread::spawn(move || {
                (0..3)
                    .filter(|i| {
                        agent
                            .post(&format!("{api}/inbound"))
                            .send_json(serde_json::json!({
                                "product": format!("ample-{}", t * 3 + i), "quantity": 1,
                            }))
                            .is_ok()
                    })
                    .count()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
}
