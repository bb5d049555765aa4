//! The `outbox-relay` binary; everything lives in the library (`outbox_relay::cli`).

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
