//! Fixtures for the integration tests: run the real `moat` binary, build
//! model folders, snapshot the store, start a server on port 0 and talk to
//! it over loopback.
// Test fixtures: a failed setup step must abort the test loudly, so
// unwrap/expect/panic are the right tools here (lints relaxed for this
// module only). Not every test file uses every fixture.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test: `$MOAT_TEST_BIN` when set (several worktrees
/// sharing one target directory overwrite `target/debug/moat`; the
/// per-package copy in `target/debug/deps` is stable), else Cargo's.
pub fn moat_bin() -> PathBuf {
    std::env::var_os("MOAT_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_moat")))
}

pub fn moat() -> Command {
    let mut c = Command::new(moat_bin());
    c.env_remove("MOAT_HOME").env("MOAT_LOG", "info");
    c
}

pub fn run(args: &[&str]) -> Output {
    moat().args(args).output().expect("run moat")
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `moat demo-model DIR --seed N` (tiny).
pub fn demo_model(dir: &Path, seed: u64) {
    let o = run(&["demo-model", dir.to_str().unwrap(), "--seed", &seed.to_string()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// `moat pull file://SRC --name NAME --store STORE`.
pub fn pull(src: &Path, name: &str, store: &Path) -> Output {
    pull_with(src, name, store, &[])
}

/// `moat pull file://SRC --name NAME --store STORE EXTRA...`.
pub fn pull_with(src: &Path, name: &str, store: &Path, extra: &[&str]) -> Output {
    let source = format!("file://{}", src.display());
    let mut args = vec![
        "pull",
        &source,
        "--name",
        name,
        "--store",
        store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

pub fn pull_ok(src: &Path, name: &str, store: &Path) {
    let o = pull(src, name, store);
    assert_eq!(code(&o), 0, "pull {name}: {}", stderr(&o));
}

/// A safetensors file from a header text and `data_len` bytes of data.
pub fn safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

/// Every entry under `root`: relative path → (kind, mode, sha256 of content).
pub type Snapshot = BTreeMap<String, (char, u32, String)>;

pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(rel, ('d', mode, String::new()));
                walk(root, &path, out);
            } else {
                let digest = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
                out.insert(rel, ('f', mode, digest));
            }
        }
    }
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

/// Flip one byte of a (read-only) stored file.
pub fn flip_byte(path: &Path, offset: usize) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    let mode = perms.mode();
    perms.set_mode(0o600);
    std::fs::set_permissions(path, perms.clone()).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
    perms.set_mode(mode);
    std::fs::set_permissions(path, perms).unwrap();
}

/// Create a key with the CLI; returns (id, secret).
pub fn create_key(store: &Path, role: &str, models: Option<&str>) -> (String, String) {
    let extra: Vec<&str> = models.map(|m| vec!["--models", m]).unwrap_or_default();
    let (rc, id, secret, err) = create_key_with(store, role, &extra);
    assert_eq!(rc, 0, "{err}");
    assert!(!id.is_empty(), "no key id in {secret:?}");
    (id, secret)
}

/// A running `moat serve`, killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    pub metrics: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Start `moat serve --config` with `config` (listen addresses are set
    /// to port 0 here) and wait until both planes listen.
    pub fn start(dir: &Path, config: &str) -> Server {
        let path = dir.join(format!("moat-{}.toml", std::process::id()));
        std::fs::write(&path, config).unwrap();
        let mut child = moat()
            .args(["serve", "--config", path.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                for (plane, marker) in [
                    ("inference", "inference plane listening"),
                    ("metrics", "metrics plane listening"),
                ] {
                    if line.contains(marker) {
                        let addr = line.rsplit("addr=").next().unwrap().trim().to_owned();
                        let _ = tx.send((plane, addr));
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        let mut base = String::new();
        let mut metrics = String::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while base.is_empty() || metrics.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("inference", a)) => base = format!("http://{a}"),
                Ok((_, a)) => metrics = format!("http://{a}"),
                Err(_) => panic!("server did not start; log:\n{}", log.lock().unwrap().join("\n")),
            }
        }
        Server {
            child,
            base,
            metrics,
            log,
        }
    }

    /// The server's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(mut self) -> i32 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// (status, body as JSON or a string value)
pub fn get(url: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = agent().get(url);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    finish(req.call().unwrap())
}

pub fn post(url: &str, key: Option<&str>, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let mut req = agent().post(url).header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    finish(req.send(body.to_string()).unwrap())
}

fn finish(mut resp: ureq::http::Response<ureq::Body>) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, v)
}

/// A chat completion's text at the given settings.
pub fn chat(base: &str, key: &str, model: &str, extra: serde_json::Value) -> (u16, serde_json::Value) {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about moats."}],
        "max_tokens": 12,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    post(&format!("{base}/v1/chat/completions"), Some(key), &body)
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

pub fn config(home: &Path, models: &[&str]) -> String {
    let mut c = format!("home = \"{}\"\n", home.display());
    for m in models {
        c.push_str(&format!("[[models]]\nname = \"{m}\"\n"));
    }
    c
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// The active version's folder of a stored model (`models/NAME/versions/V`
/// where `models/NAME/current` holds `V`).
pub fn active_dir(store: &Path, name: &str) -> PathBuf {
    let model = store.join("models").join(name);
    let current = std::fs::read_to_string(model.join("current")).unwrap();
    model.join("versions").join(current.trim_end())
}

pub fn model_file(store: &Path, name: &str, rel: &str) -> PathBuf {
    active_dir(store, name).join("files").join(rel)
}
pub mod hub;

/// A private `redis-server` on a free loopback port, killed on drop.
pub struct Redis {
    child: Child,
    pub addr: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `None` (with a printed SKIPPED reason) when redis-server is not
/// installed, unless `MOAT_REQUIRE_REDIS` is set (scripts/test.sh sets it).
pub fn start_redis() -> Option<Redis> {
    if Command::new("redis-server").arg("--version").output().is_err() {
        if std::env::var_os("MOAT_REQUIRE_REDIS").is_some() {
            panic!("redis-server not found but MOAT_REQUIRE_REDIS is set");
        }
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Redis { child, addr })
}

// Shared by the access tests (access.rs, access_limits.rs).

/// (status, headers, body) of `GET url` with an optional bearer value.
pub fn get_full(url: &str, bearer: Option<&str>) -> (u16, ureq::http::HeaderMap, serde_json::Value) {
    let mut req = agent().get(url);
    if let Some(b) = bearer {
        req = req.header("Authorization", &format!("Bearer {b}"));
    }
    let mut resp = req.call().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

pub fn rejections(text: &str, stage: &str, reason: &str) -> u64 {
    let needle = format!("moat_rejections_total{{stage=\"{stage}\",reason=\"{reason}\"}}");
    text.lines()
        .find(|l| l.starts_with(&needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

pub fn base_config(store: &Path) -> String {
    format!("home = \"{}\"\n[[models]]\nname = \"absent\"\n", store.display())
}

pub fn es_key(seed: u8) -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One streaming chat completion over a raw connection (`Connection:
/// close`); everything the server sent until it closed the connection.
pub fn stream_chat(addr: &str, key: &str, model: &str, max_tokens: u32) -> String {
    let body = format!(
        r#"{{"model":"{model}","stream":true,"max_tokens":{max_tokens},"ignore_eos":true,"temperature":1.0,"seed":7,"messages":[{{"role":"user","content":"count"}}]}}"#
    );
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    std::io::Write::write_fmt(
        &mut s,
        format_args!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// One call: (status, JSON body). `totp` goes in `x-moat-totp`.
pub fn call(
    method: &str,
    url: &str,
    key: Option<&str>,
    totp: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let a = agent();
    let auth = key.map(|k| format!("Bearer {k}"));
    macro_rules! headers {
        ($r:expr) => {{
            let mut r = $r;
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            if let Some(t) = totp {
                r = r.header("x-moat-totp", t);
            }
            r
        }};
    }
    let resp = match (method, body) {
        ("GET", _) => headers!(a.get(url)).call(),
        ("DELETE", _) => headers!(a.delete(url)).call(),
        ("POST", b) => headers!(a.post(url).header("Content-Type", "application/json"))
            .send(b.unwrap_or(Value::Null).to_string()),
        ("PUT", b) => headers!(a.put(url).header("Content-Type", "application/json"))
            .send(b.unwrap_or(Value::Null).to_string()),
        (m, _) => panic!("method {m}"),
    };
    let mut resp = resp.unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The management plane's base URL, from the server's start-up log.
pub fn management_url(server: &Server) -> String {
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("management plane listening"))
        .unwrap_or_else(|| panic!("no management plane in the log:\n{log}"));
    format!("http://{}", line.rsplit("addr=").next().unwrap().trim())
}

/// `moat keys create` with extra flags; returns (exit code, id, secret, stderr).
pub fn create_key_with(store: &Path, role: &str, extra: &[&str]) -> (i32, String, String, String) {
    let mut args = vec![
        "keys",
        "create",
        "--role",
        role,
        "--store",
        store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    let secret = stdout(&o).trim().to_owned();
    let id = secret.split('_').nth(1).unwrap_or_default().to_owned();
    (code(&o), id, secret, stderr(&o))
}
