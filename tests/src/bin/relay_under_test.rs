//! The `outbox-relay` CLI, built inside this package so fault tests can start, kill -9 and
//! SIGSTOP real relay processes (`env!("CARGO_BIN_EXE_relay-under-test")`).

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
