//! Encryption at rest as the server and the CLI wire it: the keyring from
//! `[encryption] keyring` sealing the API-key file (moat-guard sees only a
//! [`FileCodec`]) and prompt/response captures. One place decides when the
//! keyring is needed, so a deployment without encryption never has to load
//! it (nor hold KMS credentials).

use crate::config::EncryptionConfig;
use moat_artifact::crypto::{self, Keyring};
use moat_guard::keys::{FileCodec, KeyStore};
use std::path::Path;
use std::sync::Arc;

/// The keys file's envelope: [`crypto::seal`] / [`crypto::open`] under the
/// keyring (a fresh data key per write, wrapped by the current KEK).
#[derive(Debug)]
pub enum KeyringCodec {
    /// A keyring loaded once (a CLI command).
    Loaded(Box<Keyring>),
    /// The keyring file read again on every use (the server): after
    /// `rotate-kek` reseals the keys file under a new version, or a version
    /// is retired, the running server follows without a restart. The keys
    /// file changes rarely, so the extra read costs nothing that matters.
    Reload(EncryptionConfig),
}

impl KeyringCodec {
    fn with<T>(&self, f: impl FnOnce(&Keyring) -> Result<T, crypto::CryptoError>) -> Result<T, String> {
        match self {
            KeyringCodec::Loaded(k) => f(k).map_err(|e| e.to_string()),
            KeyringCodec::Reload(enc) => f(&load_keyring(enc)?).map_err(|e| e.to_string()),
        }
    }
}

impl FileCodec for KeyringCodec {
    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
        self.with(|k| crypto::seal(k, plain))
    }
    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        self.with(|k| crypto::open(k, sealed))
    }
}

/// Load the configured keyring (KMS credentials from the process
/// environment when a version lives in AWS KMS).
pub fn load_keyring(enc: &EncryptionConfig) -> Result<Keyring, String> {
    crypto::load_keyring(&enc.keyring, |k| std::env::var(k).ok()).map_err(|e| e.to_string())
}

/// The API-key store at `keys_file`: sealed writes when
/// `encrypt_keys_file`, and able to open a sealed file either way. The
/// keyring is loaded only when one of the two needs it.
pub fn key_store(keys_file: &Path, enc: &EncryptionConfig) -> Result<KeyStore, String> {
    let store = KeyStore::new(keys_file);
    let sealed =
        moat_guard::keys::is_sealed(keys_file).map_err(|e| format!("{}: {e}", keys_file.display()))?;
    if !enc.encrypt_keys_file && !sealed {
        return Ok(store);
    }
    // Load once now so a missing or unreadable keyring fails the start.
    load_keyring(enc).map_err(|e| {
        format!(
            "{}: the keys file is (to be) encrypted, but the keyring cannot be loaded: {e}",
            keys_file.display()
        )
    })?;
    Ok(store.with_codec(Arc::new(KeyringCodec::Reload(enc.clone())), enc.encrypt_keys_file))
}
