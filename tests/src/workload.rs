//! Writers for relay tests: each transaction bumps per-key sequence numbers (a row lock, so the
//! sequence is the key's commit order) and enqueues one event per bumped key.

use std::collections::HashMap;

use anyhow::Result;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use outbox::Event;

/// Event id -> (key, sequence in the key's commit order).
pub type Expected = HashMap<String, (String, u64)>;

/// Creates the `key_seq` table with `keys` keys.
pub fn create_keys(conn: &mut PgConnection, keys: usize) -> Result<()> {
    diesel::sql_query(
        "CREATE TABLE IF NOT EXISTS key_seq (key text PRIMARY KEY, seq bigint NOT NULL)",
    )
    .execute(conn)?;
    diesel::sql_query(
        "INSERT INTO key_seq SELECT 'key-' || g, 0 FROM generate_series(0, $1 - 1) g \
         ON CONFLICT DO NOTHING",
    )
    .bind::<BigInt, _>(i64::try_from(keys)?)
    .execute(conn)?;
    Ok(())
}

/// Runs `writers` threads of `txs` transactions with up to `per_tx` events each (blocking).
/// Connection errors during a transaction (a database crash) are retried; the events of a
/// failed transaction are not expected.
pub fn run_writers(
    url: &str,
    topic: &str,
    writers: usize,
    txs: usize,
    keys: usize,
    per_tx: usize,
) -> Result<Expected> {
    run_writers_with(url, topic, writers, txs, keys, per_tx, &|_| {
        outbox::Outbox::new()
    })
}

/// As [`run_writers`], writer `w` writing through `outbox(w)` (e.g. some of them tableless).
pub fn run_writers_with(
    url: &str,
    topic: &str,
    writers: usize,
    txs: usize,
    keys: usize,
    per_tx: usize,
    outbox: &dyn Fn(usize) -> outbox::Outbox,
) -> Result<Expected> {
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (url, topic, outbox) = (url.to_owned(), topic.to_owned(), outbox(w));
            std::thread::spawn(move || write(&url, &topic, w, txs, keys, per_tx, &outbox))
        })
        .collect();
    let mut expected = Expected::new();
    for h in handles {
        expected.extend(h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??);
    }
    Ok(expected)
}

fn write(
    url: &str,
    topic: &str,
    w: usize,
    txs: usize,
    keys: usize,
    per_tx: usize,
    outbox: &outbox::Outbox,
) -> Result<Expected> {
    #[derive(QueryableByName)]
    struct Seq {
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    let mut conn = PgConnection::establish(url)?;
    let mut mine = Expected::new();
    for t in 0..txs {
        let mut ks: Vec<usize> = (0..per_tx)
            .map(|i| (w * 7919 + t * 104_729 + i * 15_485_863) % keys)
            .collect();
        ks.sort_unstable();
        ks.dedup();
        let written = conn.transaction::<_, outbox::Error, _>(|c| {
            let mut events = Vec::with_capacity(ks.len());
            let mut meta = Vec::with_capacity(ks.len());
            for k in &ks {
                let key = format!("key-{k}");
                let seq = diesel::sql_query(
                    "UPDATE key_seq SET seq = seq + 1 WHERE key = $1 RETURNING seq",
                )
                .bind::<Text, _>(&key)
                .get_result::<Seq>(c)?
                .seq;
                let e = Event::json(topic, &key, "Bumped", &serde_json::json!({ "seq": seq }))?;
                meta.push((
                    e.event_id().to_string(),
                    (key, u64::try_from(seq).unwrap_or(0)),
                ));
                events.push(e);
            }
            outbox.enqueue_batch(c, &events)?;
            Ok(meta)
        })?;
        mine.extend(written);
    }
    Ok(mine)
}

/// Writers that survive a database crash: a transaction that fails is dropped (its outcome is
/// whatever the database says afterwards) and the writer reconnects and goes on. Each committed
/// event is also recorded in `written (event_id, key, seq)` in the same transaction, so after the
/// fault the database tells which events are committed. Returns how many transactions failed.
pub fn run_resilient_writers(
    url: &str,
    topic: &str,
    writers: usize,
    txs: usize,
    keys: usize,
) -> Result<usize> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    run_resilient_writers_until(
        url,
        topic,
        writers,
        txs,
        keys,
        std::time::Duration::ZERO,
        &stop,
    )
}

/// As [`run_resilient_writers`], stopping early when `stop` is set.
pub fn run_resilient_writers_until(
    url: &str,
    topic: &str,
    writers: usize,
    txs: usize,
    keys: usize,
    pause: std::time::Duration,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<usize> {
    let mut conn = PgConnection::establish(url)?;
    diesel::sql_query("CREATE TABLE IF NOT EXISTS written (event_id text PRIMARY KEY, key text NOT NULL, seq bigint NOT NULL)")
        .execute(&mut conn)?;
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (url, topic, stop) = (
                url.to_owned(),
                topic.to_owned(),
                std::sync::Arc::clone(stop),
            );
            std::thread::spawn(move || -> usize {
                #[derive(QueryableByName)]
                struct Seq {
                    #[diesel(sql_type = BigInt)]
                    seq: i64,
                }
                let mut failed = 0;
                let mut conn: Option<PgConnection> = None;
                for t in 0..txs {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                    let key = format!("key-{}", (w * 7919 + t * 104_729) % keys);
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match PgConnection::establish(&url) {
                            Ok(c) => conn.insert(c),
                            Err(_) => {
                                failed += 1;
                                std::thread::sleep(std::time::Duration::from_millis(100));
                                continue;
                            }
                        },
                    };
                    let r = c.transaction::<_, outbox::Error, _>(|c| {
                        let seq = diesel::sql_query(
                            "UPDATE key_seq SET seq = seq + 1 WHERE key = $1 RETURNING seq",
                        )
                        .bind::<Text, _>(&key)
                        .get_result::<Seq>(c)?
                        .seq;
                        let e = Event::json(
                            &topic,
                            &key,
                            "Bumped",
                            &serde_json::json!({ "seq": seq }),
                        )?;
                        diesel::sql_query("INSERT INTO written VALUES ($1, $2, $3)")
                            .bind::<Text, _>(e.event_id().to_string())
                            .bind::<Text, _>(&key)
                            .bind::<BigInt, _>(seq)
                            .execute(c)?;
                        outbox::Outbox::new().enqueue(c, &e)?;
                        Ok(())
                    });
                    if r.is_err() {
                        failed += 1;
                        conn = None;
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
                failed
            })
        })
        .collect();
    Ok(handles.into_iter().map(|h| h.join().unwrap_or(0)).sum())
}

/// The committed events according to the `written` table.
pub fn committed(conn: &mut PgConnection) -> Result<Expected> {
    #[derive(QueryableByName)]
    struct W {
        #[diesel(sql_type = Text)]
        event_id: String,
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    let rows: Vec<W> = diesel::sql_query("SELECT event_id, key, seq FROM written").load(conn)?;
    Ok(rows
        .into_iter()
        .map(|w| (w.event_id, (w.key, u64::try_from(w.seq).unwrap_or(0))))
        .collect())
}
