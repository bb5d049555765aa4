//! Deliberately broken relays for the fault suite's broken variants (see
//! `outbox_tests::naive::Broken`), as a process so tests can kill -9 or SIGSTOP them.
//! `naive-relay MODE DATABASE_URL BROKERS [librdkafka.key=value ...]`; it prints `leader` when
//! it starts relaying.

use anyhow::{Context, Result};
use outbox_tests::naive::{producer_with, run_broken, Broken};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, url, brokers, extra @ ..] = args.as_slice() else {
        anyhow::bail!("usage: naive-relay MODE DATABASE_URL BROKERS [key=value ...]");
    };
    let mode: Broken = mode.parse()?;
    let extra: Vec<(&str, &str)> = extra
        .iter()
        .map(|kv| kv.split_once('=').context("expected key=value"))
        .collect::<Result<_>>()?;
    let producer = producer_with(brokers, &extra)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    run_broken(mode, url, &producer, &stop).await.map(|_| ())
}
