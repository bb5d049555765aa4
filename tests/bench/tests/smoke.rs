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
    let has = |name: &str| {
        rows.iter()
            .any(|r| r["scenario"].as_str().unwrap().starts_with(name))
    };
    for name in ["K:", "P_ins:", "P_del:", "A:", "S6 ", "L0 ", "naive"] {
        assert!(has(name), "{name} missing:\n{text}");
    }
    // S1-S5 in each capture mode, and the slot's retained WAL in S5 of the streaming ones.
    for mode in ["polling", "streamed table", "tableless"] {
        for s in ["S1 ", "S2 ", "S3 ", "S4 ", "S5 "] {
            let name = format!("[{mode}] {s}");
            assert!(has(&name), "{name} missing:\n{text}");
        }
    }
    for mode in ["streamed table", "tableless"] {
        let name = format!("[{mode}] S5 slot's retained WAL");
        assert!(has(&name), "{name} missing:\n{text}");
    }
    for r in rows {
        let v = r["measured"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{r}\n{text}");
        assert!(r["pass"].is_null(), "smoke runs have no thresholds: {r}");
    }
    assert!(text.contains("| scenario | measured |"), "{text}");
    assert!(
        text.contains("| scenario | polling | streamed table | tableless |"),
        "the side-by-side table is missing:\n{text}"
    );
    eprintln!("{text}");
}
