//! Flags and subcommands, and the small amount of glue per verb.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use moat_artifact::crypto::KeyringFile;
use moat_artifact::download::{DownloadOptions, ProgressMode};
use moat_artifact::policy::SignaturePolicy;
use moat_artifact::pull::{PullOutcome, PullRequest, pull};
use moat_artifact::source::Env;
use moat_artifact::source::policy::SourcePolicy;
use moat_artifact::{Store, verify};
use moat_engine::demo::{DemoOptions, Preset, WeightDtype, write_demo_model};
use moat_guard::keys::{Role, parse_duration};
use moat_server::config::{Config, RawConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "A secure, self-hosted model server for open-weight LLMs"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Args, Clone)]
pub struct StoreArg {
    /// Store root (default: $MOAT_HOME, else ~/.local/share/moat).
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

impl StoreArg {
    pub fn root(&self) -> Result<PathBuf> {
        Store::default_root(self.store.as_deref(), |k| std::env::var(k).ok())
            .context("no store: pass --store DIR or set $MOAT_HOME")
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured models (OpenAI-compatible API).
    Serve(ServeArgs),
    /// Fetch a model, hash, scan and promote it into the trusted store.
    Pull {
        /// Model source: file://DIR, s3://BUCKET/PREFIX, hf://ORG/REPO,
        /// https://HOST/…/manifest.json or https://HOST/FILE.
        source: String,
        #[arg(long)]
        name: String,
        /// hf:// only: branch, tag or commit (default main; with --locked,
        /// the locked commit).
        #[arg(long)]
        revision: Option<String>,
        /// Replace an existing model of the same name (atomically).
        #[arg(long)]
        replace: bool,
        /// Only files matching this glob (repeatable; `*` matches `/` too).
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        /// Skip files matching this glob (repeatable).
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Refuse any difference from this lock file (a `moat.lock`):
        /// missing, extra, resized or re-hashed files.
        #[arg(long, value_name = "FILE")]
        locked: Option<PathBuf>,
        /// Files downloaded in parallel.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Extra attempts per file after a connection error, 5xx or
        /// truncation (exponential backoff with jitter).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=20))]
        retries: u32,
        /// Progress output: bars on a terminal, JSON lines on stderr
        /// otherwise (auto), or none.
        #[arg(long, default_value = "auto", value_parser = ["auto", "bars", "json", "none"])]
        progress: String,
        /// Store the files encrypted (chunked AES-256-GCM under the keyring;
        /// also on with `[store] encrypt = true` in --config).
        #[arg(long)]
        encrypt: bool,
        /// Keyring for --encrypt (default: the config's [encryption]
        /// keyring, else <store>/keyring.json).
        #[arg(long, value_name = "FILE")]
        keyring: Option<PathBuf>,
        #[command(flatten)]
        signature: SignaturePolicyArgs,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Stored models and their versions: list, show, rm, gc.
    Models {
        #[command(subcommand)]
        cmd: crate::models_cmd::ModelsCommand,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Re-hash a stored model (NAME) or a model folder (PATH) against its lock.
    Verify {
        target: String,
        /// Keyring to decrypt an encrypted version (default: the config's
        /// [encryption] keyring, else <store>/keyring.json).
        #[arg(long, value_name = "FILE")]
        keyring: Option<PathBuf>,
        #[command(flatten)]
        signature: SignaturePolicyArgs,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Scan files or folders for unsafe content.
    Scan {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = "text", value_parser = ["text", "json", "sarif"])]
        format: String,
    },
    /// Manage API keys and the key-encryption keys of encryption at rest.
    Keys {
        #[command(subcommand)]
        cmd: KeysCommand,
        /// Keys file (default: the config's keys_file, else <store>/keys.json).
        #[arg(long, global = true, value_name = "FILE")]
        keys_file: Option<PathBuf>,
        /// Config file: its keys file, [encryption] keyring and [audit] log
        /// (changes are then audit records on the server's chain).
        #[arg(long, global = true, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Sign a model (OpenSSF model signing; compatible with `model_signing`).
    Sign {
        #[command(subcommand)]
        cmd: crate::signing_cmd::SignCommand,
    },
    /// Check a model against an OpenSSF model signature (0 valid, 1 invalid).
    VerifySignature {
        #[command(subcommand)]
        cmd: crate::signing_cmd::VerifySignatureCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: crate::audit_cmd::AuditCommand,
    },
    /// Write a random-weight Qwen2 model in Hugging Face layout, or as one
    /// self-contained GGUF file (`--gguf TYPE`).
    DemoModel {
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "tiny", value_parser = ["tiny", "r1-distill-qwen-1.5b"])]
        preset: String,
        /// Weight dtype (default: f32 for tiny, bf16 for the 1.5B preset).
        #[arg(long, value_parser = ["f32", "f16", "bf16"], conflicts_with = "gguf")]
        dtype: Option<String>,
        /// Write `model.gguf` with weight matrices in this encoding (rows
        /// not a whole number of its blocks fall back to Q8_0), tokenizer and
        /// chat template in its metadata.
        #[arg(long, value_parser = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k"])]
        gguf: Option<String>,
    },
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML; see docs/config.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration and exit (0 valid, 2 invalid).
    #[arg(long)]
    pub check: bool,
    /// Generate, pull and serve a demo model with a fresh admin key, in a
    /// temporary folder. Fully offline.
    #[arg(long, conflicts_with_all = ["config", "check"])]
    pub demo: bool,
    /// Override inference.listen (e.g. 127.0.0.1:0 for any free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Override metrics.listen.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Demo only: the seed of the generated model.
    #[arg(long, default_value_t = 0, requires = "demo")]
    pub seed: u64,
}

/// Who must have signed a model (pull, verify): from `--config` (the
/// model's `[models.signature]`) or from these flags, which take precedence.
#[derive(Args)]
pub struct SignaturePolicyArgs {
    /// Config file whose `[[models]]` entry of the same name gives the
    /// signature policy, and whose `[sources]` gives the allowed sources
    /// (pull).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Require a signature by this EC public key (PEM).
    #[arg(long, value_name = "PEM", conflicts_with = "certificate_chain")]
    pub public_key: Option<PathBuf>,
    /// Require a certificate signature chaining to these certificates (PEM).
    #[arg(long, value_name = "PEM", num_args = 1..)]
    pub certificate_chain: Vec<PathBuf>,
    /// Certificate signatures: required identity (a SAN such as
    /// `email:release@vendor.example`, or the subject).
    #[arg(long, requires = "certificate_chain")]
    pub certificate_identity: Option<String>,
    /// Certificate signatures: required issuer (RFC 4514 name).
    #[arg(long, requires = "certificate_chain")]
    pub certificate_issuer: Option<String>,
    /// Model-relative path of the signature (default model.sig).
    #[arg(long, value_name = "PATH")]
    pub signature_file: Option<String>,
}

impl SignaturePolicyArgs {
    fn policy(self, name: &str) -> Result<Option<SignaturePolicy>> {
        if self.public_key.is_some() || !self.certificate_chain.is_empty() {
            let policy = SignaturePolicy::from_files(
                self.public_key.as_deref(),
                &self.certificate_chain,
                self.certificate_identity,
                self.certificate_issuer,
                self.signature_file,
            )?;
            return Ok(Some(policy));
        }
        if self.certificate_identity.is_some()
            || self.certificate_issuer.is_some()
            || self.signature_file.is_some()
        {
            bail!(
                "--certificate-identity, --certificate-issuer and --signature-file need --public-key or --certificate-chain"
            );
        }
        let Some(path) = self.config else { return Ok(None) };
        let raw = RawConfig::read(&path)?;
        for (i, m) in raw.models.into_iter().enumerate() {
            if m.name == name {
                return match m.signature {
                    Some(sig) => Ok(Some(sig.into_policy(&format!("models[{i}].signature"))?)),
                    None => Ok(None),
                };
            }
        }
        Ok(None)
    }
}

/// `moat keys create` limit flags (each optional; absent is "no limit
/// beyond the role's").
#[derive(Args, Default)]
struct KeyLimitArgs {
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u64>,
    /// Requests that may arrive back to back (needs --rpm).
    #[arg(long)]
    burst: Option<u64>,
    /// Completion tokens per minute (reserved at admission as max_tokens).
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests in flight at once.
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Largest max_tokens one request may ask for.
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Largest n (choices) one request may ask for.
    #[arg(long)]
    max_n: Option<u32>,
}

impl KeyLimitArgs {
    fn limits(&self) -> moat_guard::KeyLimits {
        moat_guard::KeyLimits {
            requests_per_minute: self.rpm,
            burst: self.burst,
            tokens_per_minute: self.tpm,
            max_concurrent: self.max_concurrent,
            max_tokens: self.max_tokens,
            max_n: self.max_n,
        }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; the key is printed once and only its hash is stored.
    Create {
        /// Role: `admin`, `user`, or one defined by `[rbac.roles.NAME]`.
        /// With --config the role must be defined there; without it any
        /// well-formed name (a-z, then a-z 0-9 _ -, at most 32) is accepted,
        /// and a server whose config does not define the role refuses the
        /// key everything.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// Models the key may use (comma-separated; default all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Lifetime, e.g. 30d, 12h.
        #[arg(long)]
        expires: Option<String>,
        /// This key's own limits; the tighter of these and the role's
        /// `[rate_limits]` apply.
        #[command(flatten)]
        limits: KeyLimitArgs,
    },
    /// List keys (ids, roles, scopes; never secrets).
    List,
    /// Revoke a key by id; a running server stops accepting it within a second.
    Revoke { id: String },
    /// TOTP step-up for management writes: enrol or remove a principal.
    Totp {
        #[command(subcommand)]
        cmd: TotpCommand,
        /// Enrolments file (default: <store>/totp.json, as
        /// management.totp_file).
        #[arg(long, global = true, value_name = "FILE")]
        totp_file: Option<PathBuf>,
    },
    /// Seal the keys file under the keyring ([encryption] keyring), or
    /// reseal it under the current KEK version.
    Encrypt,
    // Key-encryption keys for encryption at rest: rotate-kek, rewrap, retire-kek, list-keks.
    #[command(flatten)]
    Kek(crate::crypto_cmd::KekCommand),
}

#[derive(Subcommand)]
enum TotpCommand {
    /// Enrol a principal: prints the otpauth:// URI and a QR code once;
    /// the secret is kept only in the enrolments file (0600).
    Enroll {
        /// An API key id (from `moat keys list`).
        #[arg(long, conflicts_with = "principal", required_unless_present = "principal")]
        key: Option<String>,
        /// Any other principal, as the server names it (`jwt:ISSUER#SUB`,
        /// `mtls:NAME`).
        #[arg(long)]
        principal: Option<String>,
    },
    /// Remove a principal's enrolment.
    Remove {
        #[arg(long, conflicts_with = "principal", required_unless_present = "principal")]
        key: Option<String>,
        #[arg(long)]
        principal: Option<String>,
    },
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Command::Serve(args) => serve(args),
        Command::Pull {
            source,
            name,
            revision,
            replace,
            include,
            exclude,
            locked,
            jobs,
            retries,
            progress,
            encrypt,
            keyring,
            signature,
            store,
        } => {
            let root = store.root()?;
            let mut keyring_path = KeyringFile::default_path(&root);
            let mut encrypt = encrypt;
            let policy = match &signature.config {
                Some(path) => {
                    let raw = RawConfig::read(path)?;
                    let enc = raw.encryption(&root);
                    encrypt |= enc.encrypt_store;
                    keyring_path = enc.keyring;
                    raw.sources
                        .validate("sources")
                        .map_err(|(key, message)| anyhow::anyhow!("{}: {key}: {message}", path.display()))?
                }
                None => SourcePolicy::default(),
            };
            let keyring_path = keyring.unwrap_or(keyring_path);
            let locked = match locked {
                Some(p) => Some(moat_artifact::Lock::read(&p)?),
                None => None,
            };
            let signature = signature.policy(&name)?;
            if let Some(p) = &signature {
                eprintln!("moat: requiring a signature by {} in {}", p.describe(), p.file);
            }
            let mut store = Store::open(&root).context("cannot open the store")?;
            if encrypt {
                let keyring = moat_artifact::crypto::load_keyring(&keyring_path, |k| std::env::var(k).ok())?;
                eprintln!(
                    "moat: storing encrypted under KEK version {} of {}",
                    keyring.current_version(),
                    keyring_path.display()
                );
                store = store.with_keyring(keyring);
            }
            let req = PullRequest {
                source,
                name,
                revision,
                replace,
                signature,
                policy,
                env: Env::process(),
                include,
                exclude,
                locked,
                download: DownloadOptions {
                    jobs: usize::from(jobs),
                    retries,
                    progress: match progress.as_str() {
                        "bars" => ProgressMode::Bars,
                        "json" => ProgressMode::Json,
                        "none" => ProgressMode::Quiet,
                        _ => ProgressMode::Auto,
                    },
                    ..DownloadOptions::default()
                },
            };
            Ok(report_pull(pull(&store, &req)))
        }
        Command::Models { cmd, store } => crate::models_cmd::run(cmd, &store),
        Command::Verify {
            target,
            keyring,
            signature,
            store,
        } => verify_cmd(&target, keyring, signature, &store),
        Command::Scan { paths, format } => {
            let report = moat_scan::scan_paths(&paths);
            print!(
                "{}",
                match format.as_str() {
                    "json" => report.to_json() + "\n",
                    "sarif" => report.to_sarif() + "\n",
                    _ => report.to_text(),
                }
            );
            Ok(ExitCode::from(if report.summary.errors > 0 {
                2
            } else if report.summary.unsafe_files > 0 {
                1
            } else {
                0
            }))
        }
        Command::Keys {
            cmd: KeysCommand::Totp { cmd, totp_file },
            keys_file,
            config,
            store,
        } => {
            let ctx = crate::crypto_cmd::context(config.as_deref(), keys_file, &store)?;
            let totp_path = match totp_file {
                Some(p) => p,
                None => store.root()?.join("totp.json"),
            };
            totp(cmd, &ctx, &totp_path)
        }
        Command::Keys {
            cmd,
            keys_file,
            config,
            store,
        } => {
            let ctx = crate::crypto_cmd::context(config.as_deref(), keys_file, &store)?;
            match cmd {
                KeysCommand::Kek(cmd) => crate::crypto_cmd::run(cmd, &store, &ctx),
                cmd => keys(cmd, &ctx),
            }
        }
        Command::Sign { cmd } => crate::signing_cmd::sign(cmd),
        Command::VerifySignature { cmd } => crate::signing_cmd::verify(cmd),
        Command::Audit { cmd } => crate::audit_cmd::run(cmd),
        Command::DemoModel {
            dir,
            seed,
            preset,
            dtype,
            gguf,
        } => {
            let gguf = gguf.map(|g| {
                moat_engine::cpu::quant::QType::ALL
                    .into_iter()
                    .find(|t| t.name().eq_ignore_ascii_case(&g))
                    .ok_or_else(|| anyhow::anyhow!("unknown GGUF type {g}"))
            });
            let opts = DemoOptions {
                gguf: gguf.transpose()?,
                seed,
                preset: preset.parse::<Preset>().map_err(anyhow::Error::msg)?,
                dtype: dtype
                    .map(|d| d.parse::<WeightDtype>())
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
            };
            let summary = write_demo_model(&dir, &opts)?;
            for (name, size) in &summary.files {
                println!("{size:>14}  {name}");
            }
            println!(
                "wrote a {} model ({} parameters) to {}",
                preset,
                summary.parameters,
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report_pull(result: Result<PullOutcome, moat_artifact::PullError>) -> ExitCode {
    match result {
        Ok(PullOutcome::Promoted { lock, dir, replaced }) => {
            let size: u64 = lock.files.iter().map(|f| f.size).sum();
            println!(
                "pulled {} ({} files, {size} bytes) at {}{} into {}",
                lock.name,
                lock.files.len(),
                lock.revision,
                if replaced {
                    ", replacing the previous version"
                } else {
                    ""
                },
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(PullOutcome::AlreadyPresent { lock, dir }) => {
            println!(
                "{} is already in the store at {} ({})",
                lock.name,
                lock.revision,
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.is_refusal() => {
            if let moat_artifact::PullError::Refused(list) = &e {
                for r in list {
                    eprintln!("moat: refused: {}: {}: {}", r.file, r.rule, r.message);
                }
            }
            eprintln!("moat: pull refused; the store is unchanged");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("moat: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The keyring for an encrypted version folder: `--keyring`, else the
/// config's `[encryption] keyring`, else `<store>/keyring.json`; `None`
/// for a plain folder (no keyring is loaded then).
fn verify_keyring(
    dir: &Path,
    flag: Option<PathBuf>,
    config: Option<&Path>,
    store: &StoreArg,
) -> Result<Option<moat_artifact::crypto::Keyring>> {
    if !dir.join(moat_artifact::store::ENCRYPTED_MARKER).exists() {
        return Ok(None);
    }
    let path = match (flag, config) {
        (Some(p), _) => p,
        (None, Some(c)) => RawConfig::read(c)?.encryption(&store.root()?).keyring,
        (None, None) => KeyringFile::default_path(&store.root()?),
    };
    let keyring = moat_artifact::crypto::load_keyring(&path, |k| std::env::var(k).ok())
        .with_context(|| format!("{} holds encrypted files", dir.display()))?;
    Ok(Some(keyring))
}

fn verify_cmd(
    target: &str,
    keyring: Option<PathBuf>,
    signature: SignaturePolicyArgs,
    store: &StoreArg,
) -> Result<ExitCode> {
    let dir = if target.contains('/') || Path::new(target).is_dir() {
        PathBuf::from(target)
    } else {
        let name = moat_artifact::name::ModelName::parse(target)?;
        let store = Store::open(&store.root()?).context("cannot open the store")?;
        // The active version (`models/NAME/current`).
        store.model_dir(&name)?
    };
    let keyring = verify_keyring(&dir, keyring, signature.config.as_deref(), store)?;
    let started = std::time::Instant::now();
    match verify::verify_dir_with(&dir, keyring.as_ref()) {
        Ok(lock) => {
            let bytes: u64 = lock.files.iter().map(|f| f.size).sum();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "ok: {} ({} files, {bytes} bytes) matches its lock at {} [{:.0} MB/s]",
                lock.name,
                lock.files.len(),
                lock.revision,
                bytes as f64 / 1e6 / secs.max(1e-9)
            );
            let Some(policy) = signature.policy(&lock.name)? else {
                return Ok(ExitCode::SUCCESS);
            };
            // Only a signature file the lock lists (and so just verified) counts.
            let bundle = match lock.file(&policy.file) {
                Some(_) => {
                    let path = dir.join(moat_artifact::store::FILES_DIR).join(&policy.file);
                    let bytes = std::fs::read(&path)?;
                    Some(match &keyring {
                        Some(k) => moat_artifact::crypto::open(k, &bytes)
                            .with_context(|| format!("{}", path.display()))?,
                        None => bytes,
                    })
                }
                None => None,
            };
            match policy.check(bundle.as_deref(), &lock.files) {
                Ok(v) => {
                    println!("ok: signed by {} ({} files covered)", v.signer, v.file_count());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!(
                        "moat: signature policy ({}): {}: {e}",
                        policy.describe(),
                        e.rule()
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
        Err(verify::VerifyError::Mismatch { mismatches, .. }) => {
            for m in &mismatches {
                eprintln!("moat: mismatch: {m}");
            }
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

fn keys(cmd: KeysCommand, ctx: &moat_server::config::CliContext) -> Result<ExitCode> {
    use moat_audit::{Outcome, action};
    let mut encryption = ctx.encryption.clone();
    if matches!(cmd, KeysCommand::Encrypt) {
        encryption.encrypt_keys_file = true;
    }
    let store = &moat_server::at_rest::key_store(&ctx.keys_file, &encryption).map_err(anyhow::Error::msg)?;
    match cmd {
        KeysCommand::Create {
            role,
            models,
            expires,
            limits,
        } => {
            let role = Role::new(&role)?;
            match &ctx.rbac {
                Some(rbac) if !rbac.is_defined(&role) => bail!(
                    "role {role} is not defined in the config's [rbac] (defined: {}); \
                     add [rbac.roles.{role}] first",
                    rbac.names()
                ),
                Some(_) => {}
                None if role.is_admin() || role == Role::user() => {}
                None => eprintln!(
                    "moat: note: no --config, so role {role} was not checked against [rbac]; \
                     a server whose config does not define it refuses this key everything"
                ),
            }
            for m in &models {
                moat_artifact::name::ModelName::parse(m)?;
            }
            let ttl = expires.as_deref().map(parse_duration).transpose()?;
            let limits = limits.limits();
            // Checked before the key exists, so a bad flag creates nothing.
            limits
                .validate()
                .map_err(|e| anyhow::anyhow!("key limits: {e}"))?;
            let key = store.create_with(role, models, ttl, Some(limits))?;
            eprintln!(
                "created key {} ({}); it is shown once, store it now:",
                key.record.id, key.record.role
            );
            println!("{}", key.secret);
            crate::crypto_cmd::audit(
                ctx,
                action::KEY_CREATE,
                key.record.id.clone(),
                Outcome::Ok,
                Some(format!(
                    "role {}, models {}",
                    key.record.role,
                    if key.record.models.is_empty() {
                        "*".to_owned()
                    } else {
                        key.record.models.join(",")
                    }
                )),
            )?;
        }
        KeysCommand::List => {
            let now = moat_guard::keys::now_unix();
            let records = store.records()?;
            // Custom role names are up to 32 characters; keep columns aligned.
            let w = records
                .iter()
                .map(|k| k.role.as_str().len())
                .max()
                .unwrap_or(0)
                .max(5);
            println!(
                "{:<16}  {:<w$}  {:<9}  {:<20}  {:<24}  limits",
                "id", "role", "state", "expires", "models"
            );
            for k in records {
                let state = if k.revoked.is_some() {
                    "revoked"
                } else if k.expires.is_some_and(|e| now >= e) {
                    "expired"
                } else if ctx.rbac.as_ref().is_some_and(|r| !r.is_defined(&k.role)) {
                    // The config given defines no such role: the key is
                    // refused everything until it does.
                    "no-role"
                } else {
                    "active"
                };
                let expires = k.expires.map_or("never".to_owned(), |e| {
                    moat_audit::rfc3339_millis(u128::from(e) * 1000)
                });
                let models = if k.models.is_empty() {
                    "*".to_owned()
                } else {
                    k.models.join(",")
                };
                let limits = k.limits.unwrap_or_default();
                println!(
                    "{:<16}  {:<w$}  {state:<9}  {expires:<20}  {models:<24}  {limits}",
                    k.id,
                    k.role.as_str()
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let rec = store.revoke(&id)?;
            println!("revoked {}", rec.id);
            crate::crypto_cmd::audit(ctx, action::KEY_REVOKE, rec.id, Outcome::Ok, None)?;
        }
        KeysCommand::Encrypt => {
            let n = store.reseal()?;
            println!(
                "{}: sealed ({n} keys) under {}; set [encryption] encrypt_keys_file = true so writes stay sealed",
                store.path().display(),
                encryption.keyring.display()
            );
            crate::crypto_cmd::audit(
                ctx,
                action::KEYS_ENCRYPT,
                store.path().display().to_string(),
                Outcome::Ok,
                None,
            )?;
        }
        KeysCommand::Kek(_) => bail!("KEK commands are dispatched before the keys file is opened"),
        KeysCommand::Totp { .. } => bail!("TOTP commands are dispatched before the keys file is opened"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `moat keys totp enroll|remove`. A key id must exist in the keys file
/// (a typo would otherwise enrol a principal nobody is).
fn totp(cmd: TotpCommand, ctx: &moat_server::config::CliContext, path: &Path) -> Result<ExitCode> {
    use moat_audit::{Outcome, action};
    use moat_guard::totp::{TotpStore, otpauth_uri, qr_for_terminal};
    let keys =
        &moat_server::at_rest::key_store(&ctx.keys_file, &ctx.encryption).map_err(anyhow::Error::msg)?;
    let principal = |key: Option<String>, principal: Option<String>| -> Result<String> {
        match (key, principal) {
            (Some(id), _) => {
                if !keys.records()?.iter().any(|k| k.id == id) {
                    bail!("no key with id {id:?} in {}", keys.path().display());
                }
                Ok(id)
            }
            (None, Some(p)) if !p.trim().is_empty() => Ok(p),
            _ => bail!("give --key ID or --principal NAME"),
        }
    };
    let mut store = TotpStore::load(path)?;
    let now = moat_guard::keys::now_unix();
    match cmd {
        TotpCommand::Enroll { key, principal: p } => {
            let who = principal(key, p)?;
            let secret = store.enroll(&who, now)?;
            let uri = otpauth_uri("moat", &who, &secret);
            eprintln!(
                "enrolled {who} in {}; scan the code or add the URI to an authenticator app now, it is not shown again:",
                path.display()
            );
            if let Some(qr) = qr_for_terminal(&uri) {
                println!("{qr}");
            }
            println!("{uri}");
            crate::crypto_cmd::audit(ctx, action::TOTP_ENROL, who, Outcome::Ok, None)?;
        }
        TotpCommand::Remove { key, principal: p } => {
            let who = match (key, p) {
                (Some(id), _) => id,
                (None, Some(p)) => p,
                (None, None) => bail!("give --key ID or --principal NAME"),
            };
            if !store.remove(&who, now)? {
                eprintln!("moat: {who} has no TOTP enrolment in {}", path.display());
                return Ok(ExitCode::from(1));
            }
            println!("removed the TOTP enrolment of {who}");
            crate::crypto_cmd::audit(ctx, action::TOTP_ENROL, who, Outcome::Ok, Some("removed".into()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn load_serve_config(
    args: &ServeArgs,
    raw: RawConfig,
) -> Result<Config, moat_server::config::ConfigError> {
    let mut raw = raw;
    if let Some(l) = &args.listen {
        raw.inference.listen = Some(l.clone());
    }
    if let Some(l) = &args.metrics_listen {
        raw.metrics.listen = Some(l.clone());
    }
    raw.validate(Store::default_root(None, |k| std::env::var(k).ok()))
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    if args.demo {
        return crate::demo::serve_demo(&args);
    }
    let raw = match &args.config {
        Some(path) => RawConfig::read(path),
        None => Ok(RawConfig::default()),
    };
    let config = match raw.and_then(|raw| load_serve_config(&args, raw)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moat: config error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if args.check {
        println!(
            "config ok: {} model(s), inference on {}, metrics on {}, management {}",
            config.models.len(),
            config.inference_listen,
            config.metrics_listen,
            config
                .management
                .as_ref()
                .map_or_else(|| "off".to_owned(), |m| format!("on {}", m.listen))
        );
        return Ok(ExitCode::SUCCESS);
    }
    // SIGHUP re-reads the file with the same flags applied.
    let reread = args.config.clone().map(|path| {
        let args = args.clone();
        Box::new(move || {
            RawConfig::read(&path)
                .and_then(|raw| load_serve_config(&args, raw))
                .map_err(|e| e.to_string())
        }) as ConfigSource
    });
    run_server(&config, reread, |_, _| {})
}

/// Re-reads and validates the configuration file (on SIGHUP).
pub type ConfigSource = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Load models, bind, call `on_bound` with the real addresses, serve until
/// SIGINT/SIGTERM.
pub fn run_server(
    config: &Config,
    reread: Option<ConfigSource>,
    on_bound: impl FnOnce(std::net::SocketAddr, std::net::SocketAddr),
) -> Result<ExitCode> {
    let models = moat_server::load_models(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let bound = moat_server::bind(config).await?;
        on_bound(bound.inference_addr, bound.metrics_addr);
        // SIGHUP re-reads the keys file, the TLS certificates and the
        // configuration's reloadable sections at once (keys, certificates
        // and JWKS files are also re-read within a second of changing).
        let reload = bound.reload_handle();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading keys, TLS certificates and configuration");
                    match &reread {
                        None => reload.reload(),
                        Some(read) => {
                            let read = read.as_ref();
                            // A file read: off the async workers.
                            let config = tokio::task::block_in_place(read);
                            reload.reload_config("signal:SIGHUP", config);
                        }
                    }
                }
            });
        }
        moat_server::serve(config, models, bound, shutdown_signal()).await?;
        tracing::info!("shut down cleanly");
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
