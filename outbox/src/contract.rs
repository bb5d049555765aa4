//! The table contract in one place: which tables exist, where they live, their columns and the
//! row the relay reads back. Every SQL builder of this crate and of `outbox-relay` names tables
//! through [`Table`] and lists columns through [`EventColumns`], so a new column is one edit here
//! (and one migration), and a misspelt table name does not compile. The functions of the tableless
//! outbox are named through [`Function`].
//!
//! A test (`tests/tests/enqueue.rs`, `the_contract_matches_what_the_migrations_create`) compares
//! every table and column here with what the migrations in `migrations/` create.
//! The contract for other languages is `docs/TABLES.md`.

use std::fmt;
use std::sync::LazyLock;

pub use crate::ident::{Ident, TableRef};
pub use crate::migrate::MIGRATIONS;
pub use crate::stored::{StoredEvent, Xid8};

/// A table of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// `outbox`: events written in the business transaction, removed once delivered.
    Outbox,
    /// `outbox_dead_letters`: events the relay gave up on, with why.
    DeadLetters,
    /// `outbox_delivered`: delivered events kept for replay (`keep_delivered_hours`).
    Delivered,
    /// `outbox_relay_state`: the relay's lease and the open capture batch, per outbox table.
    RelayState,
    /// `inbox`: message ids a consumer has applied.
    Inbox,
    /// `__diesel_schema_migrations`: which migrations were applied (diesel's own table).
    Migrations,
    /// `outbox_cdc_snapshots`: snapshots of captured tables the relay is to read, and how far.
    Snapshots,
}

impl Table {
    /// Every table, in migration order.
    pub const ALL: [Table; 7] = [
        Table::Outbox,
        Table::DeadLetters,
        Table::RelayState,
        Table::Inbox,
        Table::Delivered,
        Table::Snapshots,
        Table::Migrations,
    ];

    /// The table's name, unqualified.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Table::Outbox => "outbox",
            Table::DeadLetters => "outbox_dead_letters",
            Table::Delivered => "outbox_delivered",
            Table::RelayState => "outbox_relay_state",
            Table::Inbox => "inbox",
            Table::Migrations => "__diesel_schema_migrations",
            Table::Snapshots => "outbox_cdc_snapshots",
        }
    }

    /// The table's columns and their Postgres types (`udt_name`), as the migrations create them.
    #[must_use]
    pub fn columns(self) -> &'static [Column] {
        static DEAD_LETTERS: LazyLock<Vec<Column>> = LazyLock::new(|| {
            let mut c = EVENT_ROW.to_vec();
            c.extend_from_slice(DEAD_LETTER_EXTRA);
            c
        });
        static DELIVERED: LazyLock<Vec<Column>> = LazyLock::new(|| {
            let mut c = EVENT_ROW.to_vec();
            c.extend_from_slice(DELIVERED_EXTRA);
            c
        });
        match self {
            Table::Outbox => EVENT_ROW,
            Table::DeadLetters => &DEAD_LETTERS,
            Table::Delivered => &DELIVERED,
            Table::RelayState => RELAY_STATE,
            Table::Inbox => INBOX,
            Table::Migrations => MIGRATIONS_TABLE,
            Table::Snapshots => SNAPSHOTS,
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A function of the contract, created by the migrations in the outbox's schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Function {
    /// `outbox_emit(topic, partition_key, event_type, payload, headers, content_type,
    /// traceparent, new_event_id)`: enqueues one event without a row, as a transactional logical
    /// decoding message (the tableless outbox, message format v1); returns `(id, event_id)` with
    /// `id` the negated LSN of the message.
    Emit,
    /// `outbox_message_prefix()`: the prefix of this outbox's messages, `outbox:<schema>`.
    MessagePrefix,
}

impl Function {
    /// Every function, in migration order.
    pub const ALL: [Function; 2] = [Function::MessagePrefix, Function::Emit];

    /// The function's name, unqualified.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Function::Emit => "outbox_emit",
            Function::MessagePrefix => "outbox_message_prefix",
        }
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The version of the tableless message format that [`Function::Emit`] writes (the `v` field;
/// `docs/TABLES.md`, "Tableless outbox: message format v1").
pub const MESSAGE_FORMAT_VERSION: u32 = 1;

/// One column: its name and Postgres type name (`information_schema.columns.udt_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: &'static str,
    /// Type name (`int8`, `text`, ...).
    pub udt: &'static str,
    /// What fills it.
    pub role: Role,
}

/// Who fills a column of the event row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Given by the database when the row is written (`id`).
    Identity,
    /// The event's content, given by the writer (or defaulted).
    Content,
    /// Given by the database from the writing transaction (`tx_id`, `created_at`).
    Capture,
    /// Bookkeeping of one table only (dead letters, delivered events, relay state, inbox).
    Own,
}

const fn col(name: &'static str, udt: &'static str, role: Role) -> Column {
    Column { name, udt, role }
}

/// THE definition of an event row: the `outbox` table's columns, which `outbox_dead_letters` and
/// `outbox_delivered` start with. [`StoredEvent`] reads these columns.
const EVENT_ROW: &[Column] = &[
    col("id", "int8", Role::Identity),
    col("event_id", "uuid", Role::Content),
    col("topic", "text", Role::Content),
    col("partition_key", "text", Role::Content),
    col("event_type", "text", Role::Content),
    col("payload", "bytea", Role::Content),
    col("headers", "jsonb", Role::Content),
    col("content_type", "text", Role::Content),
    col("traceparent", "text", Role::Content),
    col("tx_id", "xid8", Role::Capture),
    col("created_at", "timestamptz", Role::Capture),
];

const DEAD_LETTER_EXTRA: &[Column] = &[
    col("attempts", "int4", Role::Own),
    col("last_error", "text", Role::Own),
    col("dead_lettered_at", "timestamptz", Role::Own),
];

const DELIVERED_EXTRA: &[Column] = &[col("delivered_at", "timestamptz", Role::Own)];

const RELAY_STATE: &[Column] = &[
    col("outbox_table", "text", Role::Own),
    col("leader_id", "text", Role::Own),
    col("leader_epoch", "int8", Role::Own),
    col("lease_expires_at", "timestamptz", Role::Own),
    col("prev_snapshot", "pg_snapshot", Role::Own),
    col("cur_snapshot", "pg_snapshot", Role::Own),
    col("updated_at", "timestamptz", Role::Own),
];

const INBOX: &[Column] = &[
    col("consumer", "text", Role::Own),
    col("message_id", "text", Role::Own),
    col("topic", "text", Role::Own),
    col("kafka_partition", "int4", Role::Own),
    col("kafka_offset", "int8", Role::Own),
    col("processed_at", "timestamptz", Role::Own),
];

const SNAPSHOTS: &[Column] = &[
    col("table_name", "text", Role::Own),
    col("chunk_size", "int4", Role::Own),
    col("last_key", "_text", Role::Own),
    col("rows_read", "int8", Role::Own),
    col("requested_at", "timestamptz", Role::Own),
    col("finished_at", "timestamptz", Role::Own),
];

const MIGRATIONS_TABLE: &[Column] = &[
    col("version", "varchar", Role::Own),
    col("run_on", "timestamp", Role::Own),
];

/// Comma-separated column lists of the event row, for `SELECT` and `INSERT .. SELECT` between
/// the outbox tables. Built once from the one definition.
#[derive(Debug, Clone, Copy)]
pub struct EventColumns;

impl EventColumns {
    /// Every column of the event row (`id, event_id, .., tx_id, created_at`): what
    /// [`StoredEvent`] reads and what moves, unchanged, to the dead letters and delivered events.
    #[must_use]
    pub fn all() -> &'static str {
        static ALL: LazyLock<String> = LazyLock::new(|| join(|_| true));
        &ALL
    }

    /// The content columns (`event_id, .., traceparent`): what a writer gives; `id`, `tx_id` and
    /// `created_at` are the database's.
    #[must_use]
    pub fn content() -> &'static str {
        static CONTENT: LazyLock<String> = LazyLock::new(|| join(|c| c.role == Role::Content));
        &CONTENT
    }

    /// `id` and the content columns: what a re-insert under the original id writes (the
    /// writing transaction's `tx_id` and `created_at` are new).
    #[must_use]
    pub fn identity_and_content() -> &'static str {
        static IC: LazyLock<String> = LazyLock::new(|| join(|c| c.role != Role::Capture));
        &IC
    }

    /// How many content columns an insert binds per row.
    #[must_use]
    pub fn content_count() -> usize {
        EVENT_ROW.iter().filter(|c| c.role == Role::Content).count()
    }
}

fn join(keep: impl Fn(&Column) -> bool) -> String {
    EVENT_ROW
        .iter()
        .filter(|c| keep(c))
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_lists_come_from_the_one_definition() {
        assert_eq!(
            EventColumns::all(),
            "id, event_id, topic, partition_key, event_type, payload, headers, content_type, \
             traceparent, tx_id, created_at"
        );
        assert_eq!(
            EventColumns::content(),
            "event_id, topic, partition_key, event_type, payload, headers, content_type, \
             traceparent"
        );
        assert_eq!(
            EventColumns::identity_and_content(),
            format!("id, {}", EventColumns::content())
        );
        assert_eq!(EventColumns::content_count(), 8);
    }

    #[test]
    fn the_event_tables_start_with_the_event_row() {
        for t in [Table::DeadLetters, Table::Delivered] {
            assert_eq!(&t.columns()[..EVENT_ROW.len()], EVENT_ROW, "{t}");
        }
    }

    #[test]
    fn qualify_quotes_the_table_name() {
        assert_eq!(TableRef::default().qualify(Table::Outbox), "\"outbox\"");
        assert_eq!(
            TableRef::in_schema("svc")
                .unwrap()
                .qualify(Table::DeadLetters),
            "\"svc\".\"outbox_dead_letters\""
        );
        assert_eq!(
            TableRef::default().qualify_function(Function::Emit),
            "\"outbox_emit\""
        );
        assert_eq!(
            TableRef::in_schema("svc")
                .unwrap()
                .qualify_function(Function::MessagePrefix),
            "\"svc\".\"outbox_message_prefix\""
        );
    }
}
