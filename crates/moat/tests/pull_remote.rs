//! `moat pull` from remotes, driving the real binary: the Hugging Face Hub
//! (a local fixture speaking its HTTP API, with a second host as the CDN)
//! and S3 (moto's server, a real S3 API with SigV4 authentication, on
//! loopback). Every refusal exits 1, names the file and what differed, and
//! promotes nothing; interrupted downloads resume with ranged requests.
//!
//! moto is found through `$MOAT_MOTO_SERVER`, else
//! `$HOME/.cache/moat/venv/bin/moto_server` (scripts/test.sh installs it);
//! `MOAT_SKIP_S3_TESTS=1` skips the S3 test when it is absent.

// Test fixtures: a failed setup step must abort the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::hub::{Hub, RepoFile, repo_files_from, sha256_hex};
use common::*;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Loopback fixtures need an explicit allowance: the defaults refuse
/// loopback addresses and plain http.
const HF_LOOPBACK: &str = r#"
[sources]
defaults = false
[[sources.allow]]
scheme = "hf"
host = "127.0.0.1"
allow_http = true
allow_private = true
"#;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("moat.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `moat pull SOURCE --name NAME --store STORE [--config CFG] ARGS…` with a
/// clean environment plus `env`.
fn pull_env(
    source: &str,
    name: &str,
    store: &Path,
    cfg: Option<&Path>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut c = moat();
    for k in [
        "HF_TOKEN",
        "HF_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ] {
        c.env_remove(k);
    }
    c.env("HOME", store.parent().unwrap());
    c.args(["pull", source, "--name", name, "--store", store.to_str().unwrap()]);
    c.args(["--progress", "json"]);
    if !args.contains(&"--retries") {
        c.args(["--retries", "2"]);
    }
    if let Some(cfg) = cfg {
        c.args(["--config", cfg.to_str().unwrap()]);
    }
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn promoted(store: &Path, name: &str) -> bool {
    code(&run(&["verify", name, "--store", store.to_str().unwrap()])) == 0
}

fn assert_refused(o: &Output, file: &str, rule: &str) {
    let err = stderr(o);
    assert_eq!(code(o), 1, "expected a refusal ({rule}):\n{err}");
    let line = err
        .lines()
        .find(|l| l.contains(rule))
        .unwrap_or_else(|| panic!("rule {rule} not named:\n{err}"));
    assert!(line.contains(file), "file {file} not named in {line:?}");
}

struct Fixture {
    _t: tempfile::TempDir,
    hub: Hub,
    store: PathBuf,
    cfg: PathBuf,
    model: PathBuf,
    sha: String,
}

fn fixture() -> Fixture {
    let t = tmp();
    let model = t.path().join("model");
    demo_model(&model, 3);
    let hub = Hub::start();
    let sha = hub.publish("deepseek-ai/R1-tiny", "main", repo_files_from(&model), None);
    let cfg = write_config(t.path(), HF_LOOPBACK);
    Fixture {
        store: t.path().join("store"),
        _t: t,
        hub,
        cfg,
        model,
        sha,
    }
}

impl Fixture {
    fn pull(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut e = vec![("HF_ENDPOINT", self.hub.url.as_str())];
        e.extend_from_slice(env);
        pull_env(
            "hf://deepseek-ai/R1-tiny",
            name,
            &self.store,
            Some(&self.cfg),
            args,
            &e,
        )
    }

    fn lock_text(&self, name: &str) -> String {
        std::fs::read_to_string(active_dir(&self.store, name).join("moat.lock")).unwrap()
    }
}

#[test]
fn hf_pull_follows_the_cdn_redirect_pins_the_commit_and_keeps_the_token_on_the_hub() {
    let f = fixture();
    let o = f.pull("r1", &[], &[("HF_TOKEN", "hf_secret")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains(&f.sha), "{}", stdout(&o));
    assert!(promoted(&f.store, "r1"));
    let lock = f.lock_text("r1");
    assert!(lock.contains("source = \"hf://deepseek-ai/R1-tiny\""), "{lock}");
    assert!(lock.contains(&format!("revision = \"{}\"", f.sha)), "{lock}");
    let weights = std::fs::read(f.model.join("model.safetensors")).unwrap();
    assert!(lock.contains(&sha256_hex(&weights)));
    // JSON progress lines on a non-terminal stderr.
    assert!(stderr(&o).contains(r#""event":"progress","file":"model.safetensors""#));
    let log = f.hub.log();
    // LFS files came from the CDN, and the token never went there.
    assert!(log.iter().any(|l| l.server == "cdn"), "{log:?}");
    assert!(
        log.iter().filter(|l| l.server == "cdn").all(|l| !l.authorization),
        "{log:?}"
    );
    assert!(log.iter().filter(|l| l.server == "hub").all(|l| l.authorization));
    // The tree listing is paginated (two entries a page): all pages read.
    assert!(log.iter().any(|l| l.path.contains("cursor=")));

    // Same commit again: nothing to do.
    let o = f.pull("r1", &[], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("already in the store"));

    // --include / --exclude select files; excluded files are not fetched.
    let before = f.hub.log().len();
    let o = f.pull(
        "r1-json",
        &["--include", "*.json", "--exclude", "tokenizer*"],
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lock = f.lock_text("r1-json");
    assert!(lock.contains("config.json") && lock.contains("generation_config.json"));
    assert!(
        !lock.contains("tokenizer") && !lock.contains("safetensors"),
        "{lock}"
    );
    assert!(
        f.hub.log()[before..]
            .iter()
            .all(|l| !l.path.contains("safetensors") && !l.path.contains("/blob/")),
        "an excluded file was fetched"
    );

    // --locked with the lock just written: the same pull passes.
    let lock_file = active_dir(&f.store, "r1").join("moat.lock");
    let o = f.pull("r1", &["--locked", lock_file.to_str().unwrap()], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn hf_gated_repo_is_a_clear_refusal_until_the_token_is_right() {
    let f = fixture();
    f.hub.publish(
        "deepseek-ai/R1-tiny",
        "main",
        repo_files_from(&f.model),
        Some("hf_good"),
    );
    for env in [vec![], vec![("HF_TOKEN", "hf_wrong")]] {
        let o = f.pull("gated", &[], &env);
        assert_refused(&o, "hf://deepseek-ai/R1-tiny", "source.hf-auth");
        assert!(stderr(&o).contains("gated or private repo"), "{}", stderr(&o));
        assert!(!promoted(&f.store, "gated"));
    }
    let o = f.pull("gated", &[], &[("HF_TOKEN", "hf_good")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn hf_hash_size_and_missing_file_refusals_promote_nothing() {
    let f = fixture();
    f.hub.faults(|x| x.wrong_bytes = Some("model.safetensors".into()));
    let o = f.pull("bad", &[], &[]);
    assert_refused(&o, "model.safetensors", "integrity.sha256");
    assert!(stderr(&o).contains("expected"), "{}", stderr(&o));
    assert!(!promoted(&f.store, "bad"));

    f.hub.faults(|x| {
        x.wrong_bytes = None;
        x.size_delta = Some(("config.json".into(), -1));
    });
    let o = f.pull("bad", &[], &[]);
    assert_refused(&o, "config.json", "integrity.size");
    assert!(!promoted(&f.store, "bad"));

    f.hub.faults(|x| {
        x.size_delta = None;
        x.missing = Some("generation_config.json".into());
    });
    let o = f.pull("bad", &[], &[]);
    assert_refused(&o, "generation_config.json", "integrity.missing");
    assert!(!promoted(&f.store, "bad"));
    // Refusals leave no resumable folder behind.
    let q = std::fs::read_dir(f.store.join("quarantine")).unwrap().count();
    assert_eq!(q, 0, "quarantine not cleaned after refusals");
}

#[test]
fn hf_locked_refuses_an_extra_file_and_a_moved_revision() {
    let f = fixture();
    let o = f.pull("r1", &[], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lock = f.store.parent().unwrap().join("r1.lock");
    std::fs::copy(active_dir(&f.store, "r1").join("moat.lock"), &lock).unwrap();

    let mut files = repo_files_from(&f.model);
    files.push(RepoFile {
        path: "extra.json".into(),
        bytes: b"{}".to_vec(),
        lfs: false,
    });
    f.hub.publish("deepseek-ai/R1-tiny", "main", files, None);
    let o = f.pull(
        "r1-new",
        &["--revision", "main", "--locked", lock.to_str().unwrap()],
        &[],
    );
    assert_refused(&o, "extra.json", "locked.extra");
    assert!(stderr(&o).contains("locked.revision"), "{}", stderr(&o));
    assert!(!promoted(&f.store, "r1-new"));
    // Without --revision, --locked pulls the locked commit, which still passes.
    let o = f.pull("r1-pinned", &["--locked", lock.to_str().unwrap()], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn hf_connection_cut_mid_file_resumes_with_a_range_request() {
    let f = fixture();
    f.hub
        .faults(|x| x.cut = Some(("model.safetensors".into(), 100_000, 1)));
    let o = f.pull("r1", &[], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let log = f.hub.log();
    let ranged: Vec<_> = log.iter().filter_map(|l| l.range.clone()).collect();
    assert!(
        ranged.iter().any(|r| r == "bytes=100000-"),
        "no resume from byte 100000: {ranged:?}"
    );
    assert!(promoted(&f.store, "r1"));

    // A server that ignores Range: the file restarts from 0 and still passes.
    f.hub.faults(|x| {
        x.cut = Some(("model.safetensors".into(), 50_000, 1));
        x.ignore_range = true;
    });
    let o = f.pull("r1-b", &[], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // Truncated on every attempt: refused after the retries, nothing promoted.
    f.hub.faults(|x| {
        x.ignore_range = false;
        x.cut = Some(("model.safetensors".into(), 10_000, usize::MAX));
    });
    let o = f.pull("r1-c", &["--retries", "1"], &[]);
    assert_refused(&o, "model.safetensors", "integrity.truncated");
    assert!(!promoted(&f.store, "r1-c"));
}

#[test]
fn hf_redirect_to_a_disallowed_host_is_refused() {
    let f = fixture();
    // Same CDN server, but named `localhost`: no rule allows that host.
    let port = f.hub.cdn_url.rsplit(':').next().unwrap().to_owned();
    f.hub
        .faults(|x| x.redirect_override = Some(format!("http://localhost:{port}")));
    // Every file redirects there and downloads run in parallel, so which
    // file is refused first is a race; pulling one file makes it certain.
    let o = f.pull("r1", &["--include", "model.safetensors"], &[]);
    assert_refused(&o, "model.safetensors", "source.policy");
    assert!(stderr(&o).contains("localhost"), "{}", stderr(&o));
    assert!(
        !f.hub.log().iter().any(|l| l.server == "cdn"),
        "the disallowed host was contacted"
    );
    assert!(!promoted(&f.store, "r1"));
}

#[test]
fn loopback_private_and_metadata_addresses_are_refused_without_an_allowance() {
    let f = fixture();
    // Default policy (no config): the Hub fixture's host is not allowed.
    let o = pull_env(
        "hf://deepseek-ai/R1-tiny",
        "r1",
        &f.store,
        None,
        &[],
        &[("HF_ENDPOINT", &f.hub.url)],
    );
    assert_refused(&o, "hf://deepseek-ai/R1-tiny", "source.policy");
    // Host allowed, but no allow_private: the loopback address is refused.
    let cfg = write_config(
        f.store.parent().unwrap(),
        "[sources]\ndefaults = false\n[[sources.allow]]\nscheme = \"hf\"\nhost = \"127.0.0.1\"\nallow_http = true\n",
    );
    let o = pull_env(
        "hf://deepseek-ai/R1-tiny",
        "r1",
        &f.store,
        Some(&cfg),
        &[],
        &[("HF_ENDPOINT", &f.hub.url)],
    );
    assert_refused(&o, "hf://deepseek-ai/R1-tiny", "source.policy");
    assert!(stderr(&o).contains("loopback"), "{}", stderr(&o));
    // The cloud metadata addresses, under the default "any https host".
    for url in [
        "https://169.254.169.254/latest/manifest.json",
        "https://[fd00:ec2::254]/m.safetensors",
    ] {
        let o = pull_env(url, "meta", &f.store, None, &[], &[]);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains("source.policy"), "{}", stderr(&o));
        assert!(stderr(&o).contains("cloud metadata"), "{}", stderr(&o));
    }
    assert!(
        f.hub.log().is_empty(),
        "a refused source was contacted: {:?}",
        f.hub.log()
    );
    assert!(!promoted(&f.store, "r1"));
}

#[test]
fn hostile_file_names_in_a_listing_are_refused_before_anything_is_written() {
    let f = fixture();
    for bad in [
        "../../escaped.bin",
        "/tmp/absolute.bin",
        "a/../../b.bin",
        "dir\\..\\x.bin",
    ] {
        f.hub.faults(|x| x.extra_listing = vec![(bad.to_owned(), 4)]);
        let o = f.pull("evil", &[], &[]);
        assert_refused(&o, bad, "fs.path");
        assert!(!promoted(&f.store, "evil"));
    }
    assert!(!f.store.parent().unwrap().join("escaped.bin").exists());
    assert!(!Path::new("/tmp/absolute.bin").exists());
    // Nothing was downloaded at all.
    assert!(!f.hub.log().iter().any(|l| l.path.contains("/resolve/")));
}

#[test]
fn kill_9_during_a_throttled_pull_leaves_no_model_and_the_next_pull_resumes() {
    let f = fixture();
    // ~7 MB at 1 MB/s: plenty of time to kill it mid-file.
    f.hub.faults(|x| x.throttle = 1 << 20);
    let mut c = moat();
    c.env_remove("HF_TOKEN").env("HF_ENDPOINT", &f.hub.url);
    c.args([
        "pull",
        "hf://deepseek-ai/R1-tiny",
        "--name",
        "r1",
        "--store",
        f.store.to_str().unwrap(),
    ]);
    c.args(["--config", f.cfg.to_str().unwrap(), "--progress", "none"]);
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let part = || -> u64 {
        let Ok(q) = std::fs::read_dir(f.store.join("quarantine")) else {
            return 0;
        };
        q.flatten()
            .map(|d| d.path().join("parts/model.safetensors"))
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || part() > 500_000),
        "no partial file appeared"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let had = part();
    assert!(had > 0);
    assert!(!promoted(&f.store, "r1"), "a model appeared after kill -9");

    f.hub.faults(|x| x.throttle = 0);
    let before = f.hub.log().len();
    let o = f.pull("r1", &[], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let resumed = f.hub.log()[before..]
        .iter()
        .filter(|l| l.server == "cdn")
        .filter_map(|l| l.range.clone())
        .filter_map(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<u64>().ok())
        .any(|start| start > 0 && start <= had);
    assert!(resumed, "the second pull did not resume the partial file");
    assert!(promoted(&f.store, "r1"));
    assert_eq!(std::fs::read_dir(f.store.join("quarantine")).unwrap().count(), 0);
}

#[test]
fn https_manifest_is_refused_for_private_hosts_by_default() {
    let t = tmp();
    let store = t.path().join("store");
    let o = pull_env("http://127.0.0.1:9/m/manifest.json", "m", &store, None, &[], &[]);
    assert_refused(&o, "http://127.0.0.1:9/m/manifest.json", "source.policy");
    let o = pull_env(
        "https://example.invalid/x.safetensors",
        "m",
        &store,
        None,
        &[],
        &[],
    );
    // Not a refusal of the model: the name does not resolve (exit 2).
    assert_ne!(code(&o), 0);
}

/// A static file server on loopback (what a manifest's files sit behind):
/// serves `files` by path, logs every request line, 404 otherwise.
fn static_server(files: Vec<(String, Vec<u8>)>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            seen.lock().unwrap().push(line.trim_end().to_owned());
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut out = stream;
            match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => {
                    let _ = write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = out.write_all(body);
                }
                None => {
                    let _ = out.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    (base, log)
}

#[test]
fn https_manifest_pull_checks_every_file_against_the_manifest() {
    let t = tmp();
    let model = t.path().join("model");
    let o = run(&["demo-model", model.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut served = Vec::new();
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(&model).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).unwrap();
        entries.push(serde_json::json!({
            "path": name,
            "size": bytes.len(),
            "sha256": sha256_hex(&bytes),
            "url": format!("blobs/{name}"),
        }));
        served.push((format!("/m/blobs/{name}"), bytes));
    }
    let manifest = serde_json::json!({ "files": entries }).to_string().into_bytes();
    // The same manifest with one digest wrong.
    let mut lying: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    lying["files"][0]["sha256"] = serde_json::json!("0".repeat(64));
    let lied_about = lying["files"][0]["path"].as_str().unwrap().to_owned();
    served.push(("/m/manifest.json".into(), manifest));
    served.push(("/bad/manifest.json".into(), lying.to_string().into_bytes()));
    for (path, body) in served.clone() {
        if let Some(rest) = path.strip_prefix("/m/blobs/") {
            served.push((format!("/bad/blobs/{rest}"), body));
        }
    }
    let (base, log) = static_server(served);
    let cfg = write_config(
        t.path(),
        "[sources]\ndefaults = false\n[[sources.allow]]\nscheme = \"https\"\nhost = \"127.0.0.1\"\nallow_http = true\nallow_private = true\n",
    );
    let store = t.path().join("store");

    let url = format!("{base}/m/manifest.json");
    let o = pull_env(&url, "demo", &store, Some(&cfg), &[], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(promoted(&store, "demo"));
    let lock = std::fs::read_to_string(active_dir(&store, "demo").join("moat.lock")).unwrap();
    assert!(lock.contains(&url), "{lock}");
    assert!(
        log.lock().unwrap().iter().any(|l| l.starts_with("GET /m/blobs/")),
        "files were not fetched through the manifest's relative URLs"
    );

    // A digest that does not match the bytes: refused, naming the file.
    let o = pull_env(
        &format!("{base}/bad/manifest.json"),
        "bad",
        &store,
        Some(&cfg),
        &[],
        &[],
    );
    assert_refused(&o, &lied_about, "integrity");
    assert!(!promoted(&store, "bad"));
}

// ---------------------------------------------------------------- S3 (moto)

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOAT_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(std::env::var_os("HOME")?).join(".cache/moat/venv/bin/moto_server");
    p.exists().then_some(p)
}

/// moto with authentication on after `free` unauthenticated requests.
fn start_moto(free: u32) -> Option<Moto> {
    let Some(bin) = moto_binary() else {
        if std::env::var("MOAT_SKIP_S3_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: MOAT_SKIP_S3_TESTS=1 and no moto_server found");
            return None;
        }
        panic!(
            "moto_server not found: run scripts/test.sh, or set MOAT_MOTO_SERVER, or MOAT_SKIP_S3_TESTS=1 to skip"
        );
    };
    for _ in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", free.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Moto {
                    child,
                    url: format!("http://127.0.0.1:{port}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("moto_server did not start");
}

const S3_LOOPBACK: &str = r#"
[sources]
defaults = false
[[sources.allow]]
scheme = "s3"
host = "127.0.0.1"
prefix = "models"
allow_http = true
allow_private = true
[[sources.allow]]
scheme = "s3"
host = "127.0.0.1"
prefix = "kms-models"
allow_http = true
allow_private = true
"#;

#[test]
fn s3_private_bucket_sigv4_credentials_chain_and_sse_kms() {
    let Some(moto) = start_moto(3) else { return };
    let t = tmp();
    let model = t.path().join("model");
    demo_model(&model, 4);
    let python = moto_binary().unwrap().parent().unwrap().join("python");
    let setup = // The folder at run time (cargo sets it for tests): a test binary reused
    // from a build in another checkout must not read that checkout's files.
    std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("tests/fixtures/moto_s3_setup.py");
    let out = Command::new(&python)
        .arg(&setup)
        .args([&moto.url, "models", model.to_str().unwrap(), "kms-models"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = keys["access_key_id"].as_str().unwrap().to_owned();
    let secret = keys["secret_access_key"].as_str().unwrap().to_owned();
    let role = keys["role_arn"].as_str().unwrap().to_owned();

    let store = t.path().join("store");
    let cfg = write_config(t.path(), S3_LOOPBACK);
    let base = [
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_REGION", "us-east-1"),
    ];
    let with = |extra: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        base.iter()
            .chain(extra.iter())
            .map(|(k, v)| (*k, v.to_string()))
            .collect()
    };
    let s3 = |name: &str, source: &str, env: Vec<(&'static str, String)>, args: &[&str]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        pull_env(source, name, &store, Some(&cfg), args, &env)
    };

    // An unsigned request is refused by the bucket itself…
    let agent =
        ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let anon = agent
        .get(format!("{}/models/model/config.json", moto.url))
        .call()
        .unwrap();
    assert_ne!(anon.status().as_u16(), 200, "the bucket is readable anonymously");
    // …and moat will not go anonymous unless told to.
    let o = s3("anon", "s3://models/model", with(&[]), &[]);
    assert_refused(&o, "s3://models/model", "source.s3-auth");
    assert!(stderr(&o).contains("no AWS credentials"), "{}", stderr(&o));

    // Wrong secret, unknown key with a session token: refused, named.
    let o = s3(
        "wrong",
        "s3://models/model",
        with(&[
            ("AWS_ACCESS_KEY_ID", &id),
            ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
        ]),
        &[],
    );
    assert_refused(&o, "s3://models/model", "source.s3-auth");
    assert!(stderr(&o).contains("SignatureDoesNotMatch"), "{}", stderr(&o));
    // moto does not expire session tokens; a revoked/unknown temporary key
    // is what an expired one looks like to S3 (InvalidAccessKeyId/ExpiredToken).
    let o = s3(
        "expired",
        "s3://models/model",
        with(&[
            ("AWS_ACCESS_KEY_ID", "ASIAEXPIREDEXAMPLE00"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("AWS_SESSION_TOKEN", "expired-token"),
        ]),
        &[],
    );
    assert_refused(&o, "s3://models/model", "source.s3-auth");
    for n in ["anon", "wrong", "expired"] {
        assert!(!promoted(&store, n));
    }

    // The right key: pulled, hashed, locked.
    let o = s3(
        "r1",
        "s3://models/model",
        with(&[("AWS_ACCESS_KEY_ID", &id), ("AWS_SECRET_ACCESS_KEY", &secret)]),
        &["--jobs", "3"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lock = std::fs::read_to_string(active_dir(&store, "r1").join("moat.lock")).unwrap();
    assert!(lock.contains("revision = \"s3-sha256:"), "{lock}");
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    assert!(lock.contains(&sha256_hex(&weights)));

    // The same key from a profile in a shared credentials file.
    let creds = t.path().join("aws-credentials");
    std::fs::write(
        &creds,
        format!("[ci]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    let o = s3(
        "r1-profile",
        "s3://models/model",
        with(&[
            ("AWS_PROFILE", "ci"),
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
        ]),
        &[
            "--locked",
            active_dir(&store, "r1").join("moat.lock").to_str().unwrap(),
        ],
    );
    // The lock names the source; a lock for s3://models/model/ pins it.
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // SSE-KMS objects: S3 decrypts on GET; the bytes are the model's.
    let o = s3(
        "r1-kms",
        "s3://kms-models/model",
        with(&[("AWS_ACCESS_KEY_ID", &id), ("AWS_SECRET_ACCESS_KEY", &secret)]),
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let kms_lock = std::fs::read_to_string(active_dir(&store, "r1-kms").join("moat.lock")).unwrap();
    assert!(kms_lock.contains(&sha256_hex(&weights)));

    // A bucket the policy does not name.
    let o = s3(
        "other",
        "s3://other-bucket/model",
        with(&[("AWS_ACCESS_KEY_ID", &id), ("AWS_SECRET_ACCESS_KEY", &secret)]),
        &[],
    );
    assert_refused(&o, "s3://other-bucket/model", "source.policy");

    // Web identity (EKS IRSA): STS AssumeRoleWithWebIdentity, then SigV4
    // with the temporary key. STS's call is unsigned, so moto must let
    // exactly one request through unauthenticated.
    let token = t.path().join("web-identity-token");
    std::fs::write(&token, "eyJhbGciOiJub25lIn0.e30.").unwrap();
    let reset = agent
        .post(format!("{}/moto-api/reset-auth", moto.url))
        .header("content-type", "text/plain")
        .send("1")
        .unwrap();
    assert_eq!(reset.status().as_u16(), 200);
    let o = s3(
        "r1-irsa",
        "s3://models/model",
        with(&[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token.to_str().unwrap()),
            ("AWS_ROLE_ARN", &role),
        ]),
        &[],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(promoted(&store, "r1-irsa"));
}
