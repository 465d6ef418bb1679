//! Append latency of the audit log with durable group commit, for the issue's
//! goal (audit adds ≤ 20 µs at p50 per request at 5,000 requests/s).
//!
//! `cargo run --release -p moat-audit --example audit_bench -- [DIR]
//!  [--threads N] [--rate R] [--seconds S]` (or `bench/audit.sh`) measures,
//! in DIR (default: a temporary folder under the current one, so on the
//! same disk as the checkout, not a tmpfs):
//!
//! 1. the bare cost of one small append + fdatasync on this disk;
//! 2. N appenders (default 8) together at R records/s (default 5,000),
//!    open loop, durable: p50/p99/max of `append`, batches and records/s;
//! 3. the same without fsync (`durable = false`);
//! 4. N appenders flat out, durable: the most records/s;
//! 5. `submit` (queue and go on; audit that is not fail-closed) at R/s.
//!
//! Latency is from the call to `append` (or `submit`) to its return: the
//! time a request would wait for its record.

// A benchmark: a failed setup step should abort loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use moat_audit::{AuditKeys, AuditLog, AuditOptions, AuditRecord, FileSink, Outcome, action};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    dir: Option<PathBuf>,
    threads: usize,
    rate: f64,
    seconds: f64,
}

fn args() -> Args {
    let mut a = Args {
        dir: None,
        threads: 8,
        rate: 5000.0,
        seconds: 5.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("a value after the flag");
        match arg.as_str() {
            "--threads" => a.threads = value().parse().unwrap(),
            "--rate" => a.rate = value().parse().unwrap(),
            "--seconds" => a.seconds = value().parse().unwrap(),
            _ if !arg.starts_with("--") => a.dir = Some(PathBuf::from(arg)),
            _ => panic!("unknown flag {arg}"),
        }
    }
    a
}

fn record(i: u64) -> AuditRecord {
    let mut r = AuditRecord::new(action::INFERENCE_CHAT, Outcome::Allowed);
    r.request_id = Some(format!("{i:032x}"));
    r.principal = Some("mk-3f9a1c2b".into());
    r.resource = Some("/v1/chat/completions".into());
    r.model = Some("deepseek-r1-distill-qwen-1.5b".into());
    r.model_digest = Some("sha256:4f1c0d8e9b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d".into());
    r.prompt_tokens = Some(412);
    r.completion_tokens = Some(128);
    r.client_addr = Some("10.0.3.17:51234".into());
    r.prompt_hmac = Some("9c".repeat(32));
    r
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1000.0)
}

/// Bare append + fdatasync of one 500-byte line, 300 times.
fn fsync_floor(dir: &Path) -> (u64, u64) {
    let path = dir.join("fsync-floor");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let line = [b'x'; 500];
    let mut lat = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        f.write_all(&line).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let _ = std::fs::remove_file(&path);
    lat.sort_unstable();
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

struct Run {
    lat: Vec<u64>,
    records: u64,
    batches: u64,
    elapsed: f64,
}

/// `threads` appenders for `seconds`; at `rate` records/s in all (open
/// loop), or flat out when `rate` is `None`.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Durable,
    NoSync,
    Submit,
}

fn run(dir: &Path, name: &str, mode: Mode, threads: usize, rate: Option<f64>, seconds: f64) -> Run {
    let durable = mode != Mode::NoSync;
    let live = dir.join(format!("{name}.jsonl"));
    let _ = std::fs::remove_file(&live); // a file left by an interrupted run
    let sink = FileSink::open(&live, Some(256 << 20)).unwrap();
    let log = Arc::new(
        AuditLog::open(
            vec![Box::new(sink)],
            AuditKeys::single(1, [7; 32]).unwrap(),
            AuditOptions {
                durable,
                ..AuditOptions::default()
            },
        )
        .unwrap(),
    );
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..threads)
        .map(|th| {
            let log = log.clone();
            std::thread::spawn(move || {
                let interval = rate.map(|r| Duration::from_secs_f64(threads as f64 / r));
                // Spread the threads' schedules evenly.
                let mut next = start + interval.map_or(Duration::ZERO, |i| i * th as u32 / threads as u32);
                let mut lat = Vec::new();
                let mut i = th as u64 * 1_000_000_000;
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let t = Instant::now();
                    if mode == Mode::Submit {
                        log.submit(record(i)).unwrap();
                    } else {
                        log.append(record(i)).unwrap();
                    }
                    lat.push(t.elapsed().as_nanos() as u64);
                    i += 1;
                    if let Some(iv) = interval {
                        next += iv;
                    }
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let elapsed = start.elapsed().as_secs_f64();
    log.close().unwrap();
    let stats = log.stats();
    let files: Vec<PathBuf> = std::iter::once(live.clone()).collect();
    let summary = moat_audit::verify(&files, &AuditKeys::single(1, [7; 32]).unwrap()).unwrap();
    assert_eq!(summary.records, stats.written);
    let _ = std::fs::remove_file(&live);
    lat.sort_unstable();
    Run {
        records: stats.written,
        batches: stats.batches,
        elapsed,
        lat,
    }
}

fn report(label: &str, r: &Run) {
    println!(
        "{label}: p50 {}  p99 {}  max {}  | {} records, {:.0} records/s, {} batches ({:.1} records/batch)",
        us(pct(&r.lat, 0.5)),
        us(pct(&r.lat, 0.99)),
        us(*r.lat.last().unwrap_or(&0)),
        r.records,
        r.records as f64 / r.elapsed,
        r.batches,
        r.records as f64 / r.batches.max(1) as f64
    );
}

fn main() {
    let a = args();
    let scratch;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            scratch = tempfile::tempdir_in(".").unwrap();
            scratch.path().to_owned()
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "audit append latency in {} ({cores} cores), {} appenders, {} s per run",
        dir.display(),
        a.threads,
        a.seconds
    );
    let (f50, f99) = fsync_floor(&dir);
    println!(
        "bare write + fdatasync of one line: p50 {}  p99 {}",
        us(f50),
        us(f99)
    );
    let label = format!("durable, {} appenders at {:.0}/s", a.threads, a.rate);
    report(
        &label,
        &run(&dir, "paced", Mode::Durable, a.threads, Some(a.rate), a.seconds),
    );
    let label = format!("no fsync, {} appenders at {:.0}/s", a.threads, a.rate);
    report(
        &label,
        &run(&dir, "nosync", Mode::NoSync, a.threads, Some(a.rate), a.seconds),
    );
    let label = format!("durable, {} appenders flat out", a.threads);
    report(
        &label,
        &run(&dir, "flat", Mode::Durable, a.threads, None, a.seconds),
    );
    let label = format!("submit (no wait), {} appenders at {:.0}/s", a.threads, a.rate);
    report(
        &label,
        &run(&dir, "submit", Mode::Submit, a.threads, Some(a.rate), a.seconds),
    );
}
