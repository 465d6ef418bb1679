//! `moat sign` and `moat verify-signature`: OpenSSF model signing, with the
//! flags of the `model_signing` CLI (kebab-case; the tool's snake_case
//! spellings are accepted as aliases). Exit codes: 0 valid / signed, 1
//! signature invalid, 2 usage or I/O error.
//!
//! Paths given to `--ignore-paths` are resolved against the current folder,
//! as the tool does, and kept when they fall inside the model; the signature
//! file is ignored too when it lies inside the model.

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Args, Subcommand};
use moat_artifact::signing::{
    self, CertificateSigner, DEFAULT_SHARD_SIZE, DEFAULT_SIGNATURE_NAME, Method, PrivateKey, PublicKey,
    SignOptions, SignatureError, TrustRoots, VerifiedSignature, VerifyOptions,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct HashingArgs {
    /// Paths to leave out (files or folders, relative to the current folder).
    #[arg(long = "ignore-paths", value_name = "PATH", num_args = 1.., action = ArgAction::Append)]
    ignore_paths: Vec<PathBuf>,
    /// Leave out .git, .gitattributes, .github and .gitignore (default).
    #[arg(long, overrides_with = "no_ignore_git_paths")]
    ignore_git_paths: bool,
    /// Include the git paths.
    #[arg(long, overrides_with = "ignore_git_paths")]
    no_ignore_git_paths: bool,
    /// Follow symlinks to files (hashing the target's content) instead of
    /// refusing them.
    #[arg(long, alias = "allow_symlinks")]
    allow_symlinks: bool,
}

#[derive(Args)]
pub struct SignArgs {
    /// The model folder (or single model file).
    #[arg(value_name = "MODEL_DIR")]
    model: PathBuf,
    /// Where to write the signature (default: MODEL_DIR/model.sig).
    #[arg(long, value_name = "PATH")]
    signature: Option<PathBuf>,
    #[command(flatten)]
    hashing: HashingArgs,
    /// Sign shards of every file rather than whole files. Note: the
    /// model_signing 1.1 CLI verifies by files only, so only its Python API
    /// can check a sharded signature.
    #[arg(long)]
    use_shards: bool,
    /// Shard size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SHARD_SIZE, requires = "use_shards")]
    shard_size: u64,
    /// EC private key (P-256/384/521), PEM PKCS#8 or SEC1.
    #[arg(long, alias = "private_key", value_name = "KEY.pem")]
    private_key: PathBuf,
}

#[derive(Subcommand)]
pub enum SignCommand {
    /// Sign with a bare EC key; verify with its public key.
    Key(SignArgs),
    /// Sign with the key of a signing certificate; the bundle carries the
    /// certificate and chain, verify against a trusted root.
    Certificate {
        #[command(flatten)]
        args: SignArgs,
        /// The certificate of --private-key (PEM).
        #[arg(long, alias = "signing_certificate", value_name = "CERT.pem")]
        signing_certificate: PathBuf,
        /// Intermediate certificates to include (PEM; repeatable, several
        /// per file allowed).
        #[arg(long, alias = "certificate_chain", value_name = "CERT.pem", num_args = 1.., action = ArgAction::Append)]
        certificate_chain: Vec<PathBuf>,
    },
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The model folder (or single model file).
    #[arg(value_name = "MODEL_DIR")]
    model: PathBuf,
    /// The signature to check.
    #[arg(long, value_name = "PATH")]
    signature: PathBuf,
    #[command(flatten)]
    hashing: HashingArgs,
    /// Also require the signed model name (the folder name at signing time);
    /// the tool itself never checks it.
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,
}

#[derive(Subcommand)]
pub enum VerifySignatureCommand {
    /// Check a signature made with a bare EC key.
    Key {
        #[command(flatten)]
        args: VerifyArgs,
        /// The signer's public key (PEM SubjectPublicKeyInfo).
        #[arg(long, alias = "public_key", value_name = "PUB.pem")]
        public_key: PathBuf,
    },
    /// Check a certificate signature: the bundle's chain must lead to a
    /// self-signed certificate among the given ones.
    Certificate {
        #[command(flatten)]
        args: VerifyArgs,
        /// Trusted certificates (PEM; repeatable, several per file allowed).
        #[arg(long, alias = "certificate_chain", value_name = "CERT.pem", required = true, num_args = 1.., action = ArgAction::Append)]
        certificate_chain: Vec<PathBuf>,
    },
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn read_all(paths: &[PathBuf], what: &str) -> Result<String> {
    let mut all = String::new();
    for p in paths {
        all.push_str(&read_text(p, what)?);
        all.push('\n');
    }
    Ok(all)
}

/// Model-relative ignore paths: the given ones plus the signature file.
fn ignore_list(model: &Path, hashing: &HashingArgs, signature: &Path) -> Result<Vec<String>> {
    let cwd = std::env::current_dir().context("cannot read the current folder")?;
    let mut out = Vec::new();
    for p in hashing
        .ignore_paths
        .iter()
        .map(PathBuf::as_path)
        .chain([signature])
    {
        if let Some(rel) = signing::model_relative_path(model, p, &cwd)
            .with_context(|| format!("cannot resolve {}", model.display()))?
        {
            out.push(rel);
        }
    }
    Ok(out)
}

fn default_signature(model: &Path) -> PathBuf {
    if model.is_file() {
        model
            .parent()
            .unwrap_or(Path::new("."))
            .join(DEFAULT_SIGNATURE_NAME)
    } else {
        model.join(DEFAULT_SIGNATURE_NAME)
    }
}

/// Write next to the target, then rename: a reader never sees half a bundle.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn sign(cmd: SignCommand) -> Result<ExitCode> {
    let (args, certificate) = match cmd {
        SignCommand::Key(args) => (args, None),
        SignCommand::Certificate {
            args,
            signing_certificate,
            certificate_chain,
        } => (args, Some((signing_certificate, certificate_chain))),
    };
    let key = PrivateKey::from_pem(&read_text(&args.private_key, "private key")?)
        .with_context(|| format!("{}", args.private_key.display()))?;
    let signature = args
        .signature
        .clone()
        .unwrap_or_else(|| default_signature(&args.model));
    let opts = SignOptions {
        method: if args.use_shards {
            Method::Shards {
                shard_size: args.shard_size,
            }
        } else {
            Method::Files
        },
        ignore_paths: ignore_list(&args.model, &args.hashing, &signature)?,
        ignore_git_paths: !args.hashing.no_ignore_git_paths,
        allow_symlinks: args.hashing.allow_symlinks,
    };
    let (bundle, signer) = match certificate {
        None => {
            let signer = format!("key sha256:{}", key.public_key().hint());
            (signing::sign_key(&args.model, &key, &opts), signer)
        }
        Some((leaf, chain)) => {
            let signer = CertificateSigner::new(
                key,
                &read_text(&leaf, "signing certificate")?,
                &read_all(&chain, "certificate chain")?,
            )
            .with_context(|| format!("{}", leaf.display()))?;
            let bundle = signing::sign_certificate(&args.model, &signer, &opts);
            (bundle, format!("certificate {}", leaf.display()))
        }
    };
    let bundle = bundle.with_context(|| format!("cannot sign {}", args.model.display()))?;
    write_atomically(&signature, &bundle)?;
    println!(
        "signed {} with {signer}; wrote {}",
        args.model.display(),
        signature.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn verify_options(args: &VerifyArgs) -> Result<VerifyOptions> {
    Ok(VerifyOptions {
        ignore_paths: ignore_list(&args.model, &args.hashing, &args.signature)?,
        ignore_git_paths: !args.hashing.no_ignore_git_paths,
        allow_symlinks: args.hashing.allow_symlinks,
        expected_model_name: args.model_name.clone(),
    })
}

pub fn verify(cmd: VerifySignatureCommand) -> Result<ExitCode> {
    let (args, result) = match cmd {
        VerifySignatureCommand::Key { args, public_key } => {
            let key = PublicKey::from_pem(&read_text(&public_key, "public key")?)
                .with_context(|| format!("{}", public_key.display()))?;
            let bundle = read_bundle(&args.signature)?;
            let result = signing::verify_key(&args.model, &bundle, &key, &verify_options(&args)?);
            (args, result)
        }
        VerifySignatureCommand::Certificate {
            args,
            certificate_chain,
        } => {
            let roots = TrustRoots::from_pem(&read_all(&certificate_chain, "certificate chain")?)
                .context("--certificate-chain")?;
            let bundle = read_bundle(&args.signature)?;
            let result = signing::verify_certificate(&args.model, &bundle, &roots, &verify_options(&args)?);
            (args, result)
        }
    };
    report(&args, result)
}

fn read_bundle(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read signature {}", path.display()))
}

fn report(args: &VerifyArgs, result: Result<VerifiedSignature, SignatureError>) -> Result<ExitCode> {
    match result {
        Ok(v) => {
            let files = v.file_count();
            let shards = match v.serialization.method {
                Method::Shards { .. } => format!(" in {} shards", v.resources.len()),
                Method::Files => String::new(),
            };
            let name = if v.legacy {
                "(v0.2 signature: no model name)".to_owned()
            } else {
                format!("\"{}\"", v.model_name)
            };
            println!(
                "verified {name}: signed by {}; {files} file{}{shards}",
                v.signer,
                if files == 1 { "" } else { "s" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_invalid() => {
            eprintln!("moat: signature invalid: {e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => bail!("cannot check {}: {e}", args.model.display()),
    }
}
