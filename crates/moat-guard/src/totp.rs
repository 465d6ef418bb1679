//! TOTP step-up (RFC 6238): a second factor for management writes.
//!
//! Parameters are the ones every authenticator app implements without
//! asking: HMAC-SHA1, 6 digits, 30-second steps (RFC 6238 §4, Google
//! Authenticator's key-uri format). SHA-1's collision weakness does not
//! matter for HMAC, and choosing another hash would make apps silently
//! compute wrong codes.
//!
//! A code is accepted for the current step and one step either side (clock
//! skew), compared in constant time, and **never twice**: the verifier
//! remembers, per principal, the last step it accepted and refuses that step
//! or any earlier one (RFC 6238 §5.2). Secrets live in a 0600 file written
//! atomically (`moat-fs`), base32 as in the `otpauth://` URI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// Seconds per step.
pub const STEP_SECS: u64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;
/// Steps accepted either side of the current one.
pub const SKEW_STEPS: u64 = 1;
/// Secret length in bytes (RFC 4226 §4 recommends 160 bits).
pub const SECRET_LEN: usize = 20;
/// Wrong codes a principal may send per [`LOCKOUT_SECS`] window; past it
/// every code (even a right one) is refused until the window ends. RFC 4226
/// §7.3 asks for throttling: 3 of 10^6 codes are valid at once, so an
/// unthrottled caller holding a stolen key would find one in hours.
pub const MAX_FAILURES: u32 = 5;
pub const LOCKOUT_SECS: u64 = 300;

/// The HOTP value (RFC 4226 §5.3) of `counter`, as `digits` decimal digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest.last().copied().unwrap_or(0) & 0x0f);
    let word = digest
        .get(offset..offset + 4)
        .map(|b| u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]))
        .unwrap_or(0);
    let modulus = 10u64.pow(digits);
    format!("{:0width$}", u64::from(word) % modulus, width = digits as usize)
}

/// The TOTP code for Unix time `now`.
pub fn code_at(secret: &[u8], now: u64) -> String {
    hotp(secret, now / STEP_SECS, DIGITS)
}

/// RFC 4648 base32 without padding (what `otpauth://` URIs carry).
pub fn base32_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buf, mut bits) = (0u64, 0u32);
    for &b in data {
        buf = (buf << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buf >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buf << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes base32 (case-insensitive, padding and spaces ignored).
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut buf, mut bits) = (0u64, 0u32);
    for c in text.chars().filter(|c| !matches!(c, '=' | ' ' | '-')) {
        let v = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u64 - 'A' as u64,
            c @ '2'..='7' => c as u64 - '2' as u64 + 26,
            _ => return None,
        };
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

/// The `otpauth://` URI an authenticator app scans.
pub fn otpauth_uri(issuer: &str, principal: &str, secret: &[u8]) -> String {
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        percent(issuer),
        percent(principal),
        base32_encode(secret),
        percent(issuer)
    )
}

fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URI as a QR code drawn with Unicode half blocks, for a terminal.
pub fn qr_for_terminal(uri: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(uri.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// Why a code was not accepted. The HTTP layer answers 403 for all three;
/// the reason goes to logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TotpError {
    #[error("a TOTP code is required for this operation (header x-moat-totp)")]
    Missing,
    #[error("the TOTP code is wrong or expired")]
    Wrong,
    #[error("the TOTP code was already used; wait for the next one")]
    Replayed,
    #[error("principal {0:?} has no TOTP enrolment")]
    NotEnrolled(String),
    #[error("too many wrong TOTP codes; try again in {0} s")]
    Locked(u64),
}

impl TotpError {
    /// Stable reason for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            TotpError::Missing => "totp_missing",
            TotpError::Wrong => "totp_wrong",
            TotpError::Replayed => "totp_replayed",
            TotpError::NotEnrolled(_) => "totp_not_enrolled",
            TotpError::Locked(_) => "totp_locked",
        }
    }
}

/// Checks `code` for `secret` at `now`, refusing any step at or before
/// `last_used`. Returns the step that matched, to be remembered.
pub fn check(secret: &[u8], code: &str, now: u64, last_used: Option<u64>) -> Result<u64, TotpError> {
    let code = code.trim();
    if code.is_empty() {
        return Err(TotpError::Missing);
    }
    let current = now / STEP_SECS;
    let mut matched = None;
    // Every candidate is computed and compared, so timing does not reveal
    // which step (if any) matched.
    for step in current.saturating_sub(SKEW_STEPS)..=current + SKEW_STEPS {
        let expected = hotp(secret, step, DIGITS);
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) {
            matched = Some(step);
        }
    }
    let step = matched.ok_or(TotpError::Wrong)?;
    match last_used {
        Some(last) if step <= last => Err(TotpError::Replayed),
        _ => Ok(step),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Enrolment {
    principal: String,
    secret: String,
    created: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TotpFile {
    version: u32,
    enrolments: Vec<Enrolment>,
}

/// Errors of the enrolment store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a moat TOTP file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: enrolment for {principal:?} has a secret that is not base32")]
    BadSecret { path: PathBuf, principal: String },
}

/// Enrolled principals and their secrets (file-backed), plus the replay
/// memory (in memory: a restart forgets the last step, but a replay still
/// needs a code from the last 90 seconds; sharing across replicas is the
/// Redis limiter's job).
#[derive(Debug)]
pub struct TotpStore {
    path: PathBuf,
    secrets: HashMap<String, Vec<u8>>,
    last_used: Mutex<HashMap<String, u64>>,
    /// Per principal: wrong codes in the current window, and its start.
    failures: Mutex<HashMap<String, (u32, u64)>>,
}

impl TotpStore {
    /// Loads the store; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let file: TotpFile = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TotpFile::default(),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut secrets = HashMap::new();
        for e in file.enrolments {
            let secret = base32_decode(&e.secret).ok_or_else(|| StoreError::BadSecret {
                path: path.to_owned(),
                principal: e.principal.clone(),
            })?;
            secrets.insert(e.principal, secret);
        }
        Ok(TotpStore {
            path: path.to_owned(),
            secrets,
            last_used: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// Re-reads the file (enrolments made by `moat keys totp enroll` while
    /// a server runs), keeping the replay memory: a reload must never make
    /// a used code valid again.
    pub fn reload(&mut self) -> Result<(), StoreError> {
        let fresh = TotpStore::load(&self.path)?;
        self.secrets = fresh.secrets;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_enrolled(&self, principal: &str) -> bool {
        self.secrets.contains_key(principal)
    }

    /// Enrols (or re-enrols) `principal` with a fresh random secret, saves
    /// the file, and returns the secret for the URI shown once.
    pub fn enroll(&mut self, principal: &str, now: u64) -> Result<Vec<u8>, StoreError> {
        let mut secret = vec![0u8; SECRET_LEN];
        getrandom::fill(&mut secret).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.secrets.insert(principal.to_owned(), secret.clone());
        self.save(now)?;
        Ok(secret)
    }

    /// Removes an enrolment; returns whether there was one.
    pub fn remove(&mut self, principal: &str, now: u64) -> Result<bool, StoreError> {
        let had = self.secrets.remove(principal).is_some();
        if had {
            self.save(now)?;
        }
        Ok(had)
    }

    fn save(&self, now: u64) -> Result<(), StoreError> {
        let mut enrolments: Vec<Enrolment> = self
            .secrets
            .iter()
            .map(|(p, s)| Enrolment {
                principal: p.clone(),
                secret: base32_encode(s),
                created: now,
            })
            .collect();
        enrolments.sort_by(|a, b| a.principal.cmp(&b.principal));
        let body = serde_json::to_vec_pretty(&TotpFile {
            version: 1,
            enrolments,
        })
        .map_err(|e| StoreError::Parse {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        moat_fs::write_atomic(&self.path, &body).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Verifies a code for `principal` at `now` and remembers its step, so
    /// the same code (or an older one) is refused from then on.
    pub fn verify(&self, principal: &str, code: Option<&str>, now: u64) -> Result<(), TotpError> {
        let secret = self
            .secrets
            .get(principal)
            .ok_or_else(|| TotpError::NotEnrolled(principal.to_owned()))?;
        let code = code.ok_or(TotpError::Missing)?;
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(n, start)) = failures.get(principal) {
            let ends = start.saturating_add(LOCKOUT_SECS);
            if now >= ends {
                failures.remove(principal);
            } else if n >= MAX_FAILURES {
                return Err(TotpError::Locked(ends - now));
            }
        }
        // The lock spans check and record so two concurrent requests with
        // the same code cannot both pass.
        let mut last = self.last_used.lock().unwrap_or_else(|p| p.into_inner());
        match check(secret, code, now, last.get(principal).copied()) {
            Ok(step) => {
                last.insert(principal.to_owned(), step);
                failures.remove(principal);
                Ok(())
            }
            Err(e) => {
                // Replays count too: they are guesses at a known code.
                let entry = failures.entry(principal.to_owned()).or_insert((0, now));
                entry.0 += 1;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
