//! A Hugging Face Hub fixture: two loopback HTTP servers (the Hub and its
//! "CDN") speaking the documented Hub API, since the real Hub is not
//! reachable from tests:
//!
//! - `GET /api/models/{org}/{repo}/revision/{rev}` → `{"sha", "siblings"}`
//!   (401 for a gated repo without the right token);
//! - `GET /api/models/{org}/{repo}/tree/{sha}?recursive=true[&cursor=N]` →
//!   two entries per page with `size` and `lfs.oid`, a `Link: <…>;
//!   rel="next"` header to the next page;
//! - `GET /{org}/{repo}/resolve/{sha}/{path}` → 302 to the CDN for LFS files
//!   (or to `redirect_override`), the bytes for small files;
//! - CDN `GET /blob/{sha256}` with `Range: bytes=N-` (206 + Content-Range).
//!
//! Faults, set per test: cut a file's connection after N bytes (a number of
//! times), serve one wrong byte, lie about a size in the listing, 404 a
//! listed file, ignore ranges, throttle. Every request is logged (path,
//! Range, whether an Authorization header came along) for assertions.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
pub struct RepoFile {
    pub path: String,
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

#[derive(Clone, Default)]
pub struct Repo {
    pub sha: String,
    pub files: Vec<RepoFile>,
    /// Answer 401 unless this bearer token is presented.
    pub gated_token: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub server: &'static str,
    pub path: String,
    pub range: Option<String>,
    pub authorization: bool,
}

#[derive(Default)]
pub struct Faults {
    /// (file path, bytes sent before the connection is cut, times left).
    pub cut: Option<(String, usize, usize)>,
    /// File served with its first byte flipped.
    pub wrong_bytes: Option<String>,
    /// (file path, delta) added to the size the listing reports.
    pub size_delta: Option<(String, i64)>,
    /// File whose resolve URL answers 404.
    pub missing: Option<String>,
    /// Serve 200 with the whole file even when asked for a range.
    pub ignore_range: bool,
    /// Bytes per second for CDN bodies (0 = unthrottled).
    pub throttle: usize,
    /// Where LFS resolves redirect to instead of the CDN (a disallowed host).
    pub redirect_override: Option<String>,
    /// Extra tree entries (hostile names), listed with these sizes.
    pub extra_listing: Vec<(String, u64)>,
}

#[derive(Default)]
pub struct State {
    /// "org/repo" → revision name ("main", tags, the sha itself) → repo.
    pub repos: BTreeMap<String, BTreeMap<String, Repo>>,
    pub faults: Faults,
    pub log: Vec<Logged>,
}

pub struct Hub {
    pub url: String,
    pub cdn_url: String,
    pub state: Arc<Mutex<State>>,
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

impl Hub {
    pub fn start() -> Hub {
        let state = Arc::new(Mutex::new(State::default()));
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", hub.local_addr().unwrap().port());
        let cdn_url = format!("http://127.0.0.1:{}", cdn.local_addr().unwrap().port());
        for (listener, server) in [(hub, "hub"), (cdn, "cdn")] {
            let state = state.clone();
            let cdn_url = cdn_url.clone();
            let hub_url = url.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    let cdn_url = cdn_url.clone();
                    let hub_url = hub_url.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
                        handle(conn, server, &state, &hub_url, &cdn_url);
                    });
                }
            });
        }
        Hub { url, cdn_url, state }
    }

    /// Publish `files` as `org/repo` at a fresh commit under `revision`
    /// (and under the commit sha itself). Returns the sha.
    pub fn publish(
        &self,
        repo: &str,
        revision: &str,
        files: Vec<RepoFile>,
        gated_token: Option<&str>,
    ) -> String {
        let mut h = Sha256::new();
        h.update(repo.as_bytes());
        for f in &files {
            h.update(f.path.as_bytes());
            h.update(&f.bytes);
        }
        let sha = hex::encode(h.finalize())[..40].to_owned();
        let r = Repo {
            sha: sha.clone(),
            files,
            gated_token: gated_token.map(str::to_owned),
        };
        let mut s = self.state.lock().unwrap();
        let revs = s.repos.entry(repo.to_owned()).or_default();
        revs.insert(revision.to_owned(), r.clone());
        revs.insert(sha.clone(), r);
        sha
    }

    pub fn faults<R>(&self, f: impl FnOnce(&mut Faults) -> R) -> R {
        f(&mut self.state.lock().unwrap().faults)
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }
}

/// A demo model folder's files as repo files (safetensors as LFS).
pub fn repo_files_from(dir: &std::path::Path) -> Vec<RepoFile> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        out.push(RepoFile {
            lfs: name.ends_with(".safetensors") || name == "tokenizer.json",
            path: name,
            bytes,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
    let _ = conn.flush();
}

fn handle(mut conn: TcpStream, server: &'static str, state: &Mutex<State>, hub_url: &str, cdn_url: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range = None;
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_owned()),
            "authorization" => authorization = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let path = path.to_owned();
    let query = query.to_owned();
    let mut s = state.lock().unwrap();
    s.log.push(Logged {
        server,
        path: target.clone(),
        range: range.clone(),
        authorization: authorization.is_some(),
    });
    if server == "cdn" {
        let Some(sha) = path.strip_prefix("/blob/") else {
            drop(s);
            return respond(&mut conn, "404 Not Found", &[], b"");
        };
        let found = s
            .repos
            .values()
            .flat_map(|r| r.values())
            .flat_map(|r| r.files.iter())
            .find(|f| sha256_hex(&f.bytes) == sha)
            .cloned();
        let Some(file) = found else {
            drop(s);
            return respond(&mut conn, "404 Not Found", &[], b"");
        };
        let mut bytes = file.bytes.clone();
        if s.faults.wrong_bytes.as_deref() == Some(file.path.as_str()) && !bytes.is_empty() {
            bytes[0] ^= 1;
        }
        let cut = match &mut s.faults.cut {
            Some((p, n, left)) if *p == file.path && *left > 0 => {
                *left -= 1;
                Some(*n)
            }
            _ => None,
        };
        let ignore_range = s.faults.ignore_range;
        let throttle = s.faults.throttle;
        drop(s);
        return serve_bytes(&mut conn, &bytes, range.as_deref(), ignore_range, cut, throttle);
    }

    // The Hub.
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let authorized = |repo: &Repo| match &repo.gated_token {
        None => true,
        Some(t) => authorization.as_deref() == Some(&format!("Bearer {t}")),
    };
    match parts.as_slice() {
        ["api", "models", org, name, "revision", rev] => {
            let Some(repo) = s
                .repos
                .get(&format!("{org}/{name}"))
                .and_then(|r| r.get(*rev))
                .cloned()
            else {
                drop(s);
                return respond(
                    &mut conn,
                    "404 Not Found",
                    &[],
                    br#"{"error":"Repository not found"}"#,
                );
            };
            drop(s);
            if !authorized(&repo) {
                return respond(
                    &mut conn,
                    "401 Unauthorized",
                    &[],
                    br#"{"error":"Access to model is restricted"}"#,
                );
            }
            let siblings: Vec<_> = repo
                .files
                .iter()
                .map(|f| serde_json::json!({"rfilename": f.path}))
                .collect();
            let body =
                serde_json::json!({"id": format!("{org}/{name}"), "sha": repo.sha, "siblings": siblings});
            respond(&mut conn, "200 OK", &[], body.to_string().as_bytes());
        }
        ["api", "models", org, name, "tree", sha] => {
            let Some(repo) = s
                .repos
                .get(&format!("{org}/{name}"))
                .and_then(|r| r.get(*sha))
                .cloned()
            else {
                drop(s);
                return respond(&mut conn, "404 Not Found", &[], b"{}");
            };
            if !authorized(&repo) {
                drop(s);
                return respond(&mut conn, "401 Unauthorized", &[], b"{}");
            }
            let mut entries: Vec<serde_json::Value> = repo
                .files
                .iter()
                .map(|f| {
                    let delta = match &s.faults.size_delta {
                        Some((p, d)) if *p == f.path => *d,
                        _ => 0,
                    };
                    let size = (f.bytes.len() as i64 + delta) as u64;
                    let mut e = serde_json::json!({"type": "file", "path": f.path, "size": size, "oid": "0".repeat(40)});
                    if f.lfs {
                        e["lfs"] = serde_json::json!({"oid": sha256_hex(&f.bytes), "size": size, "pointerSize": 134});
                    }
                    e
                })
                .collect();
            for (p, size) in &s.faults.extra_listing {
                entries.push(
                    serde_json::json!({"type": "file", "path": p, "size": size, "oid": "0".repeat(40)}),
                );
            }
            drop(s);
            entries.insert(
                0,
                serde_json::json!({"type": "directory", "path": "unused", "size": 0}),
            );
            let cursor: usize = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("cursor="))
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let page: Vec<_> = entries.iter().skip(cursor).take(2).cloned().collect();
            let mut headers = vec![];
            if cursor + 2 < entries.len() {
                headers.push((
                    "Link".to_owned(),
                    format!(
                        "<{hub_url}/api/models/{org}/{name}/tree/{sha}?recursive=true&cursor={}>; rel=\"next\"",
                        cursor + 2
                    ),
                ));
            }
            respond(
                &mut conn,
                "200 OK",
                &headers,
                serde_json::Value::Array(page).to_string().as_bytes(),
            );
        }
        [org, name, "resolve", sha, rest @ ..] => {
            let file_path = rest.join("/");
            let Some(repo) = s
                .repos
                .get(&format!("{org}/{name}"))
                .and_then(|r| r.get(*sha))
                .cloned()
            else {
                drop(s);
                return respond(&mut conn, "404 Not Found", &[], b"");
            };
            if !authorized(&repo) {
                drop(s);
                return respond(&mut conn, "401 Unauthorized", &[], b"");
            }
            if s.faults.missing.as_deref() == Some(file_path.as_str()) {
                drop(s);
                return respond(&mut conn, "404 Not Found", &[], b"Entry not found");
            }
            let Some(file) = repo.files.iter().find(|f| f.path == file_path).cloned() else {
                drop(s);
                return respond(&mut conn, "404 Not Found", &[], b"Entry not found");
            };
            if file.lfs {
                let base = s
                    .faults
                    .redirect_override
                    .clone()
                    .unwrap_or_else(|| cdn_url.to_owned());
                drop(s);
                let location = format!("{base}/blob/{}", sha256_hex(&file.bytes));
                return respond(&mut conn, "302 Found", &[("Location".into(), location)], b"");
            }
            let cut = match &mut s.faults.cut {
                Some((p, n, left)) if *p == file.path && *left > 0 => {
                    *left -= 1;
                    Some(*n)
                }
                _ => None,
            };
            let mut bytes = file.bytes.clone();
            if s.faults.wrong_bytes.as_deref() == Some(file.path.as_str()) && !bytes.is_empty() {
                bytes[0] ^= 1;
            }
            let ignore_range = s.faults.ignore_range;
            drop(s);
            serve_bytes(&mut conn, &bytes, range.as_deref(), ignore_range, cut, 0);
        }
        _ => {
            drop(s);
            respond(&mut conn, "404 Not Found", &[], b"");
        }
    }
}

fn serve_bytes(
    conn: &mut TcpStream,
    bytes: &[u8],
    range: Option<&str>,
    ignore_range: bool,
    cut: Option<usize>,
    throttle: usize,
) {
    let start = match range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
    {
        Some(n) if !ignore_range => n.parse::<usize>().unwrap_or(0).min(bytes.len()),
        _ => 0,
    };
    let body = &bytes[start..];
    let status = if start > 0 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n",
        body.len()
    );
    if start > 0 {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            bytes.len() - 1,
            bytes.len()
        ));
    }
    head.push_str("\r\n");
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let limit = cut.unwrap_or(usize::MAX).min(body.len());
    let chunk = if throttle > 0 {
        (throttle / 20).max(1)
    } else {
        64 << 10
    };
    let mut sent = 0;
    while sent < limit {
        let n = chunk.min(limit - sent);
        if conn.write_all(&body[sent..sent + n]).is_err() {
            return;
        }
        sent += n;
        if throttle > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = conn.flush();
    if cut.is_some() {
        // Reset, not a clean close: what a dropped connection looks like.
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
}
