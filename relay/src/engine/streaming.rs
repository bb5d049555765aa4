//! Streaming capture: the outbox's events read from the write-ahead log through a logical
//! replication slot (pgoutput, `messages 'true'`, binary tuples), in commit order, as they
//! commit. Two kinds of events come in: rows inserted into the outbox table (the publication,
//! INSERT only) and tableless events, transactional logical messages with the outbox's prefix
//! written by `outbox_emit` (format v1, docs/TABLES.md).
//!
//! **Position.** Everything read stays in [`Log`] until it is settled (acknowledged and, for a
//! table row, removed; or dead-lettered). The slot's confirmed position moves only past a
//! commit whose events are all settled, and past a heartbeat behind which nothing is
//! unsettled: a relay killed at any point resumes where nothing unsettled lies behind, so it
//! loses nothing (it may send again what was acknowledged after the last confirmation).
//!
//! **Fencing.** A term streams the slot only after taking the lease, and first ends whatever
//! walsender streams it (a paused ex-leader's) with a fenced statement. The replication
//! connection sets `wal_sender_timeout` to the lease, so a leader that stops answering is cut
//! off by the server too. What an ex-leader can still send the server before its connection
//! dies is a confirmation of what it had itself settled: that never skips an event.
//!
//! May call: the [`Session`] (fenced statements), `store::stream`, pg_walstream.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use pg_walstream::{
    CancellationToken as StreamCancel, ChangeEvent, ColumnValue, EventType,
    LogicalReplicationStream, ReplicationStreamConfig, RetryConfig, RowData, SharedLsnFeedback,
    StreamingMode,
};
use serde::Deserialize;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::cdc;
use crate::store::{self, Fetched};
use crate::{Error, Result};

use super::capture::{Capture, Open, Opened};
use super::session::Session;
use super::TARGET;

/// What streaming capture needs to know (from the relay's configuration).
#[derive(Debug, Clone)]
pub(crate) struct StreamSettings {
    /// The database URL (the replication connection adds its own parameters).
    pub url: String,
    /// `application_name` of the replication connection.
    pub application_name: String,
    pub slot: String,
    pub publication: String,
    /// Tables whose row changes are captured (empty: none), their publication and topic pattern.
    pub capture_tables: Vec<crate::cdc::TableName>,
    pub capture_publication: String,
    pub capture_topic: String,
    /// The snapshot requests table, qualified.
    pub snapshots_table: String,
    /// Which columns the captured tables' events carry, and their keys.
    pub capture_columns: cdc::Columns,
    /// The outbox table's schema (`None`: the first `outbox` the stream shows, i.e. the one the
    /// publication names) and name.
    pub schema: Option<String>,
    /// Largest event sent (as `max_event_bytes`); larger ones are dead-lettered.
    pub max_event_bytes: usize,
    /// Bytes of payload per page (at least one event).
    pub page_bytes: usize,
    /// The walsender ends a connection silent this long (the lease).
    pub wal_sender_timeout: Duration,
    /// Longest wait for the next event before the engine's loop comes round again (also the
    /// longest time one batch is read for).
    pub wait: Duration,
    /// Most changes read into one batch.
    pub batch_events: usize,
    /// Rows re-read from transactions an earlier term may have delivered are checked against
    /// the outbox before they are sent again (`false` only in a test's broken variant).
    pub skip_removed: bool,
}

/// Heartbeat after this long without a change from the stream: an idle relay confirms its
/// position (see [`Streaming::fill`]).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A transaction's changes stop arriving this long: nudge the reader (see [`Streaming::fill`]).
const STALLED_IN_TRANSACTION: Duration = Duration::from_millis(200);
/// Events read and not yet settled, at most: past it, reading waits (the server keeps the WAL).
const LOG_MAX_EVENTS: usize = 200_000;
/// Payload bytes read and not yet settled, at most.
const LOG_MAX_BYTES: usize = 512 << 20;
/// Entries of the log at most (settled ones behind an unsettled one included: one waiting key
/// keeps every later entry until it is settled).
const LOG_MAX_ENTRIES: usize = 2_000_000;
/// Changes buffered between the replication connection and the log.
const CHANNEL: usize = 8192;
/// How long a new term retries starting the stream while the ended walsender lets go of the slot.
const SLOT_BUSY_FOR: Duration = Duration::from_secs(10);

/// A batch: the log's entries `from..=to` (by sequence number). `from > to`: empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StreamBatch {
    from: i64,
    to: i64,
}

/// Where the first page of a batch starts (the engine passes it back to [`Capture::page`]).
const BATCH_START: i64 = i64::MIN;

enum Entry {
    /// An event not settled yet.
    Event { fetched: Box<Fetched> },
    /// A settled event (its payload dropped): only its id is kept, until the front passes it.
    Settled(i64),
    /// A position the slot may be confirmed at once everything before it is settled: the end
    /// of a commit, or a heartbeat.
    Mark(u64),
}

/// The events read from the stream and not yet behind the confirmed position.
#[derive(Default)]
struct Log {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    front: i64,
    /// Sequence number of each event in `entries`, by id.
    seq_of: HashMap<i64, i64>,
    unsettled: usize,
    unsettled_bytes: usize,
    /// The position given to the server as flushed.
    confirmed: u64,
}

impl Log {
    fn next_seq(&self) -> i64 {
        self.front + i64::try_from(self.entries.len()).unwrap_or(i64::MAX)
    }

    /// Appends an entry. The same event read twice in one term (the same id and event id)
    /// is kept once; another event under an id still unsettled here is refused (the ids of one
    /// outbox are unique).
    fn push(&mut self, entry: Entry) -> std::result::Result<(), String> {
        match entry {
            Entry::Event { fetched, .. } => {
                let id = fetched.id;
                if let Some(Entry::Event { fetched: old, .. }) = self.get(id) {
                    if old.event_id == fetched.event_id {
                        return Ok(());
                    }
                    return Err(format!(
                        "two events with outbox id {id} in the stream (event ids {} and {})",
                        old.event_id, fetched.event_id
                    ));
                }
                self.seq_of.insert(id, self.next_seq());
                self.unsettled += 1;
                self.unsettled_bytes += fetched.payload.len();
                self.entries.push_back(Entry::Event { fetched });
            }
            Entry::Mark(lsn) => match self.entries.back_mut() {
                // Consecutive positions: the later one stands for both.
                Some(Entry::Mark(last)) => *last = (*last).max(lsn),
                _ => self.entries.push_back(Entry::Mark(lsn)),
            },
            Entry::Settled(_) => self.entries.push_back(entry),
        }
        Ok(())
    }

    /// The entry of event `id`, if it is in the log.
    fn get(&self, id: i64) -> Option<&Entry> {
        let seq = self.seq_of.get(&id)?;
        usize::try_from(seq - self.front)
            .ok()
            .and_then(|i| self.entries.get(i))
    }

    fn full(&self) -> bool {
        self.unsettled >= LOG_MAX_EVENTS
            || self.unsettled_bytes >= LOG_MAX_BYTES
            || self.entries.len() >= LOG_MAX_ENTRIES
    }

    fn settle(&mut self, ids: impl IntoIterator<Item = i64>) {
        for id in ids {
            let Some(seq) = self.seq_of.get(&id) else {
                continue;
            };
            let Some(entry) = usize::try_from(seq - self.front)
                .ok()
                .and_then(|i| self.entries.get_mut(i))
            else {
                continue;
            };
            if let Entry::Event { fetched, .. } = entry {
                self.unsettled -= 1;
                self.unsettled_bytes -= fetched.payload.len();
                *entry = Entry::Settled(id);
            }
        }
    }

    /// Drops the settled entries at the front; returns the position now safe to confirm, if it
    /// moved.
    fn advance(&mut self) -> Option<u64> {
        let before = self.confirmed;
        while let Some(front) = self.entries.front() {
            match front {
                Entry::Event { .. } => break,
                Entry::Settled(id) => {
                    if self.seq_of.get(id) == Some(&self.front) {
                        self.seq_of.remove(id);
                    }
                }
                Entry::Mark(lsn) => self.confirmed = self.confirmed.max(*lsn),
            }
            self.entries.pop_front();
            self.front += 1;
        }
        (self.confirmed > before).then_some(self.confirmed)
    }

    /// The unsettled events of `batch` from `after_id` on: at most `limit`, and at most
    /// `page_bytes` of payload (the first one past it is returned marked `over_budget`, as the
    /// polling fetch does, so the engine starts the next page at it).
    fn page(
        &self,
        batch: StreamBatch,
        after_id: i64,
        limit: usize,
        page_bytes: usize,
    ) -> Vec<Fetched> {
        let start = if after_id == BATCH_START {
            batch.from
        } else {
            self.seq_of.get(&after_id).map_or(batch.from, |s| s + 1)
        }
        .max(self.front);
        let mut page = Vec::new();
        let mut bytes = 0_usize;
        let mut seq = start;
        while seq <= batch.to && page.len() < limit {
            let Some(entry) = usize::try_from(seq - self.front)
                .ok()
                .and_then(|i| self.entries.get(i))
            else {
                break;
            };
            seq += 1;
            let Entry::Event { fetched, .. } = entry else {
                continue;
            };
            let mut row = Fetched::clone(fetched);
            if !page.is_empty() && bytes + row.payload.len() > page_bytes {
                row.over_budget = true;
                page.push(row);
                break;
            }
            bytes += row.payload.len();
            page.push(row);
        }
        page
    }
}

/// The replication connection of one term, read by its own task into a channel (reads are
/// then cancel-safe for the engine), with the feedback the connection sends the server.
struct Reader {
    changes: mpsc::Receiver<std::result::Result<ChangeEvent, String>>,
    feedback: std::sync::Arc<SharedLsnFeedback>,
    stop: StreamCancel,
    task: JoinHandle<()>,
}

struct State {
    reader: Option<Reader>,
    log: Log,
    /// Inside a transaction of the stream (between its Begin and its Commit).
    in_tx: bool,
    /// Rows a removal missed although their transaction was visible: tried once more, then
    /// taken as removed before (e.g. by a previous leader).
    retried: std::collections::HashSet<i64>,
    /// The schema of the outbox table (resolved at connect): rows of another schema's `outbox`
    /// that the publication may carry are not this outbox's.
    table_schema: String,
    /// The tableless prefix and the heartbeat prefix.
    prefix: String,
    heartbeat: String,
    last_change: Instant,
    /// Change capture: the captured relations the stream described, by relation id; the
    /// database's non-built-in types; the transaction being read (from its Begin).
    relations: HashMap<u32, Option<cdc::Relation>>,
    types: cdc::Types,
    tx: Option<cdc::TxInfo>,
    /// The snapshot being read, if any (see [`Streaming::snapshot_step`]).
    snap: Snap,
    /// The captured tables' oids when the term began: a Relation message naming one of them
    /// under a name not captured is a rename.
    captured_oids: HashMap<u32, cdc::TableName>,
    /// Names the stream used for a captured table (before a rename the configuration already
    /// follows), by the configured name they stand for: a TRUNCATE names tables so.
    aliases: HashMap<cdc::TableName, cdc::TableName>,
    /// The name the stream last gave each relation this term.
    streamed_names: HashMap<u32, cdc::TableName>,
    /// Change events and snapshot rows given a log id so far this term.
    change_ids: u64,
    /// Each captured table's default key and whether its identity is FULL (at connect).
    table_keys: HashMap<cdc::TableName, (bool, Vec<String>)>,
    /// The place of the next change event in the transaction being read.
    tx_seq: u64,
    /// The server's flush position when this term's stream began: a transaction that committed
    /// before it may have been delivered (and its rows removed) by an earlier term, whose
    /// confirmation the slot did not keep (the server persists a slot's confirmed position
    /// only now and then: after a crash it can go back minutes).
    catchup_lsn: u64,
    /// Outbox rows read from such transactions, checked against the table before they are
    /// paged (see [`Streaming::skip_removed`]).
    recheck: Vec<i64>,
    /// Rows skipped so by this term (logged once the catch-up is over).
    skipped: u64,
}

/// A snapshot of a captured table, read in chunks between watermarks (the DBLog method): a
/// low watermark message, the chunk's rows read by key, a high watermark message. A change of
/// the table the stream shows between the two watermarks is newer than the chunk's row of its
/// key, which is then left out; the other rows are put into the log at the high watermark, as
/// `read` events. A chunk's progress is saved once the slot is confirmed past its high
/// watermark (its events delivered), so a relay killed mid-snapshot resumes after the last
/// delivered chunk.
#[derive(Default)]
struct Snap {
    request: Option<store::stream::SnapshotRequest>,
    plan: Option<(store::stream::SnapshotPlan, cdc::Relation)>,
    phase: SnapPhase,
    /// When the requests were last read (at most once a second while none is open).
    checked: Option<Instant>,
    /// Names this term's watermarks (a replayed watermark of an earlier term is not ours).
    nonce: String,
    chunk: u64,
    /// Captured changes whose transaction may not be visible yet, `(xid, table, key)`: the
    /// stream can show a commit before new snapshots see it (its commit record is written
    /// first; with a synchronous standby, until the standby answered). A chunk read in a
    /// snapshot that does not see one of them leaves its key out. Kept until a snapshot of the
    /// server sees the transaction (checked every [`PRUNE_EVERY`]).
    recent: VecDeque<(u32, String, String)>,
    pruned: Option<Instant>,
}

/// How often [`Snap::recent`] is pruned of transactions every new snapshot sees.
const PRUNE_EVERY: Duration = Duration::from_millis(200);
/// Most entries of [`Snap::recent`]; past it the oldest go (with a warning).
const RECENT_MAX: usize = 1_000_000;

#[derive(Default)]
enum SnapPhase {
    /// No chunk open: read the next one.
    #[default]
    Idle,
    /// A chunk read, its watermarks not yet both seen in the stream.
    Reading {
        marker: String,
        rows: Vec<RowData>,
        last_key: Option<Vec<String>>,
        finished: bool,
        /// The keys of the table changed since the chunk began to be read (in the stream's
        /// order: from before its low watermark).
        window: Option<std::collections::HashSet<String>>,
        /// The snapshot the rows were read in.
        snapshot: Option<String>,
    },
    /// A chunk's events in the log: saved once the slot is confirmed past `high`.
    Delivering {
        high: u64,
        last_key: Option<Vec<String>>,
        rows: i64,
        finished: bool,
    },
}

/// Streaming capture (see the module docs). One per leader term.
pub(super) struct Streaming {
    settings: StreamSettings,
    state: Mutex<State>,
}

impl Streaming {
    pub(super) fn new(settings: StreamSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State {
                reader: None,
                log: Log::default(),
                in_tx: false,
                retried: std::collections::HashSet::new(),
                table_schema: String::new(),
                prefix: String::new(),
                heartbeat: String::new(),
                last_change: Instant::now(),
                relations: HashMap::new(),
                types: cdc::Types::default(),
                tx: None,
                snap: Snap {
                    nonce: uuid::Uuid::new_v4().simple().to_string(),
                    ..Snap::default()
                },
                captured_oids: HashMap::new(),
                aliases: HashMap::new(),
                streamed_names: HashMap::new(),
                change_ids: 0,
                tx_seq: 0,
                table_keys: HashMap::new(),
                catchup_lsn: 0,
                recheck: Vec::new(),
                skipped: 0,
            }),
        }
    }

    /// Checks the slot, fences its walsender and starts streaming from its confirmed position.
    async fn connect(&self, st: &mut State, session: &mut Session<'_>) -> Result<()> {
        let s = self.settings.clone();
        let (prefix, table_schema, info, types) = session
            .call(move |c, sql, lease| {
                store::stream::check_replication_role(c)?;
                let info = store::stream::usable_slot(c, &s.slot)?;
                let tables = match &s.schema {
                    Some(schema) => outbox::TableRef::in_schema(schema)?,
                    None => outbox::TableRef::default(),
                };
                let table_schema = store::stream::check_publication(c, &tables, &s.publication)?;
                let prefix = store::stream::message_prefix(c, &tables)?;
                let (types, oids) = if s.capture_tables.is_empty() {
                    (Vec::new(), (Vec::new(), Vec::new()))
                } else {
                    let oids = store::stream::check_captured_tables(
                        c,
                        &s.capture_tables,
                        &s.capture_publication,
                    )?;
                    store::stream::check_capture_columns(c, &s.capture_columns)?;
                    let keys = store::stream::table_keys(c, &s.capture_tables)?;
                    (store::stream::user_types(c)?, (oids, keys))
                };
                store::stream::terminate_walsender(c, sql, lease, &s.slot)?;
                // After the old walsender ended: whatever an earlier term delivered committed
                // before this position.
                let flushed = store::stream::flush_lsn(c)?;
                Ok((prefix, table_schema, info, (types, oids, flushed)))
            })
            .await?;
        let (types, (oids, keys), flushed) = types;
        st.catchup_lsn = flushed;
        st.recheck.clear();
        st.skipped = 0;
        st.captured_oids = oids
            .into_iter()
            .zip(self.settings.capture_tables.iter().cloned())
            .collect();
        st.aliases.clear();
        st.table_keys = keys
            .into_iter()
            .map(|(t, full, k)| (t, (full, k)))
            .collect();
        st.types = cdc::Types {
            kinds: types
                .into_iter()
                .map(|(oid, kind, base)| {
                    let k = match kind.as_str() {
                        "e" => cdc::TypeKind::Enum,
                        "d" => cdc::TypeKind::Domain(base),
                        _ => cdc::TypeKind::Array(base),
                    };
                    (oid, k)
                })
                .collect(),
        };
        st.relations.clear();
        st.tx = None;
        st.table_schema = table_schema;
        tracing::info!(target: TARGET, slot = %self.settings.slot, confirmed = ?info.confirmed_flush_lsn, retained_bytes = ?info.retained_bytes, "streaming from the slot's confirmed position");
        st.heartbeat = format!("{prefix}:heartbeat");
        st.prefix = prefix;
        let started = Instant::now();
        let stream = loop {
            match self.start_stream().await {
                Ok(stream) => break stream,
                // The ended walsender may hold the slot a moment longer.
                Err(e)
                    if e.to_string().contains("is active for PID")
                        && started.elapsed() < SLOT_BUSY_FOR =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    session.renew_if_due().await?;
                }
                Err(e) => return Err(e),
            }
        };
        let feedback = std::sync::Arc::clone(&stream.shared_lsn_feedback);
        let (tx, rx) = mpsc::channel(CHANNEL);
        let stop = StreamCancel::new();
        let task = tokio::spawn(read_stream(stream, tx, stop.clone()));
        st.reader = Some(Reader {
            changes: rx,
            feedback,
            stop,
            task,
        });
        st.last_change = Instant::now();
        Ok(())
    }

    async fn start_stream(&self) -> Result<LogicalReplicationStream> {
        let s = &self.settings;
        // Several publications go as one quoted list: `a","b` becomes '"a","b"'.
        let publications = if s.capture_tables.is_empty() {
            s.publication.clone()
        } else {
            format!("{}\",\"{}", s.publication, s.capture_publication)
        };
        let config = ReplicationStreamConfig::new(
            s.slot.clone(),
            publications,
            1,
            StreamingMode::Off,
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(3600),
            RetryConfig::default(),
        )
        .with_messages(true)
        .with_binary(true)
        .with_existing_slot_required(true);
        let conninfo = replication_conninfo(&s.url, &s.application_name, s.wal_sender_timeout);
        let mut stream = LogicalReplicationStream::new(&conninfo, config)
            .await
            .map_err(|e| stream_error(&e, &s.url))?;
        stream
            .start(None)
            .await
            .map_err(|e| stream_error(&e, &s.url))?;
        Ok(stream)
    }

    /// Reads what the stream has: waits up to `wait` for the first change, then takes what is
    /// already there, up to the log's bounds.
    async fn fill(&self, st: &mut State, session: &mut Session<'_>, wait: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut waited = false;
        let mut taken = 0_usize;
        loop {
            // A batch is what arrived by now, bounded: reading a large transaction whole
            // would keep the engine from renewing its lease.
            if taken >= self.settings.batch_events
                || (taken > 0 && tokio::time::Instant::now() >= deadline)
            {
                return Ok(());
            }
            if st.log.full() {
                if !waited {
                    // Nothing more is read until something settles (the server keeps the WAL);
                    // the engine comes round again after this pause, not in a busy loop.
                    tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
                }
                return Ok(());
            }
            let Some(reader) = st.reader.as_mut() else {
                return Err(Error::Stream("not streaming".into()));
            };
            let change = match reader.changes.try_recv() {
                Ok(c) => c,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(Error::Stream("the replication connection ended".into()))
                }
                // What arrived is the batch: it waits for the first change, and for the rest
                // of a transaction already begun, not for more.
                Err(mpsc::error::TryRecvError::Empty) if taken > 0 && !st.in_tx => return Ok(()),
                Err(mpsc::error::TryRecvError::Empty) => {
                    waited = true;
                    // A heartbeat lets an idle relay confirm its position (every
                    // HEARTBEAT_EVERY), and nudges a transaction whose changes stopped
                    // arriving (soon). The nudge was a workaround for the copy loop's stall on
                    // large messages (fixed in vendor/pg_walstream); it stays as a cheap guard
                    // against a reader waiting for an edge that does not come.
                    let nudge = if st.in_tx {
                        STALLED_IN_TRANSACTION
                    } else {
                        HEARTBEAT_EVERY
                    };
                    if st.last_change.elapsed() >= nudge {
                        let prefix = st.heartbeat.clone();
                        tracing::debug!(target: TARGET, in_transaction = st.in_tx, "heartbeat");
                        session
                            .call(move |c, _, _| store::stream::emit_heartbeat(c, &prefix))
                            .await?;
                        st.last_change = Instant::now();
                    }
                    let Some(reader) = st.reader.as_mut() else {
                        return Err(Error::Stream("not streaming".into()));
                    };
                    match tokio::time::timeout_at(deadline, reader.changes.recv()).await {
                        Ok(Some(c)) => c,
                        Ok(None) => {
                            return Err(Error::Stream("the replication connection ended".into()))
                        }
                        Err(_) => return Ok(()),
                    }
                }
            };
            let change = change.map_err(Error::Stream)?;
            self.ingest(st, change)?;
            taken += 1;
        }
    }

    fn ingest(&self, st: &mut State, change: ChangeEvent) -> Result<()> {
        st.last_change = Instant::now();
        let lsn = change.lsn.value();
        match change.event_type {
            EventType::Begin {
                transaction_id,
                final_lsn,
                commit_timestamp,
            } => {
                st.in_tx = true;
                st.tx_seq = 0;
                st.tx = Some(cdc::TxInfo {
                    xid: transaction_id,
                    commit_lsn: final_lsn.value(),
                    commit_time: commit_timestamp,
                });
            }
            EventType::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                let streamed = cdc::TableName {
                    schema: namespace.to_string(),
                    table: relation_name.to_string(),
                };
                // By the oid a captured name had when the term began (changes from before a
                // rename the configuration already follows are the configured table's: its
                // key, columns and topic), or by name.
                let configured = st.captured_oids.get(&relation_id).cloned();
                let captured =
                    configured.is_some() || self.settings.capture_tables.contains(&streamed);
                if let Some(c) = &configured {
                    if *c != streamed {
                        st.aliases.insert(streamed.clone(), c.clone());
                    }
                }
                let name = configured.unwrap_or_else(|| streamed.clone());
                // Renamed while streamed: the stream named it otherwise before in this term, and
                // the new name is not the configured one.
                let before = st.streamed_names.insert(relation_id, streamed.clone());
                let renamed = captured
                    && before.as_ref().is_some_and(|b| *b != streamed)
                    && streamed != name
                    && !self.settings.capture_tables.contains(&streamed);
                if renamed {
                    let was = before.map_or_else(String::new, |r| r.to_string());
                    return Err(Error::Config(format!(
                        "{was} was renamed to {streamed}: its changes are no longer captured. Add \
                         {streamed} to capture_tables (and to the publication) to go on"
                    )));
                }
                let rel = captured.then(|| {
                    self.shape(
                        &st.table_keys,
                        cdc::Relation {
                            full_identity: false,
                            name,
                            columns: columns
                                .iter()
                                .map(|c| cdc::Column {
                                    name: c.name.to_string(),
                                    type_oid: c.type_id,
                                    is_key: c.is_key,
                                })
                                .collect(),
                        },
                    )
                });
                st.relations.insert(relation_id, rel);
            }
            EventType::Insert {
                relation_oid,
                ref data,
                ..
            } if self.captured(st, relation_oid) => {
                self.push_changes(st, relation_oid, lsn, &cdc::Change::Insert { new: data })?;
            }
            EventType::Update {
                relation_oid,
                ref old_data,
                ref new_data,
                ..
            } if self.captured(st, relation_oid) => {
                let change = cdc::Change::Update {
                    old: old_data.as_ref(),
                    new: new_data,
                };
                self.push_changes(st, relation_oid, lsn, &change)?;
            }
            EventType::Delete {
                relation_oid,
                ref old_data,
                ..
            } if self.captured(st, relation_oid) => {
                self.push_changes(
                    st,
                    relation_oid,
                    lsn,
                    &cdc::Change::Delete { old: old_data },
                )?;
            }
            EventType::Truncate {
                ref tables,
                cascade,
                restart_identity,
            } if !self.settings.capture_tables.is_empty() => {
                let named: Vec<cdc::TableName> = tables
                    .iter()
                    .filter_map(|t| {
                        let (schema, table) = t.split_once('.')?;
                        let n = cdc::TableName {
                            schema: schema.to_owned(),
                            table: table.to_owned(),
                        };
                        let n = st.aliases.get(&n).cloned().unwrap_or(n);
                        self.settings.capture_tables.contains(&n).then_some(n)
                    })
                    .collect();
                // A TRUNCATE of the table a snapshot chunk is being read from: the chunk's
                // rows were read before it and must not come back after it.
                if let (Some(req), SnapPhase::Reading { rows, .. }) =
                    (&st.snap.request, &mut st.snap.phase)
                {
                    if named.iter().any(|t| t.to_string() == req.table) {
                        rows.clear();
                    }
                }
                if !named.is_empty() {
                    let tx = Self::tx_of(st)?;
                    let mut seq = st.tx_seq;
                    let events = cdc::truncate_events(
                        &self.cdc_ctx(st),
                        &named,
                        tx,
                        lsn,
                        &mut seq,
                        cascade,
                        restart_identity,
                    );
                    st.tx_seq = seq;
                    self.push_events(st, events)?;
                }
            }
            EventType::Commit { end_lsn, .. } => {
                st.in_tx = false;
                st.tx = None;
                st.log
                    .push(Entry::Mark(end_lsn.value()))
                    .map_err(Error::Stream)?;
            }
            EventType::Insert {
                schema,
                table,
                data,
                ..
            } if &*table == "outbox" && *schema == *st.table_schema => {
                let fetched = self.checked(decode_row(&data).map_err(Error::Stream)?);
                if self.settings.skip_removed
                    && st
                        .tx
                        .as_ref()
                        .is_some_and(|t| t.commit_lsn < st.catchup_lsn)
                {
                    st.recheck.push(fetched.id);
                }
                st.log
                    .push(Entry::Event {
                        fetched: Box::new(fetched),
                    })
                    .map_err(Error::Stream)?;
            }
            EventType::Message {
                flags,
                message_lsn,
                prefix,
                content,
            } => {
                if flags & 1 == 1 && *prefix == *st.prefix {
                    let fetched = self.checked(decode_message(message_lsn.value(), &content));
                    st.log
                        .push(Entry::Event {
                            fetched: Box::new(fetched),
                        })
                        .map_err(Error::Stream)?;
                } else if flags & 1 == 0
                    && prefix.ends_with(":snapshot")
                    && *prefix == *self.snapshot_prefix(st)
                {
                    self.on_watermark(st, message_lsn.value(), &content)?;
                } else if flags & 1 == 0 && *prefix == *st.heartbeat && !st.in_tx {
                    st.log
                        .push(Entry::Mark(message_lsn.value()))
                        .map_err(Error::Stream)?;
                }
            }
            EventType::StreamStart { .. }
            | EventType::BeginPrepare { .. }
            | EventType::Prepare { .. } => {
                return Err(Error::Stream(
                    "the server sent a streamed or prepared transaction, which this relay does not request".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether `relation` is a captured table (the stream described it before its changes).
    fn captured(&self, st: &State, relation: u32) -> bool {
        !self.settings.capture_tables.is_empty()
            && matches!(st.relations.get(&relation), Some(Some(_)))
    }

    fn cdc_ctx<'a>(&'a self, st: &'a State) -> cdc::Ctx<'a> {
        cdc::Ctx {
            slot: &self.settings.slot,
            topic_pattern: &self.settings.capture_topic,
            types: &st.types,
        }
    }

    fn tx_of(st: &State) -> Result<cdc::TxInfo> {
        st.tx
            .ok_or_else(|| Error::Stream("a change arrived outside a transaction".into()))
    }

    /// The events of one change of a captured table, into the log.
    fn push_changes(
        &self,
        st: &mut State,
        relation: u32,
        lsn: u64,
        change: &cdc::Change<'_>,
    ) -> Result<()> {
        let tx = Self::tx_of(st)?;
        let mut seq = st.tx_seq;
        let (events, table) = match st.relations.get(&relation) {
            Some(Some(rel)) => (
                cdc::change_events(&self.cdc_ctx(st), rel, tx, lsn, &mut seq, change),
                rel.name.to_string(),
            ),
            _ => return Ok(()),
        };
        st.tx_seq = seq;
        if st.snap.request.as_ref().is_some_and(|r| r.table == table) {
            if let SnapPhase::Reading {
                window: Some(changed),
                ..
            } = &mut st.snap.phase
            {
                changed.extend(events.iter().map(|e| e.partition_key.clone()));
            }
        }
        if st.snap.recent.len() + events.len() > RECENT_MAX {
            tracing::warn!(target: TARGET, "more than {RECENT_MAX} captured changes not yet visible to new snapshots; forgetting the oldest (a snapshot chunk read now could miss one of their keys)");
            let drop = (st.snap.recent.len() + events.len()).saturating_sub(RECENT_MAX);
            st.snap.recent.drain(..drop.min(st.snap.recent.len()));
        }
        st.snap.recent.extend(
            events
                .iter()
                .map(|e| (tx.xid, table.clone(), e.partition_key.clone())),
        );
        self.push_events(st, events)
    }

    /// Change events or snapshot rows into the log, each with the term's next log id.
    fn push_events(&self, st: &mut State, events: Vec<Fetched>) -> Result<()> {
        for mut fetched in events {
            fetched.event.id = cdc::change_log_id(st.change_ids);
            st.change_ids += 1;
            let fetched = self.checked(fetched);
            st.log
                .push(Entry::Event {
                    fetched: Box::new(fetched),
                })
                .map_err(Error::Stream)?;
        }
        Ok(())
    }

    /// A captured relation as its events carry it: the table's key and identity from the
    /// catalog (the stream's own key flags mark every column under FULL), then the configured
    /// columns and key.
    fn shape(
        &self,
        keys: &HashMap<cdc::TableName, (bool, Vec<String>)>,
        rel: cdc::Relation,
    ) -> cdc::Relation {
        let rel = match keys.get(&rel.name) {
            Some((full, key)) => cdc::with_key(rel, *full, key),
            None => rel,
        };
        match self.settings.capture_columns.get(&rel.name) {
            Some(o) => o.shape(rel),
            None => rel,
        }
    }

    /// The relation a snapshot's rows are read as: the plan's columns, shaped as the stream's.
    fn plan_relation(
        &self,
        keys: &HashMap<cdc::TableName, (bool, Vec<String>)>,
        name: cdc::TableName,
        plan: &store::stream::SnapshotPlan,
    ) -> cdc::Relation {
        self.shape(
            keys,
            cdc::Relation {
                full_identity: false,
                name,
                columns: plan
                    .columns
                    .iter()
                    .map(|(n, oid, _, _, key)| cdc::Column {
                        name: n.clone(),
                        type_oid: *oid,
                        is_key: key.is_some(),
                    })
                    .collect(),
            },
        )
    }

    fn snapshot_prefix(&self, st: &State) -> String {
        format!("{}:snapshot", st.prefix)
    }

    /// A watermark of the open chunk: the low one opens its window, the high one puts the
    /// chunk's rows (those no change in the window named) into the log.
    fn on_watermark(&self, st: &mut State, lsn: u64, content: &[u8]) -> Result<()> {
        let text = String::from_utf8_lossy(content);
        let Some((what, marker)) = text.split_once(':') else {
            return Ok(());
        };
        let SnapPhase::Reading {
            marker: ours,
            window,
            ..
        } = &mut st.snap.phase
        else {
            return Ok(());
        };
        if marker != ours.as_str() {
            return Ok(());
        }
        match what {
            // The window opened when the chunk began to be read, before this point.
            "low" => {
                window.get_or_insert_with(std::collections::HashSet::new);
            }
            "high" => {
                let SnapPhase::Reading {
                    rows,
                    last_key,
                    finished,
                    window,
                    snapshot,
                    ..
                } = std::mem::take(&mut st.snap.phase)
                else {
                    return Ok(());
                };
                let Some(mut changed) = window else {
                    return Ok(());
                };
                if let (Some(snap), Some(req)) = (&snapshot, &st.snap.request) {
                    changed.extend(
                        st.snap
                            .recent
                            .iter()
                            .filter(|(xid, t, _)| *t == req.table && !cdc::committed_in(snap, *xid))
                            .map(|(_, _, k)| k.clone()),
                    );
                }
                let Some((_, rel)) = &st.snap.plan else {
                    return Ok(());
                };
                let events = cdc::snapshot_events(&self.cdc_ctx(st), rel, lsn, &rows, &changed);
                let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
                self.push_events(st, events)?;
                st.log.push(Entry::Mark(lsn)).map_err(Error::Stream)?;
                st.snap.phase = SnapPhase::Delivering {
                    high: lsn,
                    last_key,
                    rows: n,
                    finished,
                };
            }
            _ => {}
        }
        Ok(())
    }

    /// Moves the snapshot on: saves a delivered chunk, finds the next request, reads the next
    /// chunk between its watermarks. At most one chunk per call.
    async fn snapshot_step(&self, st: &mut State, session: &mut Session<'_>) -> Result<()> {
        if self.settings.capture_tables.is_empty() {
            return Ok(());
        }
        let snapshots = self.settings.snapshots_table.clone();
        // Not while a chunk is being read: a transaction its read could not see must stay
        // listed until its high watermark, even if it has become visible since.
        if !st.snap.recent.is_empty()
            && !matches!(st.snap.phase, SnapPhase::Reading { .. })
            && st.snap.pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY)
        {
            st.snap.pruned = Some(Instant::now());
            let snap = session
                .call(|c, _, _| store::stream::current_snapshot(c))
                .await?;
            st.snap
                .recent
                .retain(|(xid, _, _)| !cdc::committed_in(&snap, *xid));
        }
        if let SnapPhase::Delivering {
            high,
            last_key,
            rows,
            finished,
        } = &st.snap.phase
        {
            if st.log.confirmed < *high {
                return Ok(());
            }
            let (last_key, rows, finished) = (last_key.clone(), *rows, *finished);
            let Some(req) = st.snap.request.clone() else {
                st.snap.phase = SnapPhase::Idle;
                return Ok(());
            };
            let (s2, lk, r2) = (snapshots.clone(), last_key.clone(), req.clone());
            let saved = session
                .call(move |c, _, _| {
                    store::stream::save_snapshot_progress(
                        c,
                        &s2,
                        &r2,
                        lk.as_deref(),
                        rows,
                        finished,
                    )
                })
                .await?;
            st.snap.phase = SnapPhase::Idle;
            if !saved {
                tracing::info!(target: TARGET, table = %req.table, "snapshot asked for again: it starts over");
                st.snap.request = None;
                st.snap.plan = None;
                st.snap.checked = None;
                return Ok(());
            }
            tracing::info!(target: TARGET, table = %req.table, rows, finished, "snapshot chunk delivered");
            if finished {
                st.snap.request = None;
                st.snap.plan = None;
            } else if let Some(r) = st.snap.request.as_mut() {
                if last_key.is_some() {
                    r.last_key = last_key;
                }
            }
        }
        if !matches!(st.snap.phase, SnapPhase::Idle) {
            return Ok(());
        }
        if st.snap.request.is_none() {
            if st
                .snap
                .checked
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return Ok(());
            }
            st.snap.checked = Some(Instant::now());
            let (s2, tables) = (snapshots.clone(), self.settings.capture_tables.clone());
            let found = session
                .call(move |c, _, _| {
                    let Some(req) = store::stream::next_snapshot(c, &s2, &tables)? else {
                        return Ok(None);
                    };
                    let name = cdc::parse_tables(&req.table)
                        .map_err(Error::Config)?
                        .pop()
                        .ok_or_else(|| Error::Config(format!("snapshot of {:?}", req.table)))?;
                    match store::stream::snapshot_plan(c, &name) {
                        Ok(plan) => Ok(Some((req, name, plan))),
                        // A table that cannot be read in key order: the request is closed
                        // (rows_read stays as it was) rather than stop capture for good.
                        Err(Error::Config(why)) => {
                            tracing::error!(target: TARGET, table = %name, "snapshot not possible: {why}");
                            store::stream::save_snapshot_progress(c, &s2, &req, None, 0, true)?;
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    }
                })
                .await?;
            let Some((req, name, plan)) = found else {
                return Ok(());
            };
            tracing::info!(target: TARGET, table = %req.table, chunk_size = req.chunk_size, resume_after = ?req.last_key, "snapshot starts");
            let rel = self.plan_relation(&st.table_keys, name, &plan);
            st.snap.request = Some(req);
            st.snap.plan = Some((plan, rel));
        }
        let (Some(req), Some((_, rel))) = (st.snap.request.clone(), st.snap.plan.clone()) else {
            return Ok(());
        };
        let name = rel.name.clone();
        st.snap.chunk += 1;
        let marker = format!("{}:{}", st.snap.nonce, st.snap.chunk);
        let prefix = self.snapshot_prefix(st);
        let m2 = marker.clone();
        // The window opens now: every change the stream shows from here on is at least as
        // new as what the chunk reads.
        st.snap.phase = SnapPhase::Reading {
            marker: marker.clone(),
            rows: Vec::new(),
            last_key: None,
            finished: false,
            window: Some(std::collections::HashSet::new()),
            snapshot: None,
        };
        // The plan is read again for each chunk: a column added or dropped since the last
        // one is in (or out of) this one's rows.
        let chunk = session
            .call(move |c, _, _| {
                let plan = store::stream::snapshot_plan(c, &name)?;
                let chunk = store::stream::snapshot_chunk(
                    c,
                    &plan,
                    &prefix,
                    &m2,
                    req.last_key.as_deref(),
                    req.chunk_size,
                )?;
                Ok((plan, chunk))
            })
            .await;
        let (plan, chunk) = match chunk {
            Ok(c) => c,
            Err(e) => {
                st.snap.phase = SnapPhase::Idle;
                return Err(e);
            }
        };
        let rel = self.plan_relation(&st.table_keys, rel.name.clone(), &plan);
        st.snap.plan = Some((plan.clone(), rel));
        let rows = chunk.rows;
        let finished = rows.len() < usize::try_from(req.chunk_size).unwrap_or(usize::MAX);
        let last_key = rows.last().map(|(_, k)| k.clone());
        let names: Vec<std::sync::Arc<str>> = plan
            .columns
            .iter()
            .map(|c| std::sync::Arc::from(c.0.as_str()))
            .collect();
        let rows = rows
            .into_iter()
            .map(|(cols, _)| {
                let mut row = RowData::with_capacity(cols.len());
                for (name, v) in names.iter().zip(cols) {
                    row.push(
                        std::sync::Arc::clone(name),
                        match v {
                            Some(b) => ColumnValue::binary_bytes(bytes::Bytes::from(b)),
                            None => ColumnValue::Null,
                        },
                    );
                }
                row
            })
            .collect();
        if let SnapPhase::Reading {
            rows: r,
            last_key: l,
            finished: f,
            snapshot: s,
            ..
        } = &mut st.snap.phase
        {
            *r = rows;
            *l = last_key;
            *f = finished;
            *s = chunk.snapshot;
        }
        Ok(())
    }

    /// Marks an event the brokers would refuse as defective (dead-lettered at once).
    fn checked(&self, mut fetched: Fetched) -> Fetched {
        if fetched.defect.is_none() {
            let size = fetched.payload.len()
                + fetched.partition_key.len()
                + fetched.event_type.len()
                + fetched.content_type.len()
                + fetched
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            if size > self.settings.max_event_bytes {
                fetched.defect = Some(format!(
                    "event is {size} bytes, more than max_event_bytes ({})",
                    self.settings.max_event_bytes
                ));
            }
        }
        fetched
    }

    /// Settles, without sending them again, the re-read rows an earlier term already delivered
    /// or dead-lettered (gone from the outbox, their transaction visible). After a database
    /// crash the slot can resume minutes back; sending all of that again would be a storm of
    /// duplicates and a backlog the lag bound sees (the streaming soak's I6). A row still there
    /// is sent as usual (at-least-once).
    async fn skip_removed(st: &mut State, session: &mut Session<'_>) -> Result<()> {
        if st.recheck.is_empty() {
            if st.skipped > 0 {
                tracing::info!(target: TARGET, rows = st.skipped, "caught up: rows re-read from the slot that an earlier term had delivered were not sent again");
                st.skipped = 0;
            }
            return Ok(());
        }
        let mut ids = Vec::new();
        let mut event_ids = Vec::new();
        let mut tx_ids = Vec::new();
        for id in std::mem::take(&mut st.recheck) {
            if let Some(Entry::Event { fetched }) = st.log.get(id) {
                if id > 0 {
                    ids.push(id);
                    event_ids.push(fetched.event_id);
                    tx_ids.push(fetched.tx_id.to_string());
                }
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let table = format!("\"{}\".outbox", st.table_schema.replace('"', "\"\""));
        let gone = session
            .call(move |c, _, _| {
                store::stream::already_removed(c, &table, &ids, &event_ids, &tx_ids)
            })
            .await?;
        if !gone.is_empty() {
            tracing::debug!(target: TARGET, rows = gone.len(), "re-read rows already delivered by an earlier term: not sent again");
            st.skipped += gone.len() as u64;
            st.log.settle(gone);
        }
        Ok(())
    }

    /// Takes in what delivery settled and gives the server the position now safe to confirm.
    /// A row the removal did not find is settled only once its writing transaction is visible
    /// to new snapshots (it was removed before, e.g. by a previous leader); until then its
    /// removal is tried again (the stream can deliver a commit a moment before the commit is
    /// visible: a removal then deletes nothing, and confirming past the row would leave it in
    /// the table for good).
    async fn confirm(st: &mut State, session: &mut Session<'_>) -> Result<()> {
        st.log.settle(session.take_settled());
        let missed = session.take_missed();
        if !missed.is_empty() {
            let tx_of: Vec<(i64, String)> = missed
                .iter()
                .filter_map(|id| match st.log.get(*id) {
                    Some(Entry::Event { fetched }) => Some((*id, fetched.tx_id.to_string())),
                    _ => None,
                })
                .collect();
            let tx_ids: Vec<String> = tx_of.iter().map(|(_, t)| t.clone()).collect();
            let invisible: std::collections::HashSet<String> = session
                .call(move |c, _, _| store::not_yet_visible(c, &tx_ids))
                .await?
                .into_iter()
                .collect();
            type Rows = Vec<(i64, String)>;
            // Visibility only grows: a row whose transaction is visible now is seen by the next
            // removal if it still exists, so a row missed again after that is really gone.
            let retried = &mut st.retried;
            let (retry, gone): (Rows, Rows) = tx_of
                .into_iter()
                .partition(|(id, t)| invisible.contains(t) || retried.insert(*id));
            if !retry.is_empty() {
                tracing::debug!(target: TARGET, rows = retry.len(), "a removal missed rows (not visible yet); trying again");
            }
            session.remove_later(retry.into_iter().map(|(id, _)| id));
            for (id, _) in &gone {
                st.retried.remove(id);
            }
            st.log.settle(gone.into_iter().map(|(id, _)| id));
            st.log.settle(session.take_settled());
        }
        if let (Some(lsn), Some(reader)) = (st.log.advance(), st.reader.as_ref()) {
            reader.feedback.update_flushed_lsn(lsn);
            reader.feedback.update_applied_lsn(lsn);
            crate::metrics::stream_confirmed(lsn);
        }
        Ok(())
    }
}

impl Capture for Streaming {
    type Batch = StreamBatch;

    const PUSHES: bool = true;

    async fn open(
        &self,
        session: &mut Session<'_>,
        previous: Option<StreamBatch>,
        open: Open,
    ) -> Result<Opened<StreamBatch>> {
        let mut st = self.state.lock().await;
        // Removes what was acknowledged (fenced) before anything is confirmed past it.
        let held = session
            .call(move |c, sql, _| {
                if open.read_held {
                    store::held_keys(c, sql).map(Some)
                } else {
                    Ok(None)
                }
            })
            .await?;
        Self::confirm(&mut st, session).await?;
        if st.reader.is_none() {
            self.connect(&mut st, session).await?;
        }
        self.snapshot_step(&mut st, session).await?;
        let from = match previous {
            Some(p) => p.to + 1,
            // The start of a term, or a rewind: everything not settled, in commit order.
            None => st.log.front,
        };
        let wait = self.settings.wait.min(session.renew_in());
        self.fill(&mut st, session, wait).await?;
        Self::skip_removed(&mut st, session).await?;
        let batch = StreamBatch {
            from,
            to: st.log.next_seq() - 1,
        };
        let page = st.log.page(
            batch,
            BATCH_START,
            usize::try_from(open.page_size).unwrap_or(usize::MAX),
            self.settings.page_bytes,
        );
        Ok(Opened {
            batch,
            first_page: Some(page),
            held,
        })
    }

    async fn page(
        &self,
        _session: &mut Session<'_>,
        batch: &StreamBatch,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<Fetched>> {
        let st = self.state.lock().await;
        Ok(st.log.page(
            *batch,
            after_id,
            usize::try_from(limit).unwrap_or(usize::MAX),
            self.settings.page_bytes,
        ))
    }

    async fn save(
        &self,
        session: &mut Session<'_>,
        _batch: StreamBatch,
        _done: bool,
    ) -> Result<()> {
        let mut st = self.state.lock().await;
        session.call(|_, _, _| Ok(())).await?;
        Self::confirm(&mut st, session).await
    }

    fn start_after(batch: &StreamBatch) -> Option<i64> {
        (batch.from <= batch.to).then_some(BATCH_START)
    }

    async fn finish(&self, session: &mut Session<'_>) {
        let mut st = self.state.lock().await;
        if session.call(|_, _, _| Ok(())).await.is_ok() {
            if let Err(e) = Self::confirm(&mut st, session).await {
                tracing::debug!(target: TARGET, error = %e, "last confirmation skipped");
            }
        }
        if let Some(reader) = st.reader.take() {
            // The task sends the last feedback, then closes the connection.
            reader.stop.cancel();
            drop(reader.changes);
            if tokio::time::timeout(Duration::from_secs(5), reader.task)
                .await
                .is_err()
            {
                tracing::debug!(target: TARGET, "the replication connection did not close in time");
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(reader) = self.state.get_mut().reader.take() {
            reader.stop.cancel();
            reader.task.abort();
        }
    }
}

/// Reads changes into `tx` until `stop`, the receiver goes away or the stream fails (the error
/// is the last item). Then sends the last feedback and closes the connection.
async fn read_stream(
    mut stream: LogicalReplicationStream,
    tx: mpsc::Sender<std::result::Result<ChangeEvent, String>>,
    stop: StreamCancel,
) {
    let feedback = std::sync::Arc::clone(&stream.shared_lsn_feedback);
    let (mut sent, mut sent_at) = (0_u64, Instant::now());
    loop {
        // The confirmed position goes to the server as soon as it moves (at most every 100 ms):
        // the library itself reports it only every so many messages or when the server asks.
        let (flushed, _) = feedback.get_feedback_lsn();
        if flushed != sent && sent_at.elapsed() >= Duration::from_millis(100) {
            if let Err(e) = stream.send_feedback().await {
                let _ = tx.send(Err(e.to_string())).await;
                break;
            }
            (sent, sent_at) = (flushed, Instant::now());
        }
        // `next_event` watches `stop` itself and returns between frames, which leaves the
        // connection fit for the last feedback below.
        match stream.next_event(&stop).await {
            Ok(change) => {
                // While the log is full nothing is read; status updates keep the server from
                // ending the connection as silent (`wal_sender_timeout`).
                let permit = loop {
                    match tokio::time::timeout(Duration::from_secs(1), tx.reserve()).await {
                        Ok(permit) => break permit.ok(),
                        Err(_) => {
                            if stop.is_cancelled() {
                                break None;
                            }
                            if let Err(e) = stream.send_feedback().await {
                                tracing::debug!(target: TARGET, error = %e, "status update failed");
                            }
                        }
                    }
                };
                let Some(permit) = permit else {
                    break;
                };
                permit.send(Ok(change));
            }
            Err(e) => {
                if !stop.is_cancelled() {
                    let _ = tx.send(Err(e.to_string())).await;
                }
                break;
            }
        }
    }
    if let Err(e) = stream.send_feedback().await {
        tracing::debug!(target: TARGET, error = %e, "last feedback not sent");
    }
    let _ = stream.stop().await;
}

fn stream_error(e: &pg_walstream::ReplicationError, url: &str) -> Error {
    Error::Stream(crate::error::scrub_text(&e.to_string(), url))
}

/// The database URL (or keyword/value string) with what the replication connection needs:
/// `replication=database`, its `application_name`, and `wal_sender_timeout` (the server ends
/// the connection of a relay silent that long). TLS and authentication settings are the URL's,
/// read by the same libpq as every other relay connection.
pub(crate) fn replication_conninfo(url: &str, application_name: &str, timeout: Duration) -> String {
    let ms = timeout.as_millis();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        let mut out = format!(
            "{url}{sep}replication=database&client_encoding=UTF8&application_name={}",
            percent(application_name)
        );
        if url.contains("options=") {
            tracing::warn!(target: TARGET, "database_url sets options: the replication connection keeps them and the server's wal_sender_timeout applies");
        } else {
            out.push_str(&format!("&options=-c%20wal_sender_timeout%3D{ms}"));
        }
        out
    } else {
        let quoted = application_name.replace('\\', "\\\\").replace('\'', "\\'");
        let mut out =
            format!("{url} replication=database client_encoding=UTF8 application_name='{quoted}'");
        if url.split_whitespace().any(|kv| kv.starts_with("options")) {
            tracing::warn!(target: TARGET, "database_url sets options: the replication connection keeps them and the server's wal_sender_timeout applies");
        } else {
            out.push_str(&format!(" options='-c wal_sender_timeout={ms}'"));
        }
        out
    }
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An outbox row from a binary pgoutput tuple. A row that cannot be read ends the term with an
/// error naming the column (the stream resumes there: nothing is skipped); it is never
/// dead-lettered from a stand-in, whose removal would lose the row's content.
fn decode_row(data: &RowData) -> std::result::Result<Fetched, String> {
    decode_row_content(data).map_err(|why| {
        format!("an outbox row in the WAL could not be read ({why}): the relay stops here rather than skip it")
    })
}

fn decode_row_content(data: &RowData) -> std::result::Result<Fetched, String> {
    let raw = |name: &str| -> std::result::Result<Option<&[u8]>, String> {
        match data.get(name) {
            Some(ColumnValue::Binary(b)) => Ok(Some(b.as_ref())),
            Some(ColumnValue::Null) => Ok(None),
            Some(ColumnValue::Text(_)) => {
                Err(format!("column {name} came as text, binary expected"))
            }
            None => Err(format!("column {name} is missing")),
        }
    };
    let need = |name: &str| raw(name)?.ok_or_else(|| format!("column {name} is NULL"));
    let int8 = |name: &str| -> std::result::Result<i64, String> {
        let b: [u8; 8] = need(name)?
            .try_into()
            .map_err(|_| format!("column {name} is not 8 bytes"))?;
        Ok(i64::from_be_bytes(b))
    };
    let text = |name: &str| -> std::result::Result<String, String> {
        String::from_utf8(need(name)?.to_vec()).map_err(|_| format!("column {name} is not UTF-8"))
    };
    let event_id = uuid::Uuid::from_slice(need("event_id")?).map_err(|e| e.to_string())?;
    let headers_raw = need("headers")?;
    let headers = match headers_raw.split_first() {
        Some((1, json)) => serde_json::from_slice(json).map_err(|e| format!("headers: {e}"))?,
        _ => return Err("headers: unknown jsonb version".into()),
    };
    let traceparent = raw("traceparent")?
        .map(|b| String::from_utf8(b.to_vec()).map_err(|_| "traceparent is not UTF-8".to_owned()))
        .transpose()?;
    let micros = int8("created_at")?;
    let mut event = outbox::StoredEvent::new(
        int8("id")?,
        event_id,
        text("topic")?,
        text("partition_key")?,
        text("event_type")?,
        need("payload")?.to_vec(),
    );
    event.headers = headers;
    event.content_type = text("content_type")?;
    event.traceparent = traceparent;
    event.tx_id = u64::from_be_bytes(int8("tx_id")?.to_be_bytes());
    let created_at = pg_time(micros);
    event.created_at = created_at.unwrap_or(DateTime::UNIX_EPOCH);
    // As the polling fetch does: a time no Kafka timestamp carries is dead-lettered.
    let defect = created_at.is_none().then(|| {
        "created_at is outside what a Kafka timestamp and ce_time carry (1970 to 9999)".to_owned()
    });
    Ok(Fetched {
        event,
        defect,
        over_budget: false,
    })
}

/// `timestamptz` binary: microseconds since 2000-01-01 UTC; `None` outside 1970..10000
/// (`infinity` included).
fn pg_time(micros: i64) -> Option<DateTime<Utc>> {
    const PG_EPOCH_SECS: i64 = 946_684_800;
    let secs = micros.div_euclid(1_000_000).checked_add(PG_EPOCH_SECS)?;
    let nanos = u32::try_from(micros.rem_euclid(1_000_000) * 1000).ok()?;
    Utc.timestamp_opt(secs, nanos)
        .single()
        .filter(|t| t.timestamp() >= 0 && t.timestamp() < 253_402_300_800)
}

/// A tableless event's message, format v1 (docs/TABLES.md).
#[derive(Deserialize)]
struct MessageV1 {
    v: u32,
    event_id: uuid::Uuid,
    topic: String,
    partition_key: String,
    event_type: String,
    payload: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    content_type: String,
    #[serde(default)]
    traceparent: Option<String>,
    tx_id: String,
    created_at: DateTime<Utc>,
}

/// The id of the tableless event at `lsn`: negative, so it never names an outbox row.
pub(crate) fn tableless_id(lsn: u64) -> i64 {
    -i64::try_from(lsn).unwrap_or(i64::MAX)
}

/// A tableless event from its message. One that cannot be read is still an event: it is
/// dead-lettered at once with the reason and its raw content (nothing is lost).
fn decode_message(lsn: u64, content: &[u8]) -> Fetched {
    let id = tableless_id(lsn);
    match read_message(content) {
        Ok(m) => match base64_decode(&m.payload) {
            Some(payload) => {
                let mut event = outbox::StoredEvent::new(
                    id,
                    m.event_id,
                    m.topic,
                    m.partition_key,
                    m.event_type,
                    payload,
                );
                event.headers = m.headers;
                event.content_type = m.content_type;
                event.traceparent = m.traceparent;
                event.tx_id = m.tx_id.parse().unwrap_or(0);
                event.created_at = m.created_at;
                Fetched {
                    event,
                    defect: None,
                    over_budget: false,
                }
            }
            None => unreadable(id, content, "its payload is not base64".into()),
        },
        Err(e) => unreadable(id, content, e),
    }
}

fn read_message(content: &[u8]) -> std::result::Result<MessageV1, String> {
    #[derive(Deserialize)]
    struct Version {
        v: Option<u32>,
    }
    let v: Version = serde_json::from_slice(content)
        .map_err(|e| format!("the tableless message is not JSON: {e}"))?;
    if v.v != Some(1) {
        return Err(format!(
            "the tableless message has format version {:?}; this relay reads version 1",
            v.v
        ));
    }
    let m: MessageV1 = serde_json::from_slice(content)
        .map_err(|e| format!("the tableless message (v1) is malformed: {e}"))?;
    debug_assert_eq!(m.v, 1);
    Ok(m)
}

fn unreadable(id: i64, content: &[u8], why: String) -> Fetched {
    // The same message read again (after a restart) is the same dead letter.
    let lsn = id.unsigned_abs();
    let mut event = outbox::StoredEvent::new(
        id,
        uuid::Uuid::from_u64_pair(0x6f75_7462_6f78_0000, lsn),
        "outbox.unreadable".into(),
        id.to_string(),
        "unreadable".into(),
        content.to_vec(),
    );
    event.content_type = "application/octet-stream".into();
    Fetched {
        event,
        defect: Some(why),
        over_budget: false,
    }
}

/// Standard base64 (padding required), `None` when invalid.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0_u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(base64_decode("AP8Q").unwrap(), [0, 255, 16]);
        assert!(base64_decode("Zm9").is_none());
        assert!(base64_decode("Zm9v\n").is_none());
        assert!(base64_decode("Z===").is_none());
    }

    #[test]
    fn a_message_of_another_version_or_shape_is_dead_lettered_with_the_reason() {
        let f = decode_message(16, br#"{"v":2}"#);
        assert_eq!(f.id, -16);
        assert!(f.defect.as_deref().unwrap().contains("version Some(2)"));
        let f = decode_message(17, b"not json");
        assert!(f.defect.as_deref().unwrap().contains("not JSON"));
        assert_eq!(f.payload, b"not json");
        let f = decode_message(18, br#"{"v":1,"topic":"t"}"#);
        assert!(f.defect.as_deref().unwrap().contains("malformed"));
    }

    #[test]
    fn a_v1_message_is_read() {
        let m = br#"{"v":1,"event_id":"0b7e3c57-7c5d-4a55-9d43-4a4b0f0f0f0f","topic":"orders","partition_key":"k","event_type":"T","payload":"e30=","headers":{"a":"b"},"content_type":"application/json","traceparent":null,"tx_id":"42","created_at":"2026-12-01T15:38:00.123456Z"}"#;
        let f = decode_message(100, m);
        assert!(f.defect.is_none());
        assert_eq!(f.payload, b"{}");
        assert_eq!(f.tx_id, 42);
        assert_eq!(f.headers.get("a").map(String::as_str), Some("b"));
        assert_eq!(f.created_at.timestamp_subsec_micros(), 123_456);
    }

    fn event(id: i64) -> Entry {
        let mut f = decode_message(1, b"x");
        f.event.id = id;
        f.defect = None;
        Entry::Event {
            fetched: Box::new(f),
        }
    }

    #[test]
    fn the_position_moves_only_past_commits_whose_events_are_all_settled() {
        let mut log = Log::default();
        log.push(event(1)).unwrap();
        log.push(event(2)).unwrap();
        log.push(Entry::Mark(100)).unwrap();
        log.push(event(3)).unwrap();
        log.push(Entry::Mark(200)).unwrap();
        assert_eq!(log.advance(), None);
        log.settle([2, 3]);
        assert_eq!(log.advance(), None, "event 1 is not settled");
        log.settle([1]);
        assert_eq!(log.advance(), Some(200));
        assert!(log.entries.is_empty());
    }

    #[test]
    fn a_page_skips_settled_events_and_a_rewind_serves_what_is_left_in_order() {
        let mut log = Log::default();
        for id in 1..=5 {
            log.push(event(id)).unwrap();
        }
        log.push(Entry::Mark(10)).unwrap();
        let batch = StreamBatch { from: 0, to: 5 };
        let ids = |p: Vec<Fetched>| p.iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(ids(log.page(batch, BATCH_START, 2, usize::MAX)), [1, 2]);
        assert_eq!(ids(log.page(batch, 2, 2, usize::MAX)), [3, 4]);
        log.settle([1, 3]);
        assert_eq!(log.advance(), None);
        let rewind = StreamBatch {
            from: log.front,
            to: log.next_seq() - 1,
        };
        assert_eq!(
            ids(log.page(rewind, BATCH_START, 10, usize::MAX)),
            [2, 4, 5]
        );
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_with_the_next_event_marked() {
        let mut log = Log::default();
        for id in 1..=3 {
            log.push(event(id)).unwrap();
        }
        let page = log.page(StreamBatch { from: 0, to: 2 }, BATCH_START, 10, 1);
        assert_eq!(page.len(), 2);
        assert!(!page[0].over_budget && page[1].over_budget);
    }

    #[test]
    fn the_replication_conninfo_keeps_the_url_and_adds_what_streaming_needs() {
        let t = Duration::from_millis(5000);
        assert_eq!(
            replication_conninfo("postgres://u@h/db?sslmode=require", "outbox-relay:a b", t),
            "postgres://u@h/db?sslmode=require&replication=database&client_encoding=UTF8&application_name=outbox-relay%3Aa%20b&options=-c%20wal_sender_timeout%3D5000"
        );
        assert_eq!(
            replication_conninfo("host=h dbname=db", "x", t),
            "host=h dbname=db replication=database client_encoding=UTF8 application_name='x' options='-c wal_sender_timeout=5000'"
        );
    }

    #[test]
    fn an_event_read_twice_is_kept_once_and_a_retried_id_after_settling_is_tracked() {
        let mut log = Log::default();
        log.push(event(7)).unwrap();
        log.push(event(7)).unwrap();
        assert_eq!(log.entries.len(), 1);
        let mut other = decode_message(2, b"y");
        other.event.id = 7;
        other.event.event_id = uuid::Uuid::from_u64_pair(1, 2);
        assert!(log
            .push(Entry::Event {
                fetched: Box::new(other),
            })
            .unwrap_err()
            .contains("two events with outbox id 7"));
        // Settled, then the same id again (a dead letter retried under its id): the new copy
        // is the one tracked, also after the old one leaves the front.
        log.push(event(8)).unwrap();
        log.settle([7]);
        log.push(event(7)).unwrap();
        assert_eq!(log.advance(), None);
        log.settle([7]);
        let batch = StreamBatch {
            from: log.front,
            to: log.next_seq() - 1,
        };
        let ids: Vec<i64> = log
            .page(batch, BATCH_START, 10, usize::MAX)
            .iter()
            .map(|f| f.id)
            .collect();
        assert_eq!(
            ids,
            [8],
            "the retried copy is settled, event 8 is still served"
        );
    }

    #[test]
    fn settled_entries_drop_their_payload_and_marks_collapse() {
        let mut log = Log::default();
        log.push(event(1)).unwrap();
        log.push(Entry::Mark(5)).unwrap();
        log.push(Entry::Mark(9)).unwrap();
        assert_eq!(log.entries.len(), 2);
        log.settle([1]);
        assert!(matches!(log.entries[0], Entry::Settled(1)));
        assert_eq!((log.unsettled, log.unsettled_bytes), (0, 0));
        assert_eq!(log.advance(), Some(9));
    }

    #[test]
    fn tableless_ids_are_negative() {
        assert_eq!(tableless_id(0x0016_B374_D848), -0x0016_B374_D848);
    }
}
