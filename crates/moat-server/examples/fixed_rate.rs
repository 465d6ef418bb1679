//! A fixed-rate HTTP/1.1 load generator for `bench/audit_overhead.sh`
//! (wrk2-style: Debian ships only `wrk`, which measures at saturation).
//!
//! Request i is due at `start + i / rate`; latency is measured from that
//! due time, not from when a connection was free to send it, so a stall
//! shows up in the percentiles instead of silently lowering the rate
//! ("coordinated omission"). Keep-alive connections, one request in flight
//! on each; every response must be 200.
//!
//!   fixed_rate URL RATE SECONDS CONNECTIONS [BEARER_KEY]
//!
//! Prints one JSON line: sent, ok, errors, achieved rate, and latency
//! percentiles in microseconds. `URL` is `http://HOST:PORT/PATH`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    path: String,
    rate: f64,
    seconds: f64,
    connections: usize,
    key: Option<String>,
}

fn args() -> Result<Args, String> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: fixed_rate URL RATE SECONDS CONNECTIONS [BEARER_KEY]".into());
    }
    let rest = a[1]
        .strip_prefix("http://")
        .ok_or("the URL must start with http://")?;
    let (addr, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let num = |s: &str, what: &str| {
        s.parse::<f64>()
            .map_err(|_| format!("{what}: {s:?} is not a number"))
    };
    Ok(Args {
        addr: addr.to_owned(),
        path,
        rate: num(&a[2], "RATE")?,
        seconds: num(&a[3], "SECONDS")?,
        connections: a[4].parse().map_err(|_| "CONNECTIONS must be an integer")?,
        key: a.get(5).cloned(),
    })
}

/// Read one response off `s` (status line, headers, Content-Length body);
/// returns the status code. `buf` keeps bytes between calls.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<u16, String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("bad status line in {head:?}"))?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .ok_or("no Content-Length")?;
            let total = end + 4 + len;
            while buf.len() < total {
                let mut chunk = [0u8; 16384];
                let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed mid-body".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return Ok(status);
        }
        let mut chunk = [0u8; 16384];
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", a.path, a.addr);
    if let Some(k) = &a.key {
        request.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    request.push_str("\r\n");
    let request = Arc::new(request.into_bytes());
    let total = (a.rate * a.seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Connect everything before the clock starts.
    let mut conns = Vec::new();
    for _ in 0..a.connections {
        match TcpStream::connect(&a.addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                conns.push(s);
            }
            Err(e) => {
                eprintln!("connect {}: {e}", a.addr);
                return std::process::ExitCode::from(2);
            }
        }
    }
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for mut s in conns {
        let (next, errors, request) = (next.clone(), errors.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut buf = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + interval.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
                let ok = async {
                    s.write_all(&request).await.map_err(|e| e.to_string())?;
                    read_response(&mut s, &mut buf).await
                }
                .await;
                match ok {
                    Ok(200) => lat.push(due.elapsed().as_micros() as u64),
                    Ok(_) | Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if ok.is_err() {
                            break;
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            lat.extend(l);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let errs = errors.load(Ordering::Relaxed);
    println!(
        "{{\"rate_target\":{},\"sent\":{},\"ok\":{},\"errors\":{},\"achieved_rps\":{:.0},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        a.rate,
        total.min(next.load(Ordering::Relaxed)),
        lat.len(),
        errs,
        lat.len() as f64 / elapsed.max(1e-9),
        percentile(&lat, 50.0),
        percentile(&lat, 90.0),
        percentile(&lat, 99.0),
        percentile(&lat, 99.9),
        lat.last().copied().unwrap_or(0)
    );
    if errs > 0 {
        return std::process::ExitCode::from(1);
    }
    std::process::ExitCode::SUCCESS
}
