//! Change capture of named tables: every committed INSERT, UPDATE, DELETE and TRUNCATE of a
//! captured table, read from the same replication stream as the outbox, becomes one event in
//! the change envelope (format v1, docs/CDC.md), delivered by the same engine: commit order
//! per key, the slot confirmed only past settled commits, dead letters, metrics, failover.
//!
//! This module owns the envelope and the mapping of pgoutput's binary column values to JSON;
//! the streaming capture (`engine::streaming`) feeds it the stream's relations and changes.
//!
//! May call: nothing of the relay (pure functions over the stream's data).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, Utc};
use pg_walstream::{ColumnValue, RowData};
use serde_json::{json, Map, Value};

use crate::store::Fetched;

/// A table whose row changes are captured, as configured (`schema.table`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Parses the `tables` setting: comma-separated `schema.table` names (a name without a
/// schema is in `public`). Names are taken as written (no case folding, no quotes).
///
/// # Errors
/// What is wrong with which entry.
pub fn parse_tables(list: &str) -> std::result::Result<Vec<TableName>, String> {
    let mut out: Vec<TableName> = Vec::new();
    for raw in list.split(',') {
        let entry = raw.trim();
        if entry.is_empty() {
            continue;
        }
        let (schema, table) = match entry.split_once('.') {
            Some((s, t)) => (s.trim(), t.trim()),
            None => ("public", entry),
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                && !s.starts_with(|c: char| c.is_ascii_digit())
        };
        if !ok(schema) || !ok(table) || table.contains('.') {
            return Err(format!(
                "table {entry:?} is not schema.table with plain identifiers (letters, digits, _)"
            ));
        }
        let name = TableName {
            schema: schema.to_owned(),
            table: table.to_owned(),
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Per-table column choices: which columns the envelope carries, and which make the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnOptions {
    /// Only these columns (and the key's), when set.
    pub include: Option<Vec<String>>,
    /// Never these.
    pub exclude: Vec<String>,
    /// The key, in this order, instead of the replica identity's columns.
    pub key: Option<Vec<String>>,
}

/// Every table's [`ColumnOptions`].
pub type Columns = std::collections::HashMap<TableName, ColumnOptions>;

/// Parses the three column settings (`schema.table.column` lists) against the captured tables.
///
/// # Errors
/// What is wrong with which entry: not `schema.table.column`, a table not captured, a table
/// both included and excluded from, a key column excluded.
pub fn parse_columns(
    tables: &[TableName],
    include: Option<&str>,
    exclude: Option<&str>,
    key: Option<&str>,
) -> std::result::Result<Columns, String> {
    let mut out = Columns::new();
    let mut each =
        |list: Option<&str>, what: &str, f: &mut dyn FnMut(&mut ColumnOptions, String)| {
            for raw in list.unwrap_or("").split(',') {
                let entry = raw.trim();
                if entry.is_empty() {
                    continue;
                }
                let Some((table, column)) = entry.rsplit_once('.') else {
                    return Err(format!("{what}: {entry:?} is not schema.table.column"));
                };
                let t = parse_tables(table)
                    .map_err(|e| format!("{what}: {e}"))?
                    .pop()
                    .ok_or_else(|| format!("{what}: {entry:?} is not schema.table.column"))?;
                if !table.contains('.') {
                    return Err(format!("{what}: {entry:?} is not schema.table.column"));
                }
                if !tables.contains(&t) {
                    return Err(format!("{what}: {t} is not in capture_tables"));
                }
                let column = column.trim();
                if column.is_empty() {
                    return Err(format!("{what}: {entry:?} names no column"));
                }
                f(out.entry(t).or_default(), column.to_owned());
            }
            Ok(())
        };
    each(include, "capture_include_columns", &mut |o, c| {
        o.include.get_or_insert_with(Vec::new).push(c);
    })?;
    each(exclude, "capture_exclude_columns", &mut |o, c| {
        o.exclude.push(c)
    })?;
    each(key, "capture_key_columns", &mut |o, c| {
        o.key.get_or_insert_with(Vec::new).push(c);
    })?;
    for (t, o) in &out {
        if o.include.is_some() && !o.exclude.is_empty() {
            return Err(format!(
                "{t} has both capture_include_columns and capture_exclude_columns: use one"
            ));
        }
        if let Some(k) = &o.key {
            if let Some(c) = k.iter().find(|c| o.exclude.contains(c)) {
                return Err(format!("{t}.{c} is a key column and cannot be excluded"));
            }
        }
    }
    Ok(out)
}

/// `rel` with the default key (from the catalog: see `store::stream::table_keys`) and
/// identity applied, before the column choices.
pub(crate) fn with_key(mut rel: Relation, full: bool, key: &[String]) -> Relation {
    rel.full_identity = full;
    for c in &mut rel.columns {
        c.is_key = key.contains(&c.name);
    }
    rel
}

impl ColumnOptions {
    /// `rel` as the envelope sees it: the chosen columns, the chosen key.
    pub(crate) fn shape(&self, mut rel: Relation) -> Relation {
        if let Some(key) = &self.key {
            for c in &mut rel.columns {
                c.is_key = key.contains(&c.name);
            }
        }
        rel.columns.retain(|c| {
            c.is_key
                || (!self.exclude.contains(&c.name)
                    && self.include.as_ref().is_none_or(|i| i.contains(&c.name)))
        });
        rel
    }
}

/// The topic of a table's change events: `pattern` with `{schema}` and `{table}` replaced.
#[must_use]
pub fn topic_for(pattern: &str, table: &TableName) -> String {
    pattern
        .replace("{schema}", &table.schema)
        .replace("{table}", &table.table)
}

/// What the stream said of a relation (sent before its first change in a session and after
/// each schema change).
#[derive(Debug, Clone)]
pub(crate) struct Relation {
    pub name: TableName,
    pub columns: Vec<Column>,
    /// REPLICA IDENTITY FULL: an UPDATE's and a DELETE's old row is whole (else it holds the
    /// key columns only, the others sent as NULL).
    pub full_identity: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub name: String,
    pub type_oid: u32,
    pub is_key: bool,
}

/// How a type that is not built in is read: from `pg_type`, at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TypeKind {
    /// An enum: its binary form is the label.
    Enum,
    /// A domain over this base type.
    Domain(u32),
    /// An array of this element type.
    Array(u32),
}

/// The database's non-built-in types the mapping needs (enums, domains, arrays of them).
#[derive(Debug, Clone, Default)]
pub(crate) struct Types {
    pub kinds: HashMap<u32, TypeKind>,
}

/// The transaction a change belongs to (from its Begin).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxInfo {
    pub xid: u32,
    pub commit_lsn: u64,
    pub commit_time: DateTime<Utc>,
}

/// One change of a captured table.
pub(crate) enum Change<'a> {
    Insert {
        new: &'a RowData,
    },
    Update {
        old: Option<&'a RowData>,
        new: &'a RowData,
    },
    Delete {
        old: &'a RowData,
    },
    /// A row read by a snapshot chunk (op `read`).
    Read {
        row: &'a RowData,
    },
}

/// Whether a transaction (its 32-bit xid, as the stream gives it) had committed for a snapshot
/// given as `xmin:xmax:xip,...` (full xids). A transaction the stream shows is committed; it
/// is missing from the snapshot when it is at or past `xmax` or in progress (`xip`).
pub(crate) fn committed_in(snapshot: &str, xid: u32) -> bool {
    let mut parts = snapshot.split(':');
    let (Some(xmin), Some(xmax), xip) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(xmin), Ok(xmax)) = (xmin.parse::<u64>(), xmax.parse::<u64>()) else {
        return false;
    };
    // The full xid nearest xmax (xids of running or recent transactions are within 2^31 of
    // it): at or past xmax it is not visible yet.
    #[allow(clippy::cast_possible_wrap, clippy::cast_possible_truncation)]
    let diff = i64::from(xid.wrapping_sub(xmax as u32) as i32);
    let Some(full) = xmax.checked_add_signed(diff) else {
        return false;
    };
    if full < xmin {
        return true;
    }
    full < xmax
        && !xip
            .unwrap_or("")
            .split(',')
            .filter_map(|x| x.parse::<u64>().ok())
            .any(|x| x == full)
}

/// The events of a snapshot chunk: each row as a `read` event, except the rows whose key a
/// change in the chunk's window named (that change is newer; the row is left out). Their log
/// ids are left for the caller to assign ([`change_log_id`]).
pub(crate) fn snapshot_events(
    ctx: &Ctx<'_>,
    rel: &Relation,
    high_lsn: u64,
    rows: &[RowData],
    changed: &std::collections::HashSet<String>,
) -> Vec<Fetched> {
    // The message's position is the end of the watermark record; a commit record right after
    // it starts there: a read event sits just below, so that commit's changes are newer.
    let at = high_lsn.saturating_sub(1);
    let tx = TxInfo {
        xid: 0,
        commit_lsn: at,
        commit_time: Utc::now(),
    };
    let mut out = Vec::new();
    for (k, row) in rows.iter().enumerate() {
        let mut seq = k as u64;
        let mut events = change_events(ctx, rel, tx, at, &mut seq, &Change::Read { row });
        let Some(mut e) = events.pop() else { continue };
        if changed.contains(&e.partition_key) && e.defect.is_none() {
            continue;
        }
        e.event.event_id = stable_event_id(ctx.slot, "read", high_lsn, k as u64);
        out.push(e);
    }
    out
}

/// The log id of the `n`-th change or snapshot row of a term: negative (no outbox row) and in
/// a range of its own, above every tableless id (`-lsn`, lsn < 2^62), so none can collide
/// while the log holds them. Ids of change events are not stable across terms; their
/// `ce_id` is ([`stable_event_id`]).
pub(crate) fn change_log_id(n: u64) -> i64 {
    -((1_i64 << 62) | i64::try_from(n & ((1 << 62) - 1)).unwrap_or(0))
}

/// A stable event id: the same change read again (after a restart) has the same `ce_id`, so
/// consumers deduplicate it. A change is named by its transaction's commit position and its
/// place in the transaction (`seq`); a snapshot row by its chunk's high watermark and its
/// place in the chunk, under another tag, so the two never meet.
fn stable_event_id(slot: &str, tag: &str, position: u64, seq: u64) -> uuid::Uuid {
    let fnv = |seed: u64| {
        let mut h = seed;
        let mut eat = |b: u8| {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        for b in slot.bytes().chain([0]).chain(tag.bytes()).chain([0]) {
            eat(b);
        }
        for b in position.to_be_bytes().into_iter().chain(seq.to_be_bytes()) {
            eat(b);
        }
        h
    };
    let mut bytes = [0_u8; 16];
    bytes[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_be_bytes());
    bytes[8..].copy_from_slice(&fnv(0x6c62_272e_07bb_0142).to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// What the engine needs to build events.
pub(crate) struct Ctx<'a> {
    pub slot: &'a str,
    pub topic_pattern: &'a str,
    pub types: &'a Types,
}

/// The events of one change (two when an UPDATE changes the key: a delete under the old key,
/// then an insert under the new one, so each key's partition sees its own history).
pub(crate) fn change_events(
    ctx: &Ctx<'_>,
    rel: &Relation,
    tx: TxInfo,
    lsn: u64,
    seq: &mut u64,
    change: &Change<'_>,
) -> Vec<Fetched> {
    let key_of = |row: &RowData| -> std::result::Result<(String, Map<String, Value>), String> {
        let mut key = Map::new();
        for c in rel.columns.iter().filter(|c| c.is_key) {
            match row.get(&c.name) {
                Some(v) => {
                    key.insert(c.name.clone(), value(ctx.types, c.type_oid, v)?);
                }
                None => return Err(format!("key column {} missing from the row", c.name)),
            }
        }
        Ok((key_text(&key), key))
    };
    // One event: its message key, op, and the envelope with the same op.
    let one = |text: String,
               op: &'static str,
               key: &Map<String, Value>,
               before: Option<Map<String, Value>>,
               after: Option<Map<String, Value>>,
               unavailable: &[String]| {
        let body = envelope(rel, tx, lsn, op, key, before, after, unavailable);
        (text, op, body)
    };
    let built = (|| -> std::result::Result<Vec<(String, &'static str, Value)>, String> {
        Ok(match change {
            Change::Insert { new } => {
                let (text, key) = key_of(new)?;
                let (after, unavailable) = row_json(ctx.types, rel, new)?;
                vec![one(text, "insert", &key, None, Some(after), &unavailable)]
            }
            Change::Update { old, new } => {
                // With a whole old row (FULL), a TOASTed value the UPDATE left alone is the
                // old row's: carried, not unavailable.
                let merged;
                let new = match old {
                    Some(o) if rel.full_identity => {
                        let mut m = (*new).clone();
                        for (name, v) in o.iter() {
                            if new.get(name).is_none() {
                                m.push(std::sync::Arc::clone(name), v.clone());
                            }
                        }
                        merged = m;
                        &merged
                    }
                    _ => *new,
                };
                let (new_text, new_key) = key_of(new)?;
                let (after, unavailable) = row_json(ctx.types, rel, new)?;
                let before = old.map(|o| before_json(ctx.types, rel, o)).transpose()?;
                let old_key = old.map(&key_of).transpose()?;
                match old_key {
                    Some((old_text, old_key)) if old_text != new_text => vec![
                        one(old_text, "delete", &old_key, before.clone(), None, &[]),
                        one(
                            new_text,
                            "insert",
                            &new_key,
                            None,
                            Some(after),
                            &unavailable,
                        ),
                    ],
                    _ => vec![one(
                        new_text,
                        "update",
                        &new_key,
                        before,
                        Some(after),
                        &unavailable,
                    )],
                }
            }
            Change::Read { row } => {
                let (text, key) = key_of(row)?;
                let (after, _) = row_json(ctx.types, rel, row)?;
                vec![one(text, "read", &key, None, Some(after), &[])]
            }
            Change::Delete { old } => {
                let (text, key) = key_of(old)?;
                let before = before_json(ctx.types, rel, old)?;
                vec![one(text, "delete", &key, Some(before), None, &[])]
            }
        })
    })();
    let topic = topic_for(ctx.topic_pattern, &rel.name);
    match built {
        Ok(events) => events
            .into_iter()
            .map(|(key, op, mut body)| {
                let n = *seq;
                *seq += 1;
                body["source"]["seq"] = json!(n);
                event(ctx, &topic, tx, n, key, op, &body, None)
            })
            .collect(),
        // A change the mapping cannot read is still an event: dead-lettered at once with the
        // reason (nothing is skipped silently).
        Err(why) => vec![event(
            ctx,
            &topic,
            tx,
            {
                let n = *seq;
                *seq += 1;
                n
            },
            String::new(),
            "unreadable",
            &json!({"v": 1, "table": table_json(&rel.name)}),
            Some(format!("a change of {} could not be read: {why}", rel.name)),
        )],
    }
}

/// The events of a TRUNCATE: one per captured table it names, keyed by nothing.
pub(crate) fn truncate_events(
    ctx: &Ctx<'_>,
    tables: &[TableName],
    tx: TxInfo,
    lsn: u64,
    seq: &mut u64,
    cascade: bool,
    restart_identity: bool,
) -> Vec<Fetched> {
    tables
        .iter()
        .map(|t| {
            let n = *seq;
            *seq += 1;
            let mut source = source_json(tx, lsn);
            source["seq"] = json!(n);
            let body = json!({
                "v": 1,
                "op": "truncate",
                "table": table_json(t),
                "cascade": cascade,
                "restart_identity": restart_identity,
                "source": source,
            });
            event(
                ctx,
                &topic_for(ctx.topic_pattern, t),
                tx,
                n,
                String::new(),
                "truncate",
                &body,
                None,
            )
        })
        .collect()
}

/// One event; its log id is assigned by the caller ([`change_log_id`]).
#[allow(clippy::too_many_arguments)]
fn event(
    ctx: &Ctx<'_>,
    topic: &str,
    tx: TxInfo,
    seq: u64,
    key: String,
    op: &str,
    body: &Value,
    defect: Option<String>,
) -> Fetched {
    let mut e = outbox::StoredEvent::new(
        0,
        stable_event_id(ctx.slot, "change", tx.commit_lsn, seq),
        topic.to_owned(),
        key,
        format!("change.{op}"),
        serde_json::to_vec(body).unwrap_or_default(),
    );
    e.tx_id = u64::from(tx.xid);
    e.created_at = tx.commit_time;
    Fetched {
        event: e,
        defect,
        over_budget: false,
    }
}

#[allow(clippy::too_many_arguments)]
fn envelope(
    rel: &Relation,
    tx: TxInfo,
    lsn: u64,
    op: &str,
    key: &Map<String, Value>,
    before: Option<Map<String, Value>>,
    after: Option<Map<String, Value>>,
    unavailable: &[String],
) -> Value {
    let mut v = json!({
        "v": 1,
        "op": op,
        "table": table_json(&rel.name),
        "key": key,
        "before": before,
        "after": after,
        "source": source_json(tx, lsn),
    });
    if !unavailable.is_empty() {
        v["unavailable"] = json!(unavailable);
    }
    v
}

fn table_json(t: &TableName) -> Value {
    json!({"schema": t.schema, "name": t.table})
}

fn source_json(tx: TxInfo, lsn: u64) -> Value {
    json!({
        "lsn": lsn_text(lsn),
        "commit_lsn": lsn_text(tx.commit_lsn),
        "tx": tx.xid,
        "commit_time": tx.commit_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}

/// `0/16B3748`, as Postgres prints an LSN.
#[must_use]
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The message key of a change: the key column's value as text when the key is one column,
/// else the key object as compact JSON (columns in the table's order).
fn key_text(key: &Map<String, Value>) -> String {
    if key.len() == 1 {
        if let Some(v) = key.values().next() {
            return match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
        }
    }
    // Columns in name order, whatever order the map keeps (the key decides the partition).
    let mut pairs: Vec<(&String, &Value)> = key.iter().collect();
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let body: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// An old row as JSON: whole with REPLICA IDENTITY FULL, else its key columns only (the
/// stream sends the others as NULL, which would read as data).
fn before_json(
    types: &Types,
    rel: &Relation,
    row: &RowData,
) -> std::result::Result<Map<String, Value>, String> {
    let (mut m, _) = row_json(types, rel, row)?;
    if !rel.full_identity {
        m.retain(|name, _| rel.columns.iter().any(|c| c.is_key && &c.name == name));
    }
    Ok(m)
}

/// A row as JSON, and the columns the stream left out because their TOASTed value did not
/// change (never sent as null).
fn row_json(
    types: &Types,
    rel: &Relation,
    row: &RowData,
) -> std::result::Result<(Map<String, Value>, Vec<String>), String> {
    let mut out = Map::new();
    let mut unavailable = Vec::new();
    let by_name: BTreeMap<&str, &ColumnValue> = row.iter().map(|(n, v)| (&**n, v)).collect();
    for c in &rel.columns {
        match by_name.get(c.name.as_str()) {
            Some(v) => {
                out.insert(c.name.clone(), value(types, c.type_oid, v)?);
            }
            None => unavailable.push(c.name.clone()),
        }
    }
    Ok((out, unavailable))
}

/// One column value as JSON (docs/CDC.md, "Types").
///
/// # Errors
/// A value that does not match its type's binary form.
pub(crate) fn value(
    types: &Types,
    oid: u32,
    v: &ColumnValue,
) -> std::result::Result<Value, String> {
    match v {
        ColumnValue::Null => Ok(Value::Null),
        ColumnValue::Text(t) => Ok(Value::String(String::from_utf8_lossy(t).into_owned())),
        ColumnValue::Binary(b) => binary(types, oid, b, 0),
    }
}

fn binary(types: &Types, oid: u32, b: &[u8], depth: u32) -> std::result::Result<Value, String> {
    if depth > 8 {
        return Err("types nested too deep".into());
    }
    let fixed = |n: usize| -> std::result::Result<&[u8], String> {
        if b.len() == n {
            Ok(b)
        } else {
            Err(format!("type {oid}: {} bytes, {n} expected", b.len()))
        }
    };
    let text = || -> std::result::Result<Value, String> {
        String::from_utf8(b.to_vec())
            .map(Value::String)
            .map_err(|_| format!("type {oid}: not UTF-8"))
    };
    Ok(match oid {
        16 => Value::Bool(fixed(1)?[0] != 0),
        21 => json!(i16::from_be_bytes(
            fixed(2)?.try_into().map_err(|_| "int2")?
        )),
        23 => json!(i32::from_be_bytes(
            fixed(4)?.try_into().map_err(|_| "int4")?
        )),
        20 => json!(i64::from_be_bytes(
            fixed(8)?.try_into().map_err(|_| "int8")?
        )),
        26 | 28 | 29 => json!(u32::from_be_bytes(fixed(4)?.try_into().map_err(|_| "oid")?)),
        700 => float(f64::from(f32::from_be_bytes(
            fixed(4)?.try_into().map_err(|_| "float4")?,
        ))),
        701 => float(f64::from_be_bytes(
            fixed(8)?.try_into().map_err(|_| "float8")?,
        )),
        1700 => Value::String(numeric(b)?),
        790 => Value::String(money(fixed(8)?)),
        // text, varchar, bpchar, name, char, citext-like and xml come as their text.
        25 | 1043 | 1042 | 19 | 18 | 142 => text()?,
        17 => Value::String(base64(b)),
        2950 => Value::String(
            uuid::Uuid::from_slice(b)
                .map_err(|e| e.to_string())?
                .to_string(),
        ),
        114 => serde_json::from_slice(b).map_err(|e| format!("json: {e}"))?,
        3802 => match b.split_first() {
            Some((1, rest)) => serde_json::from_slice(rest).map_err(|e| format!("jsonb: {e}"))?,
            _ => return Err("jsonb: unknown version".into()),
        },
        1082 => Value::String(date(i32::from_be_bytes(
            fixed(4)?.try_into().map_err(|_| "date")?,
        ))),
        1114 => Value::String(timestamp(
            i64::from_be_bytes(fixed(8)?.try_into().map_err(|_| "timestamp")?),
            false,
        )),
        1184 => Value::String(timestamp(
            i64::from_be_bytes(fixed(8)?.try_into().map_err(|_| "timestamptz")?),
            true,
        )),
        1083 => Value::String(time_of_day(i64::from_be_bytes(
            fixed(8)?.try_into().map_err(|_| "time")?,
        ))),
        _ => match types.kinds.get(&oid) {
            Some(TypeKind::Enum) => text()?,
            Some(TypeKind::Domain(base)) => binary(types, *base, b, depth + 1)?,
            Some(TypeKind::Array(_)) => array(types, b, depth)?,
            None if is_builtin_array(oid) => array(types, b, depth)?,
            // Anything else is kept whole, named by its type: nothing is guessed.
            None => json!({"type_oid": oid, "binary_base64": base64(b)}),
        },
    })
}

fn is_builtin_array(oid: u32) -> bool {
    matches!(
        oid,
        1000 | 1001
            | 1005
            | 1007
            | 1016
            | 1021
            | 1022
            | 1231
            | 1009
            | 1015
            | 1014
            | 1182
            | 1115
            | 1185
            | 2951
            | 199
            | 3807
            | 1183
            | 1003
            | 1028
    )
}

/// A binary array: ndim, has-nulls flag, element type, then (size, lower bound) per dimension,
/// then each element as (length or -1, bytes). Nested JSON arrays, one level per dimension.
fn array(types: &Types, b: &[u8], depth: u32) -> std::result::Result<Value, String> {
    let mut at = 0_usize;
    let i32_at = |at: &mut usize| -> std::result::Result<i32, String> {
        let s = b.get(*at..*at + 4).ok_or("array: truncated")?;
        *at += 4;
        Ok(i32::from_be_bytes(s.try_into().map_err(|_| "array")?))
    };
    let ndim = i32_at(&mut at)?;
    let _flags = i32_at(&mut at)?;
    let elem = u32::from_be_bytes(i32_at(&mut at)?.to_be_bytes());
    if ndim == 0 {
        return Ok(Value::Array(Vec::new()));
    }
    if !(1..=6).contains(&ndim) {
        return Err(format!("array: {ndim} dimensions"));
    }
    let mut dims = Vec::new();
    let mut lower_bounds = Vec::new();
    for _ in 0..ndim {
        let size = usize::try_from(i32_at(&mut at)?).map_err(|_| "array: negative size")?;
        lower_bounds.push(i32_at(&mut at)?);
        dims.push(size);
    }
    let total: usize = dims.iter().product();
    let mut flat = Vec::with_capacity(total.min(1 << 16));
    for _ in 0..total {
        let len = i32_at(&mut at)?;
        if len < 0 {
            flat.push(Value::Null);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| "array: length")?;
        let s = b.get(at..at + len).ok_or("array: truncated element")?;
        at += len;
        flat.push(binary(types, elem, s, depth + 1)?);
    }
    // Fold the flat list into nested arrays from the innermost dimension out.
    let mut level = flat;
    for &d in dims.iter().skip(1).rev() {
        level = level
            .chunks(d.max(1))
            .map(|c| Value::Array(c.to_vec()))
            .collect();
    }
    // JSON arrays start at 0 and Postgres's at 1: other lower bounds are kept beside them.
    if lower_bounds.iter().any(|l| *l != 1) {
        return Ok(json!({"lower_bounds": lower_bounds, "elements": level}));
    }
    Ok(Value::Array(level))
}

fn float(f: f64) -> Value {
    if f.is_finite() {
        json!(f)
    } else if f.is_nan() {
        Value::String("NaN".into())
    } else if f > 0.0 {
        Value::String("Infinity".into())
    } else {
        Value::String("-Infinity".into())
    }
}

/// `numeric` binary: ndigits, weight, sign, dscale (i16 each), then base-10000 digits; as its
/// exact decimal text (`NaN`, `Infinity`, `-Infinity` for the special values).
fn numeric(b: &[u8]) -> std::result::Result<String, String> {
    let word = |i: usize| -> std::result::Result<u16, String> {
        b.get(i * 2..i * 2 + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
            .ok_or_else(|| "numeric: truncated".to_owned())
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        0 | 0x4000 => {}
        other => return Err(format!("numeric: sign {other:#x}")),
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<std::result::Result<_, _>>()?;
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    // Integer part: groups at weights weight..=0.
    if weight < 0 {
        out.push('0');
    } else {
        for w in 0..=weight {
            let d = usize::try_from(w)
                .ok()
                .and_then(|i| digits.get(i))
                .copied()
                .unwrap_or(0);
            if w == 0 {
                let _ = write!(out, "{d}");
            } else {
                let _ = write!(out, "{d:04}");
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut frac = String::new();
        let mut w = -1_i32;
        while frac.len() < dscale {
            let idx = weight - w; // index of the group at weight w is (weight - w)
            let d = usize::try_from(idx)
                .ok()
                .and_then(|i| digits.get(i))
                .copied()
                .unwrap_or(0);
            let _ = write!(frac, "{d:04}");
            w -= 1;
        }
        frac.truncate(dscale);
        out.push_str(&frac);
    }
    Ok(out)
}

/// `money` binary: cents as int8 (the server's locale decides the symbol; this is the amount).
fn money(b: &[u8]) -> String {
    let cents = i64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

fn pg_epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default()
}

fn date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        d => pg_epoch()
            .checked_add_signed(TimeDelta::days(i64::from(d)))
            .map_or_else(|| format!("{d} days from 2000-01-01"), |x| x.to_string()),
    }
}

fn timestamp(micros: i64, zoned: bool) -> String {
    match micros {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        m => {
            let at = pg_epoch()
                .and_time(NaiveTime::MIN)
                .checked_add_signed(TimeDelta::microseconds(m));
            match at {
                Some(t) if zoned => t
                    .and_utc()
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
                None => format!("{m} microseconds from 2000-01-01"),
            }
        }
    }
}

fn time_of_day(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    format!(
        "{:02}:{:02}:{:02}.{frac:06}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics_are_exact_decimal_text() {
        assert_eq!(numeric(&num(2, 0, 0, 2, &[12, 3400])).unwrap(), "12.34");
        assert_eq!(numeric(&num(1, -1, 0x4000, 4, &[5])).unwrap(), "-0.0005");
        assert_eq!(numeric(&num(2, 1, 0, 0, &[1, 0])).unwrap(), "10000");
        assert_eq!(numeric(&num(0, 0, 0, 0, &[])).unwrap(), "0");
        assert_eq!(numeric(&num(0, 0, 0, 3, &[])).unwrap(), "0.000");
        assert_eq!(numeric(&num(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
        assert_eq!(
            numeric(&num(3, 2, 0, 0, &[12, 3456, 7890])).unwrap(),
            "1234567890"
        );
    }

    #[test]
    fn times_dates_and_bytes() {
        assert_eq!(date(0), "2000-01-01");
        assert_eq!(date(i32::MAX), "infinity");
        assert_eq!(timestamp(1_500_000, true), "2000-01-01T00:00:01.500000Z");
        assert_eq!(timestamp(-1, false), "1999-12-31T23:59:59.999999");
        assert_eq!(time_of_day(3_723_000_001), "01:02:03.000001");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(money(&(-12345_i64).to_be_bytes()), "-123.45");
    }

    #[test]
    fn tables_parse_and_refuse_clearly() {
        let t = parse_tables("public.stock, orders ,inv.moves,public.stock").unwrap();
        assert_eq!(
            t.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["public.stock", "public.orders", "inv.moves"]
        );
        let e = parse_tables("public.\"x y\"").unwrap_err();
        assert!(e.contains("\"public.\\\"x y\\\"\""), "{e}");
        assert_eq!(topic_for("cdc.{schema}.{table}", &t[2]), "cdc.inv.moves");
    }

    #[test]
    fn column_options_parse_and_shape() {
        let tables = parse_tables("public.users").unwrap();
        let o = parse_columns(
            &tables,
            None,
            Some("public.users.password, public.users.ssn"),
            Some("public.users.email"),
        )
        .unwrap();
        let rel = Relation {
            full_identity: false,
            name: tables[0].clone(),
            columns: ["id", "email", "password", "ssn", "name"]
                .iter()
                .map(|n| Column {
                    name: (*n).to_owned(),
                    type_oid: 25,
                    is_key: *n == "id",
                })
                .collect(),
        };
        let shaped = o[&tables[0]].shape(rel);
        let names: Vec<_> = shaped
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.is_key))
            .collect();
        assert_eq!(names, [("id", false), ("email", true), ("name", false)]);
        let e = parse_columns(
            &tables,
            Some("public.users.id"),
            Some("public.users.ssn"),
            None,
        )
        .unwrap_err();
        assert!(e.contains("use one"), "{e}");
        let e = parse_columns(&tables, None, Some("public.other.x"), None).unwrap_err();
        assert!(e.contains("public.other is not in capture_tables"), "{e}");
        let e = parse_columns(&tables, None, Some("users"), None).unwrap_err();
        assert!(e.contains("schema.table.column"), "{e}");
        let e = parse_columns(
            &tables,
            None,
            Some("public.users.email"),
            Some("public.users.email"),
        )
        .unwrap_err();
        assert!(e.contains("cannot be excluded"), "{e}");
    }

    #[test]
    fn keys_as_text() {
        let mut one = Map::new();
        one.insert("sku".into(), json!("A-17"));
        assert_eq!(key_text(&one), "A-17");
        let mut two = Map::new();
        two.insert("wh".into(), json!(3));
        two.insert("sku".into(), json!("A\"17"));
        assert_eq!(key_text(&two), r#"{"sku":"A\"17","wh":3}"#);
    }

    #[test]
    fn visibility_in_a_snapshot() {
        let snap = "100:110:102,105";
        assert!(committed_in(snap, 99));
        assert!(committed_in(snap, 101));
        assert!(!committed_in(snap, 102));
        assert!(!committed_in(snap, 105));
        assert!(committed_in(snap, 109));
        assert!(!committed_in(snap, 110));
        assert!(!committed_in(snap, 111), "past xmax: not visible yet");
        assert!(!committed_in(snap, 5000));
        // Across an epoch: xmax in epoch 1, an xid of the end of epoch 0.
        let epoch = "4294967290:4294967306:";
        assert!(committed_in(epoch, 4_294_967_295));
        assert!(committed_in(epoch, 3));
        assert!(!committed_in(epoch, 10));
        assert!(!committed_in(epoch, 11));
    }

    #[test]
    fn change_ids_and_event_ids() {
        assert_eq!(change_log_id(0), -(1 << 62));
        assert!(change_log_id(5) < -(1 << 62));
        let id = |tag, p, q| stable_event_id("s", tag, p, q);
        assert_ne!(id("change", 1000, 0), id("change", 1000, 1));
        assert_ne!(id("change", 1000, 0), id("read", 1000, 0));
        assert_ne!(
            stable_event_id("s", "change", 1, 0),
            stable_event_id("t", "change", 1, 0)
        );
        assert_eq!(id("change", 1000, 0), id("change", 1000, 0));
    }
}
