//! The `outbox-relay` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use outbox::shutdown::TaskTracker;
use tokio_util::sync::CancellationToken;

mod render;

use crate::config::RelayConfig;
use crate::error::scrub_url;
use crate::settings::{Scope, Setting, SETTINGS};
use crate::{dead_letters, metrics, replay, status, store, Relay};

/// Moves committed outbox events from Postgres to Kafka (one active relay per outbox; start
/// several for failover).
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Cli {
    /// TOML configuration file (keys as in docs/RELAY.md); flags and env override it.
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Postgres URL of the database holding the outbox.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Kafka bootstrap servers (host:port,...).
    #[arg(long, global = true, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Schema of the outbox tables (default: the connection's search_path).
    #[arg(long, global = true, env = "OUTBOX_SCHEMA")]
    schema: Option<String>,
    /// Capture mode: polling (snapshot batches of the table) or streaming (the WAL).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CAPTURE")]
    capture: Option<String>,
    /// Replication slot of streaming capture.
    #[arg(long, global = true, env = "OUTBOX_RELAY_SLOT")]
    slot: Option<String>,
    /// Publication of the outbox table for streaming capture.
    #[arg(long, global = true, env = "OUTBOX_RELAY_PUBLICATION")]
    publication: Option<String>,
    /// Tables whose row changes streaming capture publishes (schema.table,...; docs/CDC.md).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CAPTURE_TABLES")]
    capture_tables: Option<String>,
    /// Topic of a captured table's change events ({schema} and {table} replaced).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CAPTURE_TOPIC")]
    capture_topic: Option<String>,
    /// Publication of the captured tables.
    #[arg(long, global = true, env = "OUTBOX_RELAY_CAPTURE_PUBLICATION")]
    capture_publication: Option<String>,
    /// Columns captured tables' events carry (schema.table.column,...).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CAPTURE_INCLUDE_COLUMNS")]
    capture_include_columns: Option<String>,
    /// Columns left out of captured tables' events (schema.table.column,...).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CAPTURE_EXCLUDE_COLUMNS")]
    capture_exclude_columns: Option<String>,
    /// The key of a captured table's events (schema.table.column,..., in key order).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CAPTURE_KEY_COLUMNS")]
    capture_key_columns: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Apply the outbox migrations; with `--capture streaming`, also create the publication
    /// and the replication slot streaming capture reads (needs wal_level = logical and a role
    /// with REPLICATION that owns the outbox table).
    Migrate,
    /// Show backlog, leader and standbys, dead letters, the oldest open transaction, inbox sizes.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List, show, retry or purge dead-lettered events.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Re-publish delivered events kept in outbox_delivered (needs keep_delivered_hours > 0 on
    /// the relay), with their original event ids, in their original order.
    Replay(ReplayArgs),
    /// Ask the streaming relay to publish a captured table's existing rows as `read` events
    /// (again from the start if it did before), in chunks between watermarks, while its
    /// changes keep flowing (docs/CDC.md#snapshots).
    Snapshot {
        /// The captured table (`schema.table`).
        table: String,
        /// Rows per chunk.
        #[arg(long, default_value_t = 1000)]
        chunk_size: i32,
    },
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// Delivered at or after this time (RFC 3339, e.g. 2026-11-23T10:00:00Z).
    #[arg(long, value_parser = parse_time)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Delivered before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Original outbox id at least this.
    #[arg(long)]
    from_id: Option<i64>,
    /// Original outbox id at most this.
    #[arg(long)]
    to_id: Option<i64>,
    /// Only this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only this partition key.
    #[arg(long)]
    key: Option<String>,
    /// Print how many events per topic would be re-published, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Required when no time or id bound is given.
    #[arg(long)]
    all: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

fn parse_time(s: &str) -> std::result::Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-11-23T10:00:00Z: {e}"))
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// List dead letters (oldest first).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload and headers.
    Show {
        /// Outbox id of the dead letter.
        id: i64,
    },
    /// Move dead letters back into the outbox, in id order, to be delivered again.
    Retry {
        #[command(flatten)]
        filter: FilterArgs,
        /// Say what would move, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Required when no filter is given.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Say what would be deleted, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Required when no filter is given.
        #[arg(long)]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, clap::Args)]
struct FilterArgs {
    /// Only this outbox id.
    #[arg(long)]
    id: Option<i64>,
    /// Only this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only this partition key.
    #[arg(long)]
    key: Option<String>,
    /// Only dead letters older than this (90s, 15m, 6h, 7d).
    #[arg(long)]
    older_than: Option<String>,
    /// Only dead letters whose last error contains this text.
    #[arg(long)]
    error: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> Result<dead_letters::Filter> {
        Ok(dead_letters::Filter {
            id: self.id,
            topic: self.topic.clone(),
            key: self.key.clone(),
            older_than: self
                .older_than
                .as_deref()
                .map(dead_letters::parse_age)
                .transpose()?,
            error: self.error.clone(),
        })
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// One flag per setting of `outbox-relay run` (see `crate::settings`).
    #[command(flatten)]
    settings: RunFlags,
    /// Raw librdkafka producer property, KEY=VALUE (repeatable).
    #[arg(short = 'X', long = "kafka-option", value_parser = parse_kv)]
    kafka: Vec<(String, String)>,
}

/// The flags of `outbox-relay run`, made from the settings table: `--<key>` and its
/// environment variable for every [`Scope::Run`] setting, checked as the setting parses.
#[derive(Debug, Clone, Default)]
struct RunFlags {
    given: Vec<(&'static str, String)>,
}

fn run_settings() -> impl Iterator<Item = &'static Setting> {
    SETTINGS.iter().filter(|s| s.scope == Scope::Run)
}

impl clap::FromArgMatches for RunFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut given = Vec::new();
        for s in run_settings() {
            if s.switch {
                if m.get_flag(s.key) {
                    given.push((s.key, "true".to_owned()));
                }
            } else if let Some(v) = m.get_one::<String>(s.key) {
                given.push((s.key, v.clone()));
            }
        }
        Ok(Self { given })
    }

    fn update_from_arg_matches(
        &mut self,
        m: &clap::ArgMatches,
    ) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for RunFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        run_settings().fold(cmd, |cmd, s| {
            let key = s.key;
            let arg = clap::Arg::new(key)
                .long(key.replace('_', "-"))
                .env(s.env)
                .help(format!(
                    "{} [default: {}]",
                    s.meaning.replace('`', ""),
                    s.default.replace('`', "")
                ));
            cmd.arg(if s.switch {
                arg.action(clap::ArgAction::SetTrue)
            } else {
                arg.value_parser(move |v: &str| {
                    RelayConfig::default().set(key, v).map(|()| v.to_owned())
                })
            })
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

impl Cli {
    fn base_config(&self) -> Result<RelayConfig> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read config file {}", path.display()))?;
                RelayConfig::from_toml(&text)
                    .with_context(|| format!("config file {}", path.display()))?
            }
            None => RelayConfig::new("", ""),
        };
        if let Some(u) = &self.database_url {
            cfg.database_url.clone_from(u);
        }
        if let Some(b) = &self.brokers {
            cfg.brokers.clone_from(b);
        }
        if let Some(s) = &self.schema {
            cfg.schema = Some(s.clone());
        }
        for (key, value) in [
            ("capture", &self.capture),
            ("slot", &self.slot),
            ("publication", &self.publication),
            ("capture_tables", &self.capture_tables),
            ("capture_topic", &self.capture_topic),
            ("capture_publication", &self.capture_publication),
            ("capture_include_columns", &self.capture_include_columns),
            ("capture_exclude_columns", &self.capture_exclude_columns),
            ("capture_key_columns", &self.capture_key_columns),
        ] {
            if let Some(v) = value {
                cfg.set(key, v)
                    .map_err(|e| anyhow::anyhow!("--{key}: {e}"))?;
            }
        }
        Ok(cfg)
    }
}

impl RunArgs {
    fn apply(&self, mut cfg: RelayConfig) -> Result<RelayConfig> {
        for (key, value) in &self.settings.given {
            cfg.set(key, value)
                .map_err(|e| anyhow::anyhow!("--{}: {e}", key.replace('_', "-")))?;
        }
        for (k, v) in &self.kafka {
            cfg.kafka.insert(k.clone(), v.clone());
        }
        Ok(cfg)
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pg_walstream=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// Entry point of the binary.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let cfg = cli.base_config()?;
    match &cli.command {
        Command::Migrate => {
            let tables = cfg.tables()?;
            require_url(&cfg)?;
            let mut conn = store::connect(cfg.database_url())?;
            let applied = outbox::Outbox::with_tables(tables.clone()).migrate(&mut conn)?;
            if applied.is_empty() {
                println!("schema is up to date ({})", scrub_url(cfg.database_url()));
            } else {
                for m in applied {
                    println!("applied {m}");
                }
            }
            if cfg.capture == crate::CaptureMode::Streaming {
                let (slot, publication) = (cfg.slot_name(), cfg.publication_name());
                let captured = cfg.captured_tables()?;
                if !captured.is_empty() {
                    let table_pub = cfg.capture_publication_name();
                    let added =
                        store::stream::ensure_table_publication(&mut conn, &captured, &table_pub)?;
                    if added.is_empty() {
                        println!("publication {table_pub} publishes every captured table");
                    } else {
                        println!(
                            "publication {table_pub} now publishes {} (every operation)",
                            added.join(", ")
                        );
                        // Their existing rows are not in the stream: a snapshot publishes them.
                        let snapshots = tables
                            .qualify(outbox::contract::Table::Snapshots)
                            .to_string();
                        for t in captured.iter().filter(|t| added.contains(&t.to_string())) {
                            if let Err(e) = store::stream::snapshot_plan(&mut conn, t) {
                                println!("no snapshot of {t}: {e}");
                                continue;
                            }
                            store::stream::request_snapshot(&mut conn, &snapshots, t, 1000)?;
                            println!("snapshot of {t} requested (its existing rows)");
                        }
                    }
                }
                let setup =
                    store::stream::ensure_streaming(&mut conn, &tables, &slot, &publication)?;
                if setup.created_publication {
                    println!("created publication {publication} (INSERT on the outbox table)");
                } else {
                    println!("publication {publication} exists");
                }
                match &setup.created_slot {
                    Some(lsn) => println!("created replication slot {slot} (pgoutput) at {lsn}"),
                    None => println!("replication slot {slot} exists"),
                }
                if setup.rows_before_slot > 0 {
                    anyhow::bail!(
                        "the outbox table holds {} rows written before the slot existed: the slot \
                         does not stream them. Deliver them with capture = polling until the table \
                         is empty, then start the streaming relay (docs/RELAY.md#switching-modes)",
                        setup.rows_before_slot
                    );
                }
            }
            Ok(())
        }
        Command::Status { json } => {
            let tables = cfg.tables()?;
            require_url(&cfg)?;
            let mut conn = store::connect_as(cfg.database_url(), Some("outbox-relay status"))?;
            let s = status::read(&mut conn, &tables)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", render::status(&s));
            }
            Ok(())
        }
        Command::DeadLetters(cmd) => {
            let tables = cfg.tables()?;
            require_url(&cfg)?;
            let mut conn = store::connect(cfg.database_url())?;
            run_dead_letters(&mut conn, &tables, cmd)
        }
        Command::Replay(args) => {
            let tables = cfg.tables()?;
            require_url(&cfg)?;
            let mut conn = store::connect(cfg.database_url())?;
            outbox::Outbox::with_tables(tables.clone()).verify_schema(&mut conn)?;
            run_replay(&mut conn, &tables, args)
        }
        Command::Snapshot { table, chunk_size } => {
            let tables = cfg.tables()?;
            require_url(&cfg)?;
            let name = crate::cdc::parse_tables(table)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .pop()
                .ok_or_else(|| anyhow::anyhow!("name the table: schema.table"))?;
            if !(1..=100_000).contains(chunk_size) {
                anyhow::bail!("--chunk-size {chunk_size} is out of range: 1 to 100000");
            }
            let mut conn = store::connect(cfg.database_url())?;
            outbox::Outbox::with_tables(tables.clone()).verify_schema(&mut conn)?;
            store::stream::snapshot_plan(&mut conn, &name)?;
            let snapshots = tables
                .qualify(outbox::contract::Table::Snapshots)
                .to_string();
            store::stream::request_snapshot(&mut conn, &snapshots, &name, *chunk_size)?;
            println!(
                "snapshot of {name} requested ({chunk_size} rows per chunk); a streaming relay \
                 capturing it reads it now (outbox-relay status shows the progress)"
            );
            Ok(())
        }
        Command::Run(args) => {
            let cfg = args.apply(cfg)?;
            let relay = Relay::new(cfg.clone())?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run_relay(relay, cfg))
        }
    }
}

fn run_dead_letters(
    conn: &mut diesel::PgConnection,
    tables: &outbox::TableRef,
    cmd: &DeadLetterCommand,
) -> Result<()> {
    const TARGET: &str = "outbox::relay::dead_letters";
    let refuse_unfiltered = |filter: &dead_letters::Filter, all: bool| {
        if filter.is_empty() && !all {
            anyhow::bail!("no filter given: pass --all to act on every dead letter");
        }
        Ok(())
    };
    match cmd {
        DeadLetterCommand::List {
            filter,
            limit,
            json,
        } => {
            let rows = dead_letters::list(conn, tables, &filter.filter()?, *limit)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render::dead_letters(&rows));
            }
        }
        DeadLetterCommand::Show { id } => {
            let d = dead_letters::show(conn, tables, *id)?;
            println!("{}", serde_json::to_string_pretty(&d)?);
            match std::str::from_utf8(&d.payload) {
                Ok(text) => println!("payload ({} bytes):\n{text}", d.payload.len()),
                Err(_) => println!(
                    "payload ({} bytes, binary, hex):\n{}",
                    d.payload.len(),
                    hex(&d.payload)
                ),
            }
        }
        DeadLetterCommand::Retry {
            filter,
            dry_run,
            all,
        } => {
            let f = filter.filter()?;
            refuse_unfiltered(&f, *all)?;
            let ids = dead_letters::retry(conn, tables, &f, *dry_run)?;
            if *dry_run {
                println!(
                    "dry run: {} dead letters would move back to the outbox",
                    ids.len()
                );
            } else {
                tracing::info!(target: TARGET, count = ids.len(), filter = ?f, "dead letters retried");
                println!(
                    "{} dead letters moved back to the outbox under their original ids {:?}",
                    ids.len(),
                    ids
                );
            }
        }
        DeadLetterCommand::Purge {
            filter,
            dry_run,
            all,
            yes,
        } => {
            let f = filter.filter()?;
            refuse_unfiltered(&f, *all)?;
            let n = dead_letters::purge(conn, tables, &f, true)?;
            if *dry_run {
                println!("dry run: {n} dead letters would be deleted");
                return Ok(());
            }
            if !*yes && !confirm(&format!("delete {n} dead letters for good?"))? {
                anyhow::bail!("not confirmed: nothing deleted (pass --yes to skip the question)");
            }
            let n = dead_letters::purge(conn, tables, &f, false)?;
            tracing::info!(target: TARGET, count = n, filter = ?f, "dead letters purged");
            println!("{n} dead letters deleted");
        }
    }
    Ok(())
}

fn run_replay(
    conn: &mut diesel::PgConnection,
    tables: &outbox::TableRef,
    args: &ReplayArgs,
) -> Result<()> {
    const TARGET: &str = "outbox::relay::replay";
    let range = replay::Range {
        since: args.since,
        until: args.until,
        from_id: args.from_id,
        to_id: args.to_id,
        topic: args.topic.clone(),
        key: args.key.clone(),
    };
    if range.is_unbounded() && !args.all {
        anyhow::bail!(
            "no range given: pass --since/--until or --from-id/--to-id, or --all to replay \
             everything kept"
        );
    }
    let kept = replay::kept(conn, tables)?;
    if kept.events == 0 {
        anyhow::bail!(
            "nothing to replay: outbox_delivered is empty. The relay keeps delivered events only \
             when keep_delivered_hours (--keep-delivered-hours) is above 0, and only from then \
             on; events delivered before that were deleted"
        );
    }
    let counts = replay::count_by_topic(conn, tables, &range)?;
    let total: i64 = counts.iter().map(|c| c.events).sum();
    let span = format!(
        "kept: {} events, ids {}..={}, delivered {} to {}",
        kept.events,
        kept.min_id.unwrap_or_default(),
        kept.max_id.unwrap_or_default(),
        kept.oldest.map(|t| t.to_rfc3339()).unwrap_or_default(),
        kept.newest.map(|t| t.to_rfc3339()).unwrap_or_default(),
    );
    if args.dry_run {
        let rows: Vec<Vec<String>> = counts
            .iter()
            .map(|c| vec![c.topic.clone(), c.events.to_string()])
            .collect();
        if !rows.is_empty() {
            print!("{}", render::table(&["topic", "events"], &rows));
        }
        println!("dry run: {total} events would be re-published ({span})");
        return Ok(());
    }
    if total == 0 {
        anyhow::bail!("no kept event matches: nothing replayed ({span})");
    }
    let topics: Vec<String> = counts
        .iter()
        .map(|c| format!("{} ({})", c.topic, c.events))
        .collect();
    let question = format!(
        "re-publish {total} delivered events to {} with their original event ids?",
        topics.join(", ")
    );
    if !args.yes && !confirm(&question)? {
        anyhow::bail!("not confirmed: nothing replayed (pass --yes to skip the question)");
    }
    let r = replay::replay(conn, tables, &range)?;
    tracing::info!(target: TARGET, matched = r.matched, queued = r.queued, range = ?range, "delivered events replayed");
    println!(
        "{} events queued in the outbox again, in their original order ({} still pending there \
         were skipped); the relay re-publishes them",
        r.queued,
        r.matched.saturating_sub(r.queued)
    );
    Ok(())
}

fn confirm(question: &str) -> Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    print!("{question} type yes to confirm: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn require_url(cfg: &RelayConfig) -> Result<()> {
    if cfg.database_url().trim().is_empty() {
        anyhow::bail!("no database: set DATABASE_URL or --database-url");
    }
    Ok(())
}

async fn run_relay(relay: Relay, cfg: RelayConfig) -> Result<()> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    outbox::shutdown::cancel_on_signals(&shutdown, &tasks)?;
    if let Some(addr) = cfg.metrics_addr {
        let handle = metrics::install()?;
        metrics::serve(addr, handle, shutdown.clone(), &tasks).await?;
        metrics::spawn_backlog_poller(
            cfg.database_url().to_owned(),
            store::application_name(relay.instance_id()),
            cfg.tables()?,
            (cfg.capture == crate::CaptureMode::Streaming).then(|| cfg.slot_name()),
            Duration::from_secs(5),
            shutdown.clone(),
            &tasks,
        );
    }
    let result = relay.run(shutdown.clone()).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every setting with a flag has it, with its environment variable: the global ones on
    /// every command, the others on `run` (made from the table, so this guards the global ones
    /// written by hand above).
    #[test]
    fn every_setting_has_its_flag_and_variable() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run").clone();
        for s in SETTINGS {
            let Some(flag) = s.flag() else { continue };
            let cmd = if s.scope == Scope::Global { &cli } else { &run };
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long().map(|l| format!("--{l}")) == Some(flag.clone()))
                .unwrap_or_else(|| panic!("{flag} missing"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(s.env),
                "{flag}"
            );
        }
    }

    #[test]
    fn a_run_flag_is_checked_as_its_setting_parses() {
        let err = Cli::try_parse_from(["outbox-relay", "run", "--lease-ms", "soon"]).unwrap_err();
        assert!(err.to_string().contains("milliseconds"), "{err}");
        let cli = Cli::try_parse_from([
            "outbox-relay",
            "run",
            "--lease-ms",
            "7000",
            "--allow-superuser",
            "--poison-policy",
            "hold-key",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let cfg = args
            .apply(RelayConfig::new("postgres://x", "k:9092"))
            .unwrap();
        assert_eq!(cfg.lease.as_ms(), 7000);
        assert!(cfg.allow_superuser);
        assert_eq!(cfg.poison_policy, crate::PoisonPolicy::HoldKey);
    }
}
