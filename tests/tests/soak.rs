//! The fault soak in its short forms (the `--seconds 600` form is for release checks, see
//! docs/GUARANTEES.md): every fault kind under load, on tansu and on the mock cluster,
//! invariants I1-I6 checked from outside, and the broken consumer (deduplicating on Kafka
//! offsets instead of event ids) must fail it.

use std::process::Command;

const SOAK: &str = env!("CARGO_BIN_EXE_soak");

fn soak(args: &[&str]) -> (bool, String) {
    let out = Command::new(SOAK)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run soak");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn soak_short_form_holds_every_invariant() {
    let (ok, text) = soak(&["--seconds", "90", "--seed", "11"]);
    assert!(ok, "{text}");
    assert!(text.contains("SOAK PASSED"), "{text}");
    for fault in [
        "kill -9 of the leading relay",
        "SIGSTOP of the leading relay",
        "kill -9 of the broker",
        "Postgres crash",
        "a transaction held open",
        "rows at the edges of what the outbox accepts",
        "a failing, slow consumer handler, its runner restarted mid-retry",
    ] {
        assert!(text.contains(fault), "{fault} not injected:\n{text}");
    }
    eprintln!("{text}");
}

/// The same soak with the relays streaming the WAL (table rows; kill -9, SIGSTOP, broker kill,
/// Postgres crash, a held transaction, edge rows, a failing consumer).
/// Its 2 MB edge rows stalled the stream until the replication client's copy loop was fixed
/// (vendor/pg_walstream/PATCHED.md).
///
/// It failed I6 once in CI (after the second Postgres crash the backlog stayed over 1 s for the
/// 120 s the soak waits, nothing lost): the slot resumed far back after the crash and the relay
/// re-sent every re-read event. Re-read rows already removed are no longer sent again (see
/// `streaming::rows_an_earlier_term_delivered_are_not_sent_again_when_the_slot_resumes_far_back`).
#[test]
fn soak_short_form_in_streaming_mode_holds_every_invariant() {
    let (ok, text) = soak(&["--seconds", "60", "--seed", "12", "--capture", "streaming"]);
    assert!(ok, "{text}");
    assert!(text.contains("SOAK PASSED"), "{text}");
    for fault in [
        "kill -9 of the leading relay",
        "SIGSTOP of the leading relay",
        "Postgres crash",
    ] {
        assert!(text.contains(fault), "{fault} not injected:\n{text}");
    }
    eprintln!("{text}");
}

/// The message-level faults only librdkafka's mock cluster can inject: produce requests failing
/// (one of them for good) and one partition's leader down.
#[test]
fn soak_on_the_mock_cluster_with_request_and_partition_faults_holds_every_invariant() {
    let (ok, text) = soak(&["--seconds", "70", "--seed", "5", "--mock-broker"]);
    assert!(ok, "{text}");
    assert!(text.contains("SOAK PASSED"), "{text}");
    for fault in [
        "produce requests failing (one for good)",
        "one partition's leader down",
    ] {
        assert!(text.contains(fault), "{fault} not injected:\n{text}");
    }
    eprintln!("{text}");
}

#[test]
fn broken_variant_a_consumer_deduplicating_on_offsets_fails_the_soak() {
    let (ok, text) = soak(&["--seconds", "12", "--seed", "5", "--broken-consumer"]);
    assert!(!ok, "the soak must catch double effects:\n{text}");
    assert!(text.contains("| I5 each effect once"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("| I5") && l.contains("| NO")),
        "{text}"
    );
}
