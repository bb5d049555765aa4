//! Rendering for the command line: the ops functions (`status`, `dead_letters`, `replay`)
//! return data; this is where it becomes text.

use chrono::Utc;

use crate::dead_letters::Summary;
use crate::status::Status;

/// A duration in seconds, short: `4.2s`, `12.5m`, `3.1h`, `2.0d`.
#[must_use]
pub fn age(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{:.1}m", secs / 60.0)
    } else if secs < 86_400.0 {
        format!("{:.1}h", secs / 3600.0)
    } else {
        format!("{:.1}d", secs / 86_400.0)
    }
}

/// Renders rows as an aligned text table.
#[must_use]
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(&format!("{c:<w$}"));
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// `outbox-relay status` as text.
#[must_use]
pub fn status(status: &Status) -> String {
    let mut out = String::new();
    for section in [
        backlog,
        leader,
        relays,
        dead_letters_by_topic,
        oldest_transaction,
        slots,
        snapshots,
        inbox,
    ] {
        section(status, &mut out);
    }
    out
}

/// The events waiting, per topic.
fn backlog(status: &Status, out: &mut String) {
    out.push_str("BACKLOG\n");
    if status.backlog.is_empty() {
        out.push_str("(empty: every committed event was delivered)\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .backlog
            .iter()
            .map(|b| {
                vec![
                    b.topic.clone(),
                    b.events.to_string(),
                    age(b.oldest_age_secs),
                ]
            })
            .collect();
        out.push_str(&table(&["topic", "events", "oldest"], &rows));
    }
}

/// The lease.
fn leader(status: &Status, out: &mut String) {
    out.push_str("\nLEADER\n");
    let rows: Vec<Vec<String>> = status
        .leaders
        .iter()
        .map(|l| {
            vec![
                l.outbox_table.clone(),
                l.leader_id.clone().unwrap_or_else(|| "(none)".into()),
                l.leader_epoch.to_string(),
                if l.lease_valid { "valid" } else { "expired" }.into(),
                l.lease_expires_at
                    .map_or_else(|| "-".into(), |t| t.to_rfc3339()),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("(no relay has run yet)\n");
    } else {
        out.push_str(&table(
            &["outbox", "leader", "epoch", "lease", "lease_expires_at"],
            &rows,
        ));
    }
}

/// The relay sessions connected now.
fn relays(status: &Status, out: &mut String) {
    out.push_str("\nRELAYS (connected now)\n");
    if status.relays.is_empty() {
        out.push_str("(no relay is connected)\n");
    } else {
        let now = Utc::now();
        let rows: Vec<Vec<String>> = status
            .relays
            .iter()
            .map(|r| {
                vec![
                    r.instance.clone(),
                    r.role.clone(),
                    r.connections.to_string(),
                    r.connected_since.map_or_else(
                        || "-".into(),
                        #[allow(clippy::cast_precision_loss)]
                        |t| age((now - t).num_milliseconds().max(0) as f64 / 1000.0),
                    ),
                    if r.clients.is_empty() {
                        "-".into()
                    } else {
                        r.clients.join(",")
                    },
                    r.pids
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "instance",
                "role",
                "sessions",
                "connected",
                "client",
                "pids",
            ],
            &rows,
        ));
    }
}

/// Dead letters per topic.
fn dead_letters_by_topic(status: &Status, out: &mut String) {
    out.push_str("\nDEAD LETTERS\n");
    if status.dead_letters.is_empty() {
        out.push_str("(none)\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .dead_letters
            .iter()
            .map(|d| {
                let mut e = d.last_error.clone();
                if e.chars().count() > 80 {
                    e = e.chars().take(77).collect::<String>() + "...";
                }
                vec![d.topic.clone(), d.events.to_string(), e]
            })
            .collect();
        out.push_str(&table(&["topic", "events", "last_error"], &rows));
    }
}

/// The oldest open transaction (it holds back the xmin horizon).
fn oldest_transaction(status: &Status, out: &mut String) {
    out.push_str("\nOLDEST OPEN TRANSACTION\n");
    match &status.oldest_transaction {
        None => out.push_str("(none)\n"),
        Some(t) => out.push_str(&table(
            &["pid", "open", "application", "state"],
            &[vec![
                t.pid.to_string(),
                age(t.open_secs),
                t.application_name.clone(),
                t.state.clone(),
            ]],
        )),
    }
}

/// The replication slots of this database and the WAL they keep.
fn slots(status: &Status, out: &mut String) {
    out.push_str("\nREPLICATION SLOTS\n");
    if status.slots.is_empty() {
        out.push_str("(none: no streaming capture on this database)\n");
        return;
    }
    let mib =
        |b: Option<i64>| b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1_048_576.0));
    let rows: Vec<Vec<String>> = status
        .slots
        .iter()
        .map(|s| {
            vec![
                s.slot_name.clone(),
                s.active_pid.map_or("(inactive)".into(), |p| p.to_string()),
                s.wal_status.clone().unwrap_or_default(),
                mib(s.retained_bytes),
                mib(s.lag_bytes),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "slot",
            "walsender",
            "wal_status",
            "retained WAL",
            "unconfirmed",
        ],
        &rows,
    ));
}

/// Snapshots of captured tables (change capture).
fn snapshots(status: &Status, out: &mut String) {
    if status.snapshots.is_empty() {
        return;
    }
    out.push_str("\nSNAPSHOTS (change capture)\n");
    let rows: Vec<Vec<String>> = status
        .snapshots
        .iter()
        .map(|s| {
            vec![
                s.table_name.clone(),
                s.rows_read.to_string(),
                s.requested_at.clone(),
                s.finished_at.clone().unwrap_or_else(|| "(running)".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &["table", "rows read", "requested", "finished"],
        &rows,
    ));
}

/// The inbox sizes per consumer.
fn inbox(status: &Status, out: &mut String) {
    out.push_str(&format!("\nINBOX ({})\n", status.inbox.table));
    if !status.inbox.exists {
        out.push_str("(no inbox table in this database)\n");
    } else if !status.inbox.readable {
        out.push_str("(not readable by this role: GRANT SELECT on it to see sizes)\n");
    } else if status.inbox.consumers.is_empty() {
        out.push_str("(empty)\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .inbox
            .consumers
            .iter()
            .map(|c| {
                vec![
                    c.consumer.clone(),
                    c.rows.to_string(),
                    age(c.oldest_age_secs),
                    c.oldest_processed_at.to_rfc3339(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["consumer", "rows", "oldest", "oldest_processed_at"],
            &rows,
        ));
    }
}

/// Dead letters as a table.
#[must_use]
pub fn dead_letters(rows: &[Summary]) -> String {
    if rows.is_empty() {
        return "(no dead letters match)\n".into();
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut e = r.last_error.clone();
            if e.chars().count() > 60 {
                e = e.chars().take(57).collect::<String>() + "...";
            }
            vec![
                r.id.to_string(),
                r.topic.clone(),
                r.partition_key.clone(),
                r.event_type.clone(),
                r.payload_bytes.to_string(),
                r.attempts.to_string(),
                r.dead_lettered_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                e,
            ]
        })
        .collect();
    table(
        &[
            "id",
            "topic",
            "key",
            "type",
            "bytes",
            "attempts",
            "dead_lettered_at",
            "last_error",
        ],
        &rows,
    )
}
