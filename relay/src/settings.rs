//! Every setting of the relay, defined once: its TOML key, type, default, meaning, command-line
//! flag and environment variable. [`RelayConfig`]'s fields, defaults, setters and `Debug`, the
//! flags of `outbox-relay run`, and the configuration table of docs/RELAY.md (checked by a
//! test) all come from the one table below, so none of them can drift from the others.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::{CaptureMode, PoisonPolicy};

/// A duration given in milliseconds in the TOML file and on the command line (`lease_ms =
/// 5000`, `--lease-ms 5000`); a [`Duration`] everywhere in the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub Duration);

impl Millis {
    const fn ms(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// Whole milliseconds.
    #[must_use]
    pub fn as_ms(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(Self::ms)
    }
}

/// How a setting's value is read from a flag or variable and shown in docs and `Debug`.
pub trait Value: Sized {
    /// Parses a command-line or environment value.
    ///
    /// # Errors
    /// What was expected.
    fn parse(s: &str) -> Result<Self, String>;
    /// The value as the docs and `Debug` show it.
    fn show(&self) -> String;
    /// A switch: its flag takes no value (`--allow-superuser`).
    const SWITCH: bool = false;
}

macro_rules! value_from_str {
    ($($t:ty => $what:literal),*) => {$(
        impl Value for $t {
            fn parse(s: &str) -> Result<Self, String> {
                <$t>::from_str(s.trim()).map_err(|_| format!("expected {}", $what))
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
value_from_str!(i64 => "an integer", u64 => "a non-negative integer",
    u32 => "a non-negative integer", usize => "a non-negative integer");

impl Value for bool {
    fn parse(s: &str) -> Result<Self, String> {
        bool::from_str(s.trim()).map_err(|_| "expected true or false".into())
    }
    fn show(&self) -> String {
        self.to_string()
    }
    const SWITCH: bool = true;
}

impl Value for Millis {
    fn parse(s: &str) -> Result<Self, String> {
        u64::from_str(s.trim())
            .map(Self::ms)
            .map_err(|_| "expected milliseconds (a non-negative integer)".into())
    }
    fn show(&self) -> String {
        self.as_ms().to_string()
    }
}

impl Value for String {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.to_owned())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl Value for Option<String> {
    fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("must not be empty (leave it out for the default)".into());
        }
        Ok(Some(s.to_owned()))
    }
    fn show(&self) -> String {
        self.clone().unwrap_or_default()
    }
}

impl Value for Option<SocketAddr> {
    fn parse(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map(Some)
            .map_err(|_| "expected host:port, e.g. 127.0.0.1:9464".into())
    }
    fn show(&self) -> String {
        self.map(|a| a.to_string()).unwrap_or_default()
    }
}

impl Value for PoisonPolicy {
    fn parse(s: &str) -> Result<Self, String> {
        s.trim().parse().map_err(|e: crate::Error| e.to_string())
    }
    fn show(&self) -> String {
        match self {
            PoisonPolicy::Continue => "continue",
            PoisonPolicy::HoldKey => "hold-key",
        }
        .into()
    }
}

impl Value for CaptureMode {
    fn parse(s: &str) -> Result<Self, String> {
        s.trim().parse().map_err(|e: crate::Error| e.to_string())
    }
    fn show(&self) -> String {
        match self {
            CaptureMode::Polling => "polling",
            CaptureMode::Streaming => "streaming",
        }
        .into()
    }
}

/// Where a setting can be given besides the TOML file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A flag of every command (`--database-url`), and its environment variable.
    Global,
    /// A flag of `outbox-relay run`, and its environment variable.
    Run,
    /// Only in the TOML file (and the library).
    File,
}

/// One setting, as the docs and the command line see it.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The TOML key (and the `RelayConfig` field).
    pub key: &'static str,
    /// Where else it can be given.
    pub scope: Scope,
    /// The environment variable (empty for [`Scope::File`]).
    pub env: &'static str,
    /// The default as the docs show it.
    pub default: &'static str,
    /// What it means, and its limits.
    pub meaning: &'static str,
    /// A switch: its flag takes no value.
    pub switch: bool,
}

impl Setting {
    /// The flag (`--page-size`), for [`Scope::Global`] and [`Scope::Run`].
    #[must_use]
    pub fn flag(&self) -> Option<String> {
        (self.scope != Scope::File).then(|| format!("--{}", self.key.replace('_', "-")))
    }
}

macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident: $ty:ty = $default:expr,
            key $key:literal, $scope:ident, env $env:literal, shown $shown:literal,
            meaning $meaning:literal
            $(, set $setter:ident($arg:ident: $argty:ty) => $conv:expr)?;
    )*) => {
        /// The settings, in the order of the docs.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            key: $key,
            scope: Scope::$scope,
            env: $env,
            default: $shown,
            meaning: $meaning,
            switch: <$ty as Value>::SWITCH,
        }),*];

        /// Everything the relay needs. Build with [`RelayConfig::new`] and the setters, or
        /// deserialize from a TOML file (unknown keys are refused). Call
        /// [`RelayConfig::validate`] (the relay does). The settings are defined once, in
        /// [`crate::settings`].
        #[derive(Clone, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct RelayConfig {
            $(
                $(#[doc = $doc])+
                #[serde(rename = $key)]
                pub(crate) $field: $ty,
            )*
            /// Raw librdkafka producer properties (`[kafka]`).
            pub(crate) kafka: BTreeMap<String, String>,
        }

        impl Default for RelayConfig {
            fn default() -> Self {
                Self { $($field: $default,)* kafka: BTreeMap::new() }
            }
        }

        impl RelayConfig {
            /// Sets the setting `key` from its text form (a flag or environment value).
            pub(crate) fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
                match key {
                    $($key => self.$field = <$ty as Value>::parse(value)?,)*
                    other => return Err(format!("unknown setting {other}")),
                }
                Ok(())
            }

            /// `(key, value shown)` of every setting, for `Debug`.
            pub(crate) fn shown(&self) -> Vec<(&'static str, String)> {
                vec![$(($key, Value::show(&self.$field))),*]
            }
        }

        impl RelayConfig {
            $(setter! {
                [$(#[doc = $doc])+] $shown, $field;
                $($setter($arg: $argty) => $conv)?
            })*
        }
    };
}

/// A setter of [`RelayConfig`] (none for a setting the library does not use).
macro_rules! setter {
    ([$(#[doc = $doc:literal])+] $shown:literal, $field:ident;) => {};
    ([$(#[doc = $doc:literal])+] $shown:literal, $field:ident;
     $setter:ident($arg:ident: $argty:ty) => $conv:expr) => {
        $(#[doc = $doc])+
        #[doc = concat!("\n\nDefaults to ", $shown, ".")]
        #[must_use]
        pub fn $setter(mut self, $arg: $argty) -> Self {
            self.$field = $conv;
            self
        }
    };
}

settings! {
    /// Postgres URL of the database holding the outbox (its password is never logged).
    database_url: String = String::new(),
        key "database_url", Global, env "DATABASE_URL", shown "required",
        meaning "Postgres URL of the database holding the outbox; its password is never logged";
    /// Kafka bootstrap servers (`host:port,...`).
    brokers: String = String::new(),
        key "brokers", Global, env "KAFKA_BROKERS", shown "required",
        meaning "Kafka `bootstrap.servers` (`host:port,...`)";
    /// Schema holding the outbox tables.
    schema: Option<String> = None,
        key "schema", Global, env "OUTBOX_SCHEMA", shown "`search_path`",
        meaning "schema of the outbox tables (`^[a-z_][a-z0-9_]*$`)",
        set schema(schema: impl Into<String>) => Some(schema.into());
    /// `ce_source` of every message.
    source: Option<String> = None,
        key "source", File, env "", shown "`/outbox-relay/<schema>`",
        meaning "the `ce_source` header",
        set source(source: impl Into<String>) => Some(source.into());
    /// This process's name in the lease.
    instance_id: Option<String> = None,
        key "instance_id", Run, env "OUTBOX_RELAY_INSTANCE_ID", shown "`<host>-<pid>-<random>`",
        meaning "this process's name in the lease",
        set instance_id(id: impl Into<String>) => Some(id.into());
    /// Where the events come from: the outbox table by snapshot batches, or the WAL.
    capture: CaptureMode = CaptureMode::Polling,
        key "capture", Global, env "OUTBOX_RELAY_CAPTURE", shown "`polling`",
        meaning "`polling` (snapshot batches of the table) or `streaming` (the WAL through a replication slot: table rows and tableless events); see [Capture modes](#capture-modes)",
        set capture(mode: CaptureMode) => mode;
    /// The logical replication slot streaming capture reads (created by `migrate`).
    slot: Option<String> = None,
        key "slot", Global, env "OUTBOX_RELAY_SLOT", shown "`outbox_relay` (`outbox_relay_<schema>`)",
        meaning "replication slot of streaming capture, created by `outbox-relay migrate --capture streaming`; slot names are server-wide: one per database",
        set slot(name: impl Into<String>) => Some(name.into());
    /// The publication of the outbox table streaming capture reads (created by `migrate`).
    publication: Option<String> = None,
        key "publication", Global, env "OUTBOX_RELAY_PUBLICATION", shown "`outbox_relay` (`outbox_relay_<schema>`)",
        meaning "publication (INSERT only) of the outbox table for streaming capture, created by `migrate`",
        set publication(name: impl Into<String>) => Some(name.into());
    /// Tables whose row changes streaming capture publishes (change capture, docs/CDC.md).
    capture_tables: Option<String> = None,
        key "capture_tables", Global, env "OUTBOX_RELAY_CAPTURE_TABLES", shown "none",
        meaning "comma-separated `schema.table` list whose committed INSERT, UPDATE, DELETE and TRUNCATE streaming capture publishes as change events ([docs/CDC.md](CDC.md)); needs `capture = streaming`",
        set capture_tables(list: impl Into<String>) => Some(list.into());
    /// The topic of a captured table's change events.
    capture_topic: String = "{schema}.{table}".to_owned(),
        key "capture_topic", Global, env "OUTBOX_RELAY_CAPTURE_TOPIC", shown "`{schema}.{table}`",
        meaning "topic of a captured table's change events; `{schema}` and `{table}` are replaced",
        set capture_topic(pattern: impl Into<String>) => pattern.into();
    /// The publication of the captured tables (every operation).
    capture_publication: Option<String> = None,
        key "capture_publication", Global, env "OUTBOX_RELAY_CAPTURE_PUBLICATION", shown "`<publication>_tables`",
        meaning "publication of the captured tables (insert, update, delete, truncate), created or extended by `migrate --capture streaming`",
        set capture_publication(name: impl Into<String>) => Some(name.into());
    /// Columns a captured table's events carry (all others left out).
    capture_include_columns: Option<String> = None,
        key "capture_include_columns", Global, env "OUTBOX_RELAY_CAPTURE_INCLUDE_COLUMNS", shown "all",
        meaning "`schema.table.column` list: for each table named, its events carry only these columns (and the key's)",
        set capture_include_columns(list: impl Into<String>) => Some(list.into());
    /// Columns a captured table's events never carry.
    capture_exclude_columns: Option<String> = None,
        key "capture_exclude_columns", Global, env "OUTBOX_RELAY_CAPTURE_EXCLUDE_COLUMNS", shown "none",
        meaning "`schema.table.column` list of columns left out of the events (e.g. secrets); not a key column",
        set capture_exclude_columns(list: impl Into<String>) => Some(list.into());
    /// The key of a captured table's events, when not its replica identity.
    capture_key_columns: Option<String> = None,
        key "capture_key_columns", Global, env "OUTBOX_RELAY_CAPTURE_KEY_COLUMNS", shown "the primary key",
        meaning "`schema.table.column` list, in key order: the message key of that table's events (columns of its replica identity, or any with REPLICA IDENTITY FULL)",
        set capture_key_columns(list: impl Into<String>) => Some(list.into());
    /// Rows per fetch: large enough to amortise a round trip, small enough to delete quickly.
    page_size: i64 = 1000,
        key "page_size", Run, env "OUTBOX_RELAY_PAGE_SIZE", shown "1000",
        meaning "rows per fetch (1..=50000)",
        set page_size(n: i64) => n;
    /// Pages produced ahead of acknowledgement: keeps the database and Kafka busy at once.
    max_pages_in_flight: usize = 4,
        key "max_pages_in_flight", Run, env "OUTBOX_RELAY_MAX_PAGES_IN_FLIGHT", shown "4",
        meaning "pages produced ahead of acknowledgement (1..=64)",
        set max_pages_in_flight(n: usize) => n;
    /// Longest sleep when idle; polling speeds up again as soon as a batch has rows.
    idle_poll_max: Millis = Millis::ms(100),
        key "idle_poll_max_ms", Run, env "OUTBOX_RELAY_IDLE_POLL_MAX_MS", shown "100 ms",
        meaning "longest idle poll interval (shorter than lease_ms / 4)",
        set idle_poll_max(d: Duration) => Millis(d);
    /// Lease length: a leader that has not renewed for this long is replaced.
    lease: Millis = Millis::ms(5000),
        key "lease_ms", Run, env "OUTBOX_RELAY_LEASE_MS", shown "5000 ms",
        meaning "a leader silent this long is replaced (>= 1000)",
        set lease(d: Duration) => Millis(d);
    /// How often a standby checks whether the lease expired.
    standby_poll: Millis = Millis::ms(500),
        key "standby_poll_ms", Run, env "OUTBOX_RELAY_STANDBY_POLL_MS", shown "500 ms",
        meaning "how often standbys check the lease (shorter than lease_ms)",
        set standby_poll(d: Duration) => Millis(d);
    /// Delivery attempts before an event is dead-lettered (permanent errors: at once).
    max_attempts: u32 = 5,
        key "max_attempts", Run, env "OUTBOX_RELAY_MAX_ATTEMPTS", shown "5",
        meaning "delivery attempts before dead-lettering (permanent errors: at once)",
        set max_attempts(n: u32) => n;
    /// What happens to later events of a key after one of its events is dead-lettered.
    poison_policy: PoisonPolicy = PoisonPolicy::Continue,
        key "poison_policy", Run, env "OUTBOX_RELAY_POISON_POLICY", shown "`continue`",
        meaning "`continue` or `hold-key` (later events of a dead-lettered key)",
        set poison_policy(p: PoisonPolicy) => p;
    /// How long shutdown waits for outstanding acknowledgements.
    shutdown_timeout: Millis = Millis::ms(10_000),
        key "shutdown_timeout_ms", Run, env "OUTBOX_RELAY_SHUTDOWN_TIMEOUT_MS", shown "10000 ms",
        meaning "wait for acknowledgements at shutdown",
        set shutdown_timeout(d: Duration) => Millis(d);
    /// An event whose acknowledgement is overdue by this long is set aside, still in flight,
    /// and the later events of its key wait for it (they stay in the outbox); every other key
    /// keeps flowing, so an unavailable partition holds up only the keys on it. Long enough
    /// that a broker's ordinary hiccup (a leader election, a retry) is waited out in line.
    ack_overdue: Millis = Millis::ms(10_000),
        key "ack_overdue_ms", Run, env "OUTBOX_RELAY_ACK_OVERDUE_MS", shown "10000 ms",
        meaning "an event unacknowledged this long is set aside with its key's later events; other keys go on",
        set ack_overdue(d: Duration) => Millis(d);
    /// Serve `/metrics` and `/healthz` here: `outbox-relay run` does; a program that embeds
    /// the library serves [`crate::metrics::install`]'s handle itself.
    metrics_addr: Option<SocketAddr> = None,
        key "metrics_addr", Run, env "OUTBOX_RELAY_METRICS_ADDR", shown "off",
        meaning "`outbox-relay run` serves `/metrics` and `/healthz` here";
    /// Keep delivered events this many hours in `outbox_delivered` (for `outbox-relay replay`),
    /// then purge them. 0 deletes them at once. When positive, removal after acknowledgement
    /// becomes a move in the same fenced statement, and the leader purges expired rows every
    /// `purge_interval_ms` in batches of 10,000.
    keep_delivered_hours: u64 = 0,
        key "keep_delivered_hours", Run, env "OUTBOX_RELAY_KEEP_DELIVERED_HOURS", shown "0",
        meaning "keep delivered events this long in `outbox_delivered` for `replay` (0: delete at once; at most 8760)",
        set keep_delivered_hours(hours: u64) => hours;
    /// Purge dead letters older than this many days (by `dead_lettered_at`); 0 keeps them until
    /// an operator retries or purges them.
    dead_letters_keep_days: u64 = 0,
        key "dead_letters_keep_days", Run, env "OUTBOX_RELAY_DEAD_LETTERS_KEEP_DAYS", shown "0",
        meaning "the leader purges dead letters older than this (0: keep until an operator acts; at most 3650)",
        set dead_letters_keep_days(days: u64) => days;
    /// How often the leader purges expired delivered events and dead letters (also once when it
    /// becomes leader): often enough that each run deletes little, rarely enough that the index
    /// scan costs nothing.
    purge_interval: Millis = Millis::ms(300_000),
        key "purge_interval_ms", Run, env "OUTBOX_RELAY_PURGE_INTERVAL_MS", shown "300000 ms",
        meaning "how often the leader purges expired rows (also when it becomes leader; >= 1000)",
        set purge_interval(d: Duration) => Millis(d);
    /// `synchronous_commit` of the relay's own session: its commits (lease, batch snapshots,
    /// removals) need not wait for the WAL flush; losing the last of them in a database crash
    /// moves the relay's state back, which re-sends events and never skips one. `on` trades
    /// relay throughput and latency for fewer duplicates after a crash.
    synchronous_commit: String = "off".to_owned(),
        key "synchronous_commit", File, env "", shown "`off`",
        meaning "the relay session's own commits (lease, batch snapshots, removals); `on` waits for the WAL flush (see \"The relay's own commits\")",
        set synchronous_commit(value: impl Into<String>) => value.into();
    /// Run even when the database role is a superuser (default: refuse, least privilege).
    allow_superuser: bool = false,
        key "allow_superuser", Run, env "OUTBOX_RELAY_ALLOW_SUPERUSER", shown "false",
        meaning "run even as a Postgres superuser (use the role in [ops/relay-role.sql](ops/relay-role.sql) instead)",
        set allow_superuser(yes: bool) => yes;
}

/// The configuration table of docs/RELAY.md, generated from [`SETTINGS`].
#[must_use]
pub fn markdown_table() -> String {
    let mut out =
        String::from("| key (TOML) | flag, environment | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let flag = match s.flag() {
            Some(f) => format!("`{f}`, `{}`", s.env),
            None => String::new(),
        };
        out.push_str(&format!(
            "| `{}` | {flag} | {} | {} |\n",
            s.key, s.default, s.meaning
        ));
    }
    out.push_str("| `[kafka]` table | `-X key=value` | | raw librdkafka producer properties |\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shown_default_is_the_default() {
        let values = RelayConfig::default();
        for (key, shown) in values.shown() {
            let s = SETTINGS.iter().find(|s| s.key == key).unwrap();
            let doc = s.default.trim_matches('`');
            let doc = doc.strip_suffix(" ms").unwrap_or(doc);
            match key {
                // Not a value: what an empty default stands for.
                "database_url"
                | "brokers"
                | "schema"
                | "source"
                | "instance_id"
                | "metrics_addr"
                | "slot"
                | "publication"
                | "capture_tables"
                | "capture_publication"
                | "capture_include_columns"
                | "capture_exclude_columns"
                | "capture_key_columns" => assert!(shown.is_empty(), "{key}"),
                _ => assert_eq!(shown, doc, "{key}"),
            }
        }
    }

    /// docs/RELAY.md's configuration table is this table (regenerate it with
    /// `cargo test -p outbox-relay --lib settings -- --ignored --nocapture` and paste).
    #[test]
    fn the_docs_table_is_the_settings_table() {
        let doc = include_str!("../../docs/RELAY.md");
        let begin = "<!-- settings:begin (generated from relay/src/settings.rs) -->\n";
        let start = doc.find(begin).expect("marker in docs/RELAY.md") + begin.len();
        let end = doc[start..]
            .find("<!-- settings:end -->")
            .expect("end marker")
            + start;
        assert_eq!(
            doc[start..end],
            markdown_table(),
            "docs/RELAY.md's configuration table differs from relay/src/settings.rs"
        );
    }

    #[test]
    #[ignore = "prints the docs table"]
    fn print_the_docs_table() {
        print!("{}", markdown_table());
    }

    #[test]
    fn every_setting_parses_its_shown_default_back() {
        let mut values = RelayConfig::default();
        for (key, shown) in RelayConfig::default().shown() {
            if !shown.is_empty() {
                values.set(key, &shown).unwrap();
            }
        }
        assert_eq!(values.shown(), RelayConfig::default().shown());
        assert!(values
            .set("lease_ms", "soon")
            .unwrap_err()
            .contains("milliseconds"));
        assert!(values.set("no_such", "1").is_err());
        // An empty variable (`OUTBOX_RELAY_INSTANCE_ID=`) is refused, not taken as a name.
        assert!(values
            .set("instance_id", " ")
            .unwrap_err()
            .contains("empty"));
    }
}
