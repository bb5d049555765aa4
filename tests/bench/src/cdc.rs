//! C1-C3: change capture of an existing table (docs/CDC.md), in the same run as the outbox
//! modes. The table is `bench_stock` (`sku` primary key, `qty`, `note`), `KEYS` rows; each
//! writer transaction updates one row (`qty = qty + 1`).
//!
//! - C_base: the writers' transactions/s on the table with no publication and no slot.
//! - C1: the same writers while the table is captured (in a publication, a slot, a relay
//!   streaming it): transactions/s (the writers' cost of capture, against C_base), and the
//!   relay's change events acknowledged per second in the same window.
//! - C2: commit-to-ack latency of one probe writer's updates of its own row during C1 (from
//!   its COMMIT returning to the relay seeing the broker's acknowledgement of the change; the
//!   n-th acknowledgement of the probe's key is its n-th update: one key's events are
//!   acknowledged in commit order).
//! - C3: backlog drain: `ctx.events` updates committed while no relay runs, then a relay
//!   drains them: change events/s, against K.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use outbox_relay::CaptureMode;
use outbox_tests::{create_topic, unique_name, InProcessRelay};

use crate::report::{Report, Row};
use crate::scenarios::{Baselines, Ctx};
use crate::{rate, spinner, KEYS};

const PUBLICATION: &str = "outbox_bench_tables";

/// `writers` connections updating random rows for `window`; returns transactions/s.
fn update_load(url: &str, writers: usize, window: Duration) -> Result<f64> {
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let url = url.to_owned();
            std::thread::spawn(move || -> Result<usize> {
                let mut c = PgConnection::establish(&url)?;
                let started = Instant::now();
                let mut n = 0_usize;
                while started.elapsed() < window {
                    let sku = (n * 7919 + w * 104_729) % KEYS;
                    c.batch_execute(&format!(
                        "UPDATE bench_stock SET qty = qty + 1 WHERE sku = 'sku-{sku}'"
                    ))?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    Ok(rate(total, window))
}

/// Probe updates of the `probe` row every 20 ms for `window`: when each COMMIT returned.
fn probe(url: &str, window: Duration) -> Result<Vec<Instant>> {
    let mut c = PgConnection::establish(url)?;
    let started = Instant::now();
    let mut out = Vec::new();
    while started.elapsed() < window {
        c.batch_execute("UPDATE bench_stock SET qty = qty + 1 WHERE sku = 'probe'")?;
        out.push(Instant::now());
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(out)
}

/// Runs C_base and C1-C3 and adds their rows.
pub async fn run(ctx: &Ctx, b: &Baselines, report: &mut Report) -> Result<()> {
    let url = ctx.url.clone();
    let slot = format!("bench_{}_cdc", std::process::id());
    {
        let mut c = PgConnection::establish(&url)?;
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_stock; \
             CREATE TABLE bench_stock (sku text PRIMARY KEY, qty integer NOT NULL, note text); \
             INSERT INTO bench_stock SELECT 'sku-' || i, 0, 'n' FROM generate_series(0, {}) i; \
             INSERT INTO bench_stock VALUES ('probe', 0, 'p')",
            KEYS - 1
        ))?;
        c.batch_execute("VACUUM ANALYZE bench_stock")?;
    }
    let pb = spinner("C_base: single-row UPDATE transactions, table not captured");
    let (u, w, win) = (url.clone(), ctx.writers, ctx.window);
    let base = tokio::task::spawn_blocking(move || update_load(&u, w, win)).await??;
    pb.finish_and_clear();
    report.push(Row::baseline(
        "C_base: single-row UPDATE transactions, table not captured",
        base,
        "tx/s",
    ));

    // Capture it: the table's publication and a slot, created now.
    let topic = unique_name("bench-cdc");
    create_topic(&ctx.bootstrap, &topic, ctx.partitions).await?;
    {
        let mut c = PgConnection::establish(&url)?;
        let t =
            outbox_relay::cdc::parse_tables("public.bench_stock").map_err(anyhow::Error::msg)?;
        outbox_relay::store::stream::ensure_table_publication(&mut c, &t, PUBLICATION)?;
        outbox_relay::store::stream::ensure_streaming(
            &mut c,
            &outbox::TableRef::default(),
            &slot,
            "outbox_bench",
        )?;
    }
    let cfg = ctx
        .relay_cfg
        .clone()
        .capture(CaptureMode::Streaming)
        .slot(&slot)
        .publication("outbox_bench")
        .capture_publication(PUBLICATION)
        .capture_tables("public.bench_stock")
        .capture_topic(&topic);
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let probe_acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let listener: outbox_relay::AckListener = {
        let (acked, probe_acks) = (Arc::clone(&acked), Arc::clone(&probe_acks));
        Arc::new(move |a: outbox_relay::Acknowledged| {
            acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if a.partition_key == "probe" {
                if let Ok(mut v) = probe_acks.lock() {
                    v.push(a.acknowledged);
                }
            }
        })
    };
    let relay =
        InProcessRelay::run(outbox_relay::Relay::new(cfg.clone())?.on_acknowledged(listener));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pb = spinner("C1: the same writers, table captured and streamed (plus a latency probe)");
    let acked_before = acked.load(std::sync::atomic::Ordering::Relaxed);
    let probes_before = probe_acks.lock().map(|v| v.len()).unwrap_or(0);
    let (u, w, win) = (url.clone(), ctx.writers, ctx.window);
    let load = tokio::task::spawn_blocking(move || update_load(&u, w, win));
    let (u, win) = (url.clone(), ctx.window);
    let probes = tokio::task::spawn_blocking(move || probe(&u, win));
    let started = Instant::now();
    let captured = load.await??;
    let probes = probes.await??;
    let acked_in_window = acked.load(std::sync::atomic::Ordering::Relaxed) - acked_before;
    let window = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pb.finish_and_clear();
    report.push(
        Row::ratio(
            "C1 writers while the table is captured",
            captured,
            "tx/s",
            base,
            "C_base",
            0.7,
        )
        .note("the relay streams the table on the same 2 cores"),
    );
    report.push(Row::info(
        "C1 change events acknowledged during the window",
        rate(acked_in_window, window),
        "events/s",
        "live: the relay keeps up with the writers when this is close to their tx/s",
    ));
    // C2: the n-th acknowledgement of the probe's key since C1 began is its n-th update.
    let mut lat: Vec<f64> = Vec::new();
    if let Ok(v) = probe_acks.lock() {
        for (committed, at) in probes.iter().zip(v.iter().skip(probes_before)) {
            lat.push(at.saturating_duration_since(*committed).as_secs_f64() * 1e3);
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i]
    };
    report.push(Row::info(
        "C2 commit-to-ack of a change under C1's load, p50",
        pct(0.5),
        "ms",
        &format!(
            "p99 {:.1} ms, max {:.1} ms, {} of {} probes matched",
            pct(0.99),
            lat.last().copied().unwrap_or(f64::NAN),
            lat.len(),
            probes.len()
        ),
    ));
    relay.stop().await?;

    // C3: a backlog of changes committed while no relay runs, then drained.
    let n = ctx.events.min(200_000);
    let pb = spinner(&format!(
        "C3: {n} changes committed with no relay, then drained"
    ));
    {
        let mut c = PgConnection::establish(&url)?;
        let mut done = 0;
        while done < n {
            let m = (n - done).min(KEYS);
            c.batch_execute(&format!(
                "UPDATE bench_stock SET qty = qty + 1 WHERE sku IN \
                 (SELECT 'sku-' || i FROM generate_series(0, {}) i)",
                m - 1
            ))?;
            done += m;
        }
    }
    let drained = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener: outbox_relay::AckListener = {
        let d = Arc::clone(&drained);
        Arc::new(move |_| {
            d.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let relay = InProcessRelay::run(outbox_relay::Relay::new(cfg)?.on_acknowledged(listener));
    let started = Instant::now();
    let (mut last, mut moved) = (0, Instant::now());
    while drained.load(std::sync::atomic::Ordering::Relaxed) < n {
        let now = drained.load(std::sync::atomic::Ordering::Relaxed);
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > Duration::from_secs(120) {
            let _ = relay.stop().await;
            anyhow::bail!("C3: {now} of {n} changes acknowledged, none for 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    relay.stop().await?;
    pb.finish_and_clear();
    report.push(Row::ratio(
        &format!("C3 backlog drain of {n} changes"),
        rate(n, took),
        "events/s",
        b.k,
        "K",
        0.7,
    ));
    let mut c = PgConnection::establish(&url)?;
    // The stopped relay's walsender may hold the slot a moment longer.
    let dropping = Instant::now();
    while let Err(e) = c.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')")) {
        anyhow::ensure!(
            dropping.elapsed() < Duration::from_secs(15),
            "drop the slot {slot}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {PUBLICATION}; DROP TABLE bench_stock"
    ))?;
    Ok(())
}
