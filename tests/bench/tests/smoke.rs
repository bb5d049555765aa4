//! The benchmark's smoke form (small sizes, no thresholds): every scenario runs end to end
//! against real Postgres and tansu, and the JSON report holds every row.

#![allow(clippy::unwrap_used)]

#[test]
fn smoke_run_measures_every_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-bench"))
        .args(["--smoke", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    for name in [
        "K:", "P_ins:", "P_del:", "A:", "S1 ", "S2 ", "S3 ", "S4 ", "S5 ", "S6 ", "L0 ", "naive",
    ] {
        assert!(
            rows.iter()
                .any(|r| r["scenario"].as_str().unwrap().starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    for r in rows {
        let v = r["measured"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{r}\n{text}");
        assert!(r["pass"].is_null(), "smoke runs have no thresholds: {r}");
    }
    assert!(text.contains("| scenario | measured |"), "{text}");
    eprintln!("{text}");
}
