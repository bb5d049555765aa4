//! S1-S5 in one capture mode, against the baselines of the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use outbox_relay::RelayConfig;
use outbox_tests::{create_topic, InProcessRelay};

use crate::cpu::Cpu;
use crate::load::{self, AckLog, Latencies, Load};
use crate::mode::{self, Mode};
use crate::report::{Report, Row};
use crate::{bar, headline, rate, spinner};

/// A relay that acknowledges nothing for this long is reported as stalled.
const STALL: Duration = Duration::from_secs(120);

/// What every scenario needs.
pub struct Ctx {
    pub url: String,
    pub bootstrap: String,
    pub relay_cfg: RelayConfig,
    pub writers: usize,
    pub partitions: i32,
    pub window: Duration,
    pub long_tx: Duration,
    pub events: usize,
}

/// The baselines of this run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baselines {
    pub k: f64,
    pub p_del: f64,
}

/// S1's measurement in one mode.
pub struct Drained {
    pub mode: Mode,
    /// Events/s, to the last acknowledgement.
    pub rate: f64,
    pub cpu: Cpu,
    /// Streaming modes: the rate the backlog was written at with the slot present.
    pub written: Option<f64>,
}

/// S1 in `mode`: a fresh relay drains `ctx.events` events of `topic`. Polling drains what
/// `P_ins` wrote; a streaming mode creates its slot first, then writes the backlog (rows, or
/// tableless events) and times that too.
pub async fn drain(ctx: &Ctx, mode: Mode, topic: &str) -> Result<Drained> {
    let url = ctx.url.clone();
    let (cfg, slot) = {
        let (u, base) = (url.clone(), ctx.relay_cfg.clone());
        tokio::task::spawn_blocking(move || mode::prepare(&u, &base, mode, "s1")).await??
    };
    let written = if mode.streaming() {
        let pb = bar(
            &format!(
                "[{}] S1 backlog: {} (slot present)",
                mode.label(),
                if mode == Mode::Tableless {
                    "outbox_emit, 1000/tx"
                } else {
                    "batched INSERT, 1000/stmt"
                }
            ),
            ctx.events as u64,
        );
        let (u, t, n, pb2) = (url.clone(), topic.to_owned(), ctx.events, pb.clone());
        let took = tokio::task::spawn_blocking(move || -> Result<Duration> {
            let mut c = PgConnection::establish(&u)?;
            let started = Instant::now();
            if mode == Mode::Tableless {
                mode::batched_emit(&mut c, &t, n, &pb2)?;
            } else {
                crate::batched_insert(&mut c, &t, n, &pb2)?;
            }
            Ok(started.elapsed())
        })
        .await??;
        pb.finish_and_clear();
        Some(rate(ctx.events, took))
    } else {
        None
    };
    let acks = AckLog::default();
    let before = Cpu::now();
    let relay =
        InProcessRelay::run(outbox_relay::Relay::new(cfg)?.on_acknowledged(acks.listener()));
    let pb = bar(
        &format!("[{}] S1: relay drains the backlog", mode.label()),
        ctx.events as u64,
    );
    let started = Instant::now();
    let (mut last, mut moved) = (0, Instant::now());
    while acks.acked() < ctx.events {
        let now = acks.acked();
        pb.set_position(now as u64);
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > STALL {
            pb.finish_and_clear();
            let stopped = relay.stop().await;
            anyhow::bail!(
                "[{}] S1: {now} of {} acknowledged, none for {} s (relay stopped with {stopped:?})",
                mode.label(),
                ctx.events,
                STALL.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Timed to the last acknowledgement; the removal of the last rows (table modes) follows
    // within a cycle and is checked, untimed.
    let took = started.elapsed();
    if mode != Mode::Tableless {
        crate::wait_drained(&url, &pb, ctx.events, Duration::from_secs(600)).await?;
    }
    pb.finish_and_clear();
    relay.stop().await?;
    let cpu = Cpu::now().since(&before);
    if let Some(s) = slot {
        tokio::task::spawn_blocking(move || s.drop_now()).await??;
    }
    Ok(Drained {
        mode,
        rate: rate(ctx.events, took),
        cpu,
        written,
    })
}

/// S1's rows for one mode: the drain against its target, and against the CPU ceiling.
pub fn push_drain(report: &mut Report, ctx: &Ctx, b: &Baselines, d: &Drained) {
    let m = d.mode.label();
    let name = format!("S1 backlog drain of {} events", ctx.events);
    let row = if d.mode.streaming() {
        Row::ratio(&name, d.rate, "events/s", b.k, "K", 0.7)
    } else {
        Row::ratio(
            &name,
            d.rate,
            "events/s",
            b.k.min(b.p_del),
            "min(K, P_del)",
            0.7,
        )
    };
    let row = match d.written {
        Some(w) => row.note(&format!(
            "backlog written at {w:.0} events/s with the slot present ({})",
            if d.mode == Mode::Tableless {
                "outbox_emit through Outbox::tableless().enqueue_batch, 1000 per transaction"
            } else {
                "batched INSERT, 1000 per statement"
            }
        )),
        None => row,
    };
    report.push_mode(m, "S1 drain", row.cpu(d.cpu.per_10k(ctx.events)));
    if let Some(w) = d.written {
        report.cell(m, "S1 backlog written at", format!("{w:.0} events/s"));
    }
    // The same machine runs the relay, Postgres and the broker: what would 100% of its cores
    // drain at the CPU per event S1 measured?
    #[allow(clippy::cast_precision_loss)]
    let per_event = d.cpu.total() / ctx.events as f64;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    #[allow(clippy::cast_precision_loss)]
    let ceiling = cores as f64 / per_event.max(1e-12);
    report.push_mode(
        m,
        "S1 CPU ceiling",
        Row::info(
            "S1 vs the CPU ceiling of this machine",
            ceiling,
            "events/s at 100% CPU",
            &format!(
                "{ceiling:.0} events/s would take 100% of {cores} cores at S1's CPU per event ({:.1} us: relay, Postgres, broker); S1 reached {:.0}% of that",
                per_event * 1e6,
                100.0 * d.rate / ceiling
            ),
        ),
    );
    report.cell(m, "S1 CPU per event", format!("{:.1} us", per_event * 1e6));
}

/// A and S3: application transactions without the outbox and with one event (rows for
/// polling and streamed, `outbox_emit` for tableless), no relay, best of two rounds each.
pub async fn app_cost(ctx: &Ctx, modes: &[Mode], report: &mut Report) -> Result<()> {
    let table = modes.iter().any(|m| *m != Mode::Tableless);
    let tableless = modes.contains(&Mode::Tableless);
    // No relay reads these: no topic needs to exist.
    let topic = Mode::Polling.topic("s3");
    type Best = Option<(Load, Cpu)>;
    let (mut a, mut s3_table, mut s3_tableless): (Best, Best, Best) = (None, None, None);
    // The best window of each, with the CPU it took (the bound when a target is missed).
    let better = |best: &mut Best, l: Load, before: Cpu| {
        let cpu = Cpu::now().since(&before);
        if best.as_ref().is_none_or(|b| l.tx_rate() > b.0.tx_rate()) {
            *best = Some((l, cpu));
        }
    };
    for round in 0..2 {
        let pb = spinner(&format!(
            "A and S3: application transactions, round {}",
            round + 1
        ));
        let plain = outbox::Outbox::new();
        let before = Cpu::now();
        let l = Load::flat_out(&ctx.url, None, &plain, ctx.writers, 1, ctx.window, None).await?;
        better(&mut a, l, before);
        if table {
            let before = Cpu::now();
            let l = Load::flat_out(
                &ctx.url,
                Some(&topic),
                &plain,
                ctx.writers,
                1,
                ctx.window,
                None,
            )
            .await?;
            better(&mut s3_table, l, before);
        }
        if tableless {
            let o = Mode::Tableless.outbox();
            let before = Cpu::now();
            let l = Load::flat_out(&ctx.url, Some(&topic), &o, ctx.writers, 1, ctx.window, None)
                .await?;
            better(&mut s3_tableless, l, before);
        }
        pb.finish_and_clear();
        let mut c = PgConnection::establish(&ctx.url)?;
        for stmt in [
            "DELETE FROM outbox",
            "VACUUM ANALYZE outbox",
            "VACUUM ANALYZE bench_orders",
        ] {
            c.batch_execute(stmt)?;
        }
    }
    let (a, a_cpu) = a.context("A measured")?;
    // CPU microseconds per transaction: (writers' process, Postgres).
    #[allow(clippy::cast_precision_loss)]
    let per_tx = |l: &Load, c: &Cpu| {
        let p = c.per_10k(l.txs);
        (p.bench_s * 100.0, p.postgres_s * 100.0)
    };
    let (a_bench, a_pg) = per_tx(&a, &a_cpu);
    report.push(
        Row::baseline(
            &format!("A: app transactions, no outbox ({} connections)", ctx.writers),
            a.tx_rate(),
            "tx/s",
        )
        .note(&format!(
            "{:.0} WAL bytes per transaction; CPU per transaction: writers {a_bench:.0} us, Postgres {a_pg:.0} us",
            a.wal_per_tx()
        ))
        .cpu(a_cpu.per_10k(a.txs)),
    );
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    for m in modes {
        let (load, min, how) = match m {
            Mode::Tableless => (s3_tableless.as_ref(), 0.9, "one outbox_emit event"),
            Mode::Polling | Mode::Streamed => (s3_table.as_ref(), 0.85, "one outbox row"),
        };
        let (load, cpu) = load.context("S3 measured")?;
        let (bench, pg) = per_tx(load, cpu);
        let mut row = Row::ratio(
            &format!("S3 app transactions with {how}"),
            load.tx_rate(),
            "tx/s",
            a.tx_rate(),
            "A",
            min,
        )
        .note(&format!(
            "{:.0} WAL bytes per transaction (A: {:.0}); CPU per transaction: writers {bench:.0} us (A: {a_bench:.0}), Postgres {pg:.0} us (A: {a_pg:.0}); {cores} cores / ({bench:.0} + {pg:.0}) us = {:.0} tx/s at 100% CPU",
            load.wal_per_tx(),
            a.wal_per_tx(),
            cores as f64 * 1e6 / (bench + pg).max(1e-9)
        ))
        .cpu(cpu.per_10k(load.txs));
        if *m == Mode::Streamed {
            row = row.note("the writers' work is polling's (same INSERT; no relay runs in S3): the same measurement");
        }
        report.push_mode(m.label(), "S3 app tx/s", row);
        report.cell(
            m.label(),
            "S3 per tx: WAL bytes, CPU writers + Postgres",
            format!(
                "{:.0} B, {bench:.0} + {pg:.0} us (A: {:.0} B, {a_bench:.0} + {a_pg:.0} us)",
                load.wal_per_tx(),
                a.wal_per_tx()
            ),
        );
    }
    Ok(())
}

/// S2, S4 and S5 in `mode` with one relay (and, streaming, one slot). Measures L0 (the
/// broker alone at 50% of this mode's S2) when `l0` is still empty.
#[allow(clippy::too_many_lines)]
pub async fn live(
    ctx: &Ctx,
    mode: Mode,
    report: &mut Report,
    l0: &mut Option<Latencies>,
    l0_topic: &str,
) -> Result<()> {
    let m = mode.label();
    let (t_s2, t_s4, t_s5) = (mode.topic("s2"), mode.topic("s4"), mode.topic("s5"));
    for t in [&t_s2, &t_s4, &t_s5] {
        create_topic(&ctx.bootstrap, t, ctx.partitions).await?;
    }
    let (cfg, slot) = {
        let (u, base) = (ctx.url.clone(), ctx.relay_cfg.clone());
        tokio::task::spawn_blocking(move || mode::prepare(&u, &base, mode, "live")).await??
    };
    let outbox = mode.outbox();
    let acks = AckLog::default();
    let relay =
        InProcessRelay::run(outbox_relay::Relay::new(cfg)?.on_acknowledged(acks.listener()));
    // Every event committed while this relay runs: the acknowledgements catch up with it
    // between phases.
    let mut committed = 0_usize;

    if mode == Mode::Tableless {
        let (offset, matched, note) = lsn_probe(ctx, &t_s4, &outbox, &acks).await?;
        committed += 5;
        acks.set_tableless_offset(offset);
        report.push_mode(
            m,
            "ack id vs outbox_emit id",
            Row::info(
                "acknowledged id vs the id outbox_emit returned",
                #[allow(clippy::cast_precision_loss)]
                {
                    matched as f64
                },
                "of 5 events matched by id",
                &note,
            ),
        );
    }

    // S2: maximum sustainable throughput.
    let mut s2_one = 0.0;
    for per_tx in [1, 10] {
        let pb = spinner(&format!(
            "[{m}] S2: flat-out writers, {per_tx} events per transaction, relay running"
        ));
        let before = Cpu::now();
        let run = Load::flat_out(
            &ctx.url,
            Some(&t_s2),
            &outbox,
            ctx.writers,
            per_tx,
            ctx.window,
            Some(&acks),
        )
        .await?;
        committed += run.events;
        let tail = acks
            .wait_for(committed, STALL)
            .await
            .with_context(|| format!("[{m}] S2 {per_tx}/tx: waiting for the rest"))?;
        let cpu = Cpu::now().since(&before);
        pb.finish_and_clear();
        let bounded = run.backlog_bounded();
        let r = run.event_rate();
        if per_tx == 1 {
            s2_one = r;
        }
        report.push_mode(
            m,
            &format!("S2 max sustainable, {per_tx} event(s)/tx"),
            Row::info(
                &format!("S2 max sustainable, {per_tx} event(s)/tx"),
                r,
                "events/s",
                &format!(
                    "backlog (committed, not acknowledged) {} (max {}, end {}); {:.0} tx/s; rest acknowledged in {:.1} s",
                    if bounded { "bounded" } else { "GREW" },
                    run.max_backlog,
                    run.end_backlog,
                    run.tx_rate(),
                    tail.as_secs_f64()
                ),
            )
            .pass_if(bounded, "backlog bounded")
            .cpu(cpu.per_10k(run.events)),
        );
    }

    if l0.is_none() {
        let pb = spinner("latency floor: produce -> consume through the broker alone");
        let floor = load::broker_latency(
            &ctx.relay_cfg,
            &ctx.bootstrap,
            l0_topic,
            s2_one * 0.5,
            ctx.window,
        )
        .await?;
        pb.finish_and_clear();
        report.push(Row::latency(
            &format!("L0 broker alone: send -> ack at 50% of {m} S2 (no database)"),
            &floor,
        ));
        *l0 = Some(floor);
    }

    // S4: latency at 25/50/75% of S2 (1 event per transaction).
    let (p50_max, p99_max) = if mode.streaming() {
        (2.0, 10.0)
    } else {
        (5.0, 25.0)
    };
    let mut at_half = Latencies::default();
    for frac in [0.25, 0.5, 0.75] {
        let target = s2_one * frac;
        let pb = spinner(&format!(
            "[{m}] S4: commit-to-ack latency at {:.0}% of S2 ({target:.0} events/s)",
            frac * 100.0
        ));
        let lat = Load::paced_latency(
            &ctx.url,
            &ctx.bootstrap,
            &t_s4,
            &outbox,
            ctx.writers,
            target,
            ctx.window,
            &acks,
        )
        .await?;
        committed += lat.committed;
        acks.wait_for(committed, STALL)
            .await
            .with_context(|| format!("[{m}] S4 at {:.0}%", frac * 100.0))?;
        pb.finish_and_clear();
        let name = format!(
            "S4 latency at {:.0}% of S2 ({:.0} ev/s)",
            frac * 100.0,
            lat.rate
        );
        let mut row = Row::latency(&name, &lat);
        if (frac - 0.5).abs() < f64::EPSILON {
            at_half = lat.clone();
            row = row.pass_if(
                lat.ack
                    .as_ref()
                    .is_some_and(|a| a.p50_ms < p50_max && a.p99_ms < p99_max),
                &format!("commit-to-ack p50 < {p50_max} ms, p99 < {p99_max} ms"),
            );
        }
        report.push_mode(m, &format!("S4 at {:.0}% of S2", frac * 100.0), row);
    }

    // S5: a transaction held open while everyone else writes flat out, then at 50% load.
    let pb = spinner(&format!(
        "[{m}] S5: a transaction held open for {} s while others write",
        ctx.long_tx.as_secs()
    ));
    let held = load::hold_open(&ctx.url, &t_s5, &outbox).await?;
    let retained_start = match &slot {
        Some(s) => Some(s.retained_bytes()?),
        None => None,
    };
    let flat = Load::flat_out(
        &ctx.url,
        Some(&t_s5),
        &outbox,
        ctx.writers,
        1,
        ctx.long_tx * 2 / 3,
        Some(&acks),
    )
    .await?;
    committed += flat.events;
    let lat = Load::paced_latency(
        &ctx.url,
        &ctx.bootstrap,
        &t_s5,
        &outbox,
        ctx.writers,
        s2_one * 0.5,
        ctx.long_tx / 3,
        &acks,
    )
    .await?;
    committed += lat.committed;
    // The held transaction's start pins the slot's restart position: what it made the server
    // keep, read just before it commits.
    let retained_end = match &slot {
        Some(s) => Some(s.retained_bytes()?),
        None => None,
    };
    let held_for = held.commit().await?;
    committed += 1;
    acks.wait_for(committed, STALL)
        .await
        .with_context(|| format!("[{m}] S5: the held transaction's event and the rest"))?;
    pb.finish_and_clear();
    relay.stop().await?;
    if let Some(s) = slot {
        tokio::task::spawn_blocking(move || s.drop_now()).await??;
    }
    report.push_mode(
        m,
        "S5 throughput (tx held open)",
        Row::ratio(
            &format!(
                "S5 throughput, transaction open {:.0} s",
                held_for.as_secs_f64()
            ),
            flat.delivered_rate_last_third(),
            "events/s",
            s2_one,
            "S2",
            0.8,
        )
        .note(&format!(
            "delivered in the last third of the flat-out part; backlog {} (max {})",
            if flat.backlog_bounded() {
                "bounded"
            } else {
                "GREW"
            },
            flat.max_backlog
        )),
    );
    let (half50, half99) = headline(&at_half);
    let (limit, target) = if mode.streaming() {
        (
            half99.max(0.1) * 1.25 + 1.0,
            "p99 within 25% (+1 ms) of S4 at 50%",
        )
    } else {
        (
            half99.max(1.0) * 1.25 + 5.0,
            "p99 within 25% (+5 ms) of S4 at 50%",
        )
    };
    report.push_mode(
        m,
        "S5 latency (tx held open)",
        Row::latency("S5 latency at 50% of S2, transaction open", &lat)
            .note(&format!(
                "without the open transaction (S4 at 50%): p50 {half50:.1} ms, p99 {half99:.1} ms"
            ))
            .pass_if(headline(&lat).1 <= limit, target),
    );
    if let (Some(start), Some(end)) = (retained_start, retained_end) {
        #[allow(clippy::cast_precision_loss)]
        let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
        report.push_mode(
            m,
            "S5 slot retained WAL at the end of the held tx",
            Row::info(
                "S5 slot's retained WAL at the end of the held transaction",
                mib(end),
                "MiB",
                &format!(
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn): {:.1} MiB when the transaction had just opened, {:.1} MiB after {:.0} s open",
                    mib(start),
                    mib(end),
                    held_for.as_secs_f64()
                ),
            ),
        );
    }
    Ok(())
}

/// Five tableless events, one per transaction, with the relay running: the ids `outbox_emit`
/// returned next to the ids the relay acknowledged. Returns the offset (acknowledged minus
/// returned) when it is the same for all five, how many ids matched exactly, and what was seen.
async fn lsn_probe(
    ctx: &Ctx,
    topic: &str,
    outbox: &outbox::Outbox,
    acks: &AckLog,
) -> Result<(i64, usize, String)> {
    acks.start();
    let before = acks.acked();
    let (u, t, o) = (ctx.url.clone(), topic.to_owned(), outbox.clone());
    let mut written: Vec<i64> = tokio::task::spawn_blocking(move || -> Result<Vec<i64>> {
        let mut c = PgConnection::establish(&u)?;
        let mut ids = Vec::new();
        for seq in 0..5 {
            ids.extend(
                load::app_tx(&mut c, Some(&t), &o, 1, seq)?
                    .into_iter()
                    .map(|(id, _)| id),
            );
        }
        Ok(ids)
    })
    .await??;
    acks.wait_for(before + 5, STALL)
        .await
        .context("tableless LSN probe: the 5 events were not acknowledged")?;
    let mut acked: Vec<i64> = acks.stop().into_keys().collect();
    written.sort_unstable();
    acked.sort_unstable();
    let offsets: Vec<i64> = written.iter().zip(&acked).map(|(w, a)| a - w).collect();
    let matched = written.iter().filter(|w| acked.contains(w)).count();
    eprintln!(
        "  tableless ids: outbox_emit returned {written:?}, the relay acknowledged {acked:?}"
    );
    let constant = offsets.windows(2).all(|w| w[0] == w[1]) && offsets.len() == 5;
    let offset = if constant { offsets[0] } else { 0 };
    let note = format!(
        "outbox_emit returned {written:?} (-(LSN of pg_logical_emit_message)); the relay acknowledged {acked:?} (-(message LSN from pgoutput)); {}",
        match (constant, offset) {
            (true, 0) => "identical: tableless acknowledgements are matched by id".to_owned(),
            (true, o) => format!("a constant offset of {o}: matched by id minus {o}"),
            (false, _) => format!(
                "NOT a constant offset ({offsets:?}): commit-to-ack of tableless events cannot be matched exactly"
            ),
        }
    );
    Ok((offset, matched, note))
}
