//! Throughput of the chunked AES-256-GCM format (moat-artifact::crypto):
//! encrypt and decrypt of one file, warm page cache, output to a sink (the
//! model-load path reads plaintext into memory, it does not write it back),
//! one thread and all cores, median of RUNS. Run by bench/crypto.sh.
//!
//!   crypto_bench DIR [SIZE_MIB (1024)] [RUNS (3)]

use moat_artifact::crypto::{self, KeyringFile, NewKek, StreamOptions};
use std::io::{self, Read};
use std::path::Path;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut secs = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        secs.push(start.elapsed().as_secs_f64());
    }
    Ok(median(secs))
}

fn read_all(path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).ok_or("usage: crypto_bench DIR [SIZE_MIB] [RUNS]")?);
    let mib: u64 = args.get(2).map_or(Ok(1024), |s| s.parse())?;
    let runs: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    std::fs::create_dir_all(dir)?;
    let ring = KeyringFile::new(dir.join("keyring.json"));
    if ring.list()?.is_empty() {
        ring.rotate(NewKek::Local)?;
    }
    let keyring = ring.load()?;
    let plain = dir.join(format!("plain-{mib}M.bin"));
    let sealed = dir.join(format!("plain-{mib}M.bin.enc"));
    let bytes = mib << 20;
    if std::fs::metadata(&plain).map(|m| m.len()).ok() != Some(bytes) {
        // Pseudo-random contents (xorshift), so nothing compresses or dedups.
        let mut w = io::BufWriter::new(std::fs::File::create(&plain)?);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for c in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            io::Write::write_all(&mut w, &block)?;
        }
        io::Write::flush(&mut w)?;
    }
    crypto::encrypt_file(&keyring, &plain, &sealed, &StreamOptions::default())?;
    read_all(&plain)?;
    read_all(&sealed)?;

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t_read = time(runs, || read_all(&sealed))?;
    let mut rows = Vec::new();
    for (label, threads) in [("1 thread", 1), ("all cores", 0)] {
        let opts = StreamOptions {
            threads,
            ..StreamOptions::default()
        };
        let enc = time(runs, || {
            let f = std::fs::File::open(&plain)?;
            crypto::encrypt_stream(&keyring, f, io::sink(), &opts)?;
            Ok(())
        })?;
        let dec = time(runs, || {
            let f = std::fs::File::open(&sealed)?;
            crypto::decrypt_stream(&keyring, f, io::sink(), &opts)?;
            Ok(())
        })?;
        rows.push((label, threads, enc, dec));
    }
    let mbps = |s: f64| bytes as f64 / 1e6 / s.max(1e-9);
    println!(
        "file: {bytes} bytes ({mib} MiB), 1 MiB chunks, {cores} cores, AES-NI+CLMUL: {}, median of {runs}",
        if crypto::hardware_acceleration() {
            "yes"
        } else {
            "no"
        }
    );
    println!(
        "read only (page cache)  {t_read:6.2} s  {:6.0} MB/s",
        mbps(t_read)
    );
    for (label, threads, enc, dec) in rows {
        let per_core = if threads == 1 { 1.0 } else { cores as f64 };
        println!(
            "{label:<9}  encrypt {enc:6.2} s {:6.0} MB/s ({:5.0} MB/s per core)   decrypt {dec:6.2} s {:6.0} MB/s ({:5.0} MB/s per core)",
            mbps(enc),
            mbps(enc) / per_core,
            mbps(dec),
            mbps(dec) / per_core
        );
    }
    Ok(())
}
