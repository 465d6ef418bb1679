//! `moat serve --demo`: everything a first-time user needs, offline, in a
//! temporary folder: generate the `tiny` model, pull it (hash, scan, lock,
//! promote), mint an admin key, then serve it and print the two `export`
//! lines that make any OpenAI client work at once.

use crate::cli::{ServeArgs, load_serve_config, run_server};
use anyhow::{Context, Result, bail};
use moat_artifact::Store;
use moat_artifact::pull::{PullOutcome, PullRequest, pull};
use moat_engine::demo::{DemoOptions, Preset, write_demo_model};
use moat_guard::keys::{KeyStore, Role};
use moat_server::config::{RawConfig, RawModel};
use std::io::Write;
use std::process::ExitCode;

pub const DEMO_MODEL: &str = "demo";

pub fn serve_demo(args: &ServeArgs) -> Result<ExitCode> {
    let tmp = tempfile::Builder::new()
        .prefix("moat-demo-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    let src = tmp.path().join("source");
    let home = tmp.path().join("home");
    write_demo_model(
        &src,
        &DemoOptions {
            seed: args.seed,
            preset: Preset::Tiny,
            dtype: None,
            gguf: None,
        },
    )?;
    let store = Store::open(&home)?;
    let req = PullRequest {
        source: format!("file://{}", src.display()),
        name: DEMO_MODEL.into(),
        revision: None,
        replace: false,
        signature: None,
        ..PullRequest::default()
    };
    let lock = match pull(&store, &req)? {
        PullOutcome::Promoted { lock, .. } | PullOutcome::AlreadyPresent { lock, .. } => lock,
    };
    let key = KeyStore::new(home.join("keys.json")).create(Role::admin(), Vec::new(), None)?;
    let raw = RawConfig {
        home: Some(home.clone()),
        models: vec![RawModel {
            name: DEMO_MODEL.into(),
            ..RawModel::default()
        }],
        ..RawConfig::default()
    };
    let config = match load_serve_config(args, raw) {
        Ok(c) => c,
        Err(e) => bail!("{e}"),
    };
    run_server(&config, None, |inference, metrics| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "# moat demo: model {DEMO_MODEL:?} (tiny, seed {}) pulled at {} into {}\n\
             export OPENAI_BASE_URL=http://{inference}/v1\n\
             export OPENAI_API_KEY={}\n\
             # metrics: http://{metrics}/metrics (same key); Ctrl-C stops the demo and deletes its folder",
            args.seed,
            lock.revision,
            home.display(),
            key.secret
        );
        let _ = out.flush();
    })
}
