//! The demo end to end, as the README's first command runs it, on a smaller load: with chaos on
//! the embedded broker, and on tansu. The driver checks consistency itself (orders decided once,
//! never oversold, reservations and stock in step, each warehouse's movements in the centre by
//! push, change capture and pull with no drift, a cancelled shipped order refused) and exits
//! non-zero otherwise. Needs the sibling binaries: `scripts/test` builds them.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn run_demo(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args([
            "--orders",
            "400",
            "--clients",
            "4",
            "--scarce-products",
            "10",
            "--ample-products",
            "20",
        ])
        .args(["--settle-timeout-secs", "120", "--rate", "40"])
        .args(extra)
        .output()
        .expect("run the demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "demo failed:\n{text}");
    assert!(text.contains("CONSISTENT:"), "{text}");
    text
}

#[test]
fn demo_with_chaos_on_the_embedded_broker_is_consistent() {
    let html = std::env::temp_dir().join(format!("demo-e2e-{}.html", std::process::id()));
    let text = run_demo(&["--chaos", "--html", html.to_str().unwrap()]);
    // Relays of every database with one, the centre, and three warehouses.
    assert_eq!(text.matches("chaos: kill -9").count(), 8, "{text}");
    assert!(
        text.contains("reconcile drift (orders vs reservations vs stock) |                      0"),
        "{text}"
    );
    let lost = text
        .lines()
        .find(|l| l.starts_with("| lost by the path"))
        .unwrap_or_else(|| panic!("no per-path table:\n{text}"));
    let cells: Vec<&str> = lost.split('|').map(str::trim).collect();
    // push, capture, pull lose nothing (the dual write may).
    assert_eq!(&cells[2..5], &["0", "0", "0"], "{text}");
    assert!(text.contains("sync path"), "{text}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("id=\"data\"") && page.contains("kill -9 wh-dual"),
        "{page}"
    );
    let _ = std::fs::remove_file(&html);
}

#[test]
fn demo_on_tansu_is_consistent() {
    let mut tansu = TansuProcess::start();
    let html = std::env::temp_dir().join(format!("demo-e2e-tansu-{}.html", std::process::id()));
    let text = run_demo(&[
        "--brokers",
        &tansu.bootstrap,
        "--html",
        html.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&html);
    assert!(
        text.contains(&format!("broker     {}", tansu.bootstrap)),
        "{text}"
    );
    tansu.stop();
}

/// A tansu broker on a free loopback port (memory storage).
struct TansuProcess {
    child: std::process::Child,
    bootstrap: String,
}

impl TansuProcess {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let home = std::env::var("HOME").unwrap_or_default();
        let bin = ["tansu".to_owned(), format!("{home}/.cargo/bin/tansu")]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("tansu is not installed: run scripts/setup");
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Self {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TansuProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
