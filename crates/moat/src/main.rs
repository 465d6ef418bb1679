//! `moat`: the command line. It only parses flags and wires the crates
//! together; exit codes follow DESIGN.md (0 ok, 1 refused / mismatch /
//! unsafe, 2 error).

mod audit_cmd;
mod cli;
mod crypto_cmd;
mod demo;
mod models_cmd;
mod signing_cmd;

use clap::Parser;

// glibc's malloc serialises the request path's many small allocations on
// its arena locks (a quarter of the proxy path's CPU in a profile under
// load: bench/guard.sh); mimalloc keeps them thread-local.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat: error: {}", describe(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already
/// carries (our error types often include their source in their message).
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}
