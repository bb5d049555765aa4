//! `outbox-relay status`: what an operator needs at a glance.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Double, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;

use crate::error::Result;

/// Backlog of one topic.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct TopicBacklog {
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Events waiting.
    #[diesel(sql_type = BigInt)]
    pub events: i64,
    /// Age of the oldest waiting event, seconds.
    #[diesel(sql_type = Double)]
    pub oldest_age_secs: f64,
}

/// Dead letters of one topic.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct TopicDeadLetters {
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Dead letters.
    #[diesel(sql_type = BigInt)]
    pub events: i64,
    /// The most recent error.
    #[diesel(sql_type = Text)]
    pub last_error: String,
}

/// The lease.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct Leader {
    /// Outbox table.
    #[diesel(sql_type = Text)]
    pub outbox_table: String,
    /// Leading instance, if any.
    #[diesel(sql_type = Nullable<Text>)]
    pub leader_id: Option<String>,
    /// Fencing epoch.
    #[diesel(sql_type = BigInt)]
    pub leader_epoch: i64,
    /// Lease end.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Whether the lease is still valid.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub lease_valid: bool,
}

/// The oldest transaction that holds capture back.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct OldestTransaction {
    /// Backend pid.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub pid: i32,
    /// Seconds open.
    #[diesel(sql_type = Double)]
    pub open_secs: f64,
    /// Application name.
    #[diesel(sql_type = Text)]
    pub application_name: String,
    /// Backend state.
    #[diesel(sql_type = Text)]
    pub state: String,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Backlog per topic.
    pub backlog: Vec<TopicBacklog>,
    /// Leader per outbox.
    pub leaders: Vec<Leader>,
    /// Dead letters per topic.
    pub dead_letters: Vec<TopicDeadLetters>,
    /// Oldest open transaction with an xid (its events, and later ones' visibility, wait).
    pub oldest_transaction: Option<OldestTransaction>,
}

/// Reads the status.
///
/// # Errors
/// [`crate::Error::Database`].
pub fn read(conn: &mut PgConnection, tables: &outbox::TableRef) -> Result<Status> {
    let t = tables.qualify("outbox");
    let s = tables.qualify("outbox_relay_state");
    let d = tables.qualify("outbox_dead_letters");
    let backlog = diesel::sql_query(format!(
        "SELECT topic, count(*) AS events, \
         extract(epoch FROM clock_timestamp() - min(created_at))::float8 AS oldest_age_secs \
         FROM {t} GROUP BY topic ORDER BY topic"
    ))
    .load(conn)?;
    let leaders = diesel::sql_query(format!(
        "SELECT outbox_table, leader_id, leader_epoch, lease_expires_at, \
         coalesce(lease_expires_at > clock_timestamp(), false) AS lease_valid \
         FROM {s} ORDER BY outbox_table"
    ))
    .load(conn)?;
    let dead_letters = diesel::sql_query(format!(
        "SELECT topic, count(*) AS events, \
         (array_agg(last_error ORDER BY dead_lettered_at DESC))[1] AS last_error \
         FROM {d} GROUP BY topic ORDER BY topic"
    ))
    .load(conn)?;
    let oldest_transaction = diesel::sql_query(
        "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8 AS open_secs, \
         coalesce(application_name, '') AS application_name, coalesce(state, '') AS state \
         FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
         ORDER BY xact_start LIMIT 1",
    )
    .load::<OldestTransaction>(conn)?
    .pop();
    Ok(Status {
        backlog,
        leaders,
        dead_letters,
        oldest_transaction,
    })
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

impl Status {
    /// Human-readable rendering.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::from("BACKLOG\n");
        if self.backlog.is_empty() {
            out.push_str("(empty: every committed event was delivered)\n");
        } else {
            let rows: Vec<Vec<String>> = self
                .backlog
                .iter()
                .map(|b| {
                    vec![
                        b.topic.clone(),
                        b.events.to_string(),
                        format!("{:.1}s", b.oldest_age_secs),
                    ]
                })
                .collect();
            out.push_str(&table(&["topic", "events", "oldest"], &rows));
        }
        out.push_str("\nLEADER\n");
        let rows: Vec<Vec<String>> = self
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
        out.push_str("\nDEAD LETTERS\n");
        if self.dead_letters.is_empty() {
            out.push_str("(none)\n");
        } else {
            let rows: Vec<Vec<String>> = self
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
        out.push_str("\nOLDEST OPEN TRANSACTION\n");
        match &self.oldest_transaction {
            None => out.push_str("(none)\n"),
            Some(t) => out.push_str(&table(
                &["pid", "open", "application", "state"],
                &[vec![
                    t.pid.to_string(),
                    format!("{:.1}s", t.open_secs),
                    t.application_name.clone(),
                    t.state.clone(),
                ]],
            )),
        }
        out
    }
}
