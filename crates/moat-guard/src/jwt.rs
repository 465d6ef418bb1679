//! JWT bearer tokens from OIDC issuers (RFC 7519, JWS RFC 7515, JWK RFC 7517).
//!
//! The classic JWT failures are all decisions a library made from the
//! token's own header. Here the *configuration* decides: each issuer has an
//! allowlist of algorithms; `none` does not exist in [`Algorithm`]; a key is
//! typed by what it is (an RSA JWK can only ever verify RS256, an HMAC
//! secret only HS256, and HMAC secrets come from configuration, never from a
//! JWKS), so the RS256→HS256 confusion attack has nothing to confuse. The
//! header's `kid` only picks among the issuer's keys; an unknown `kid` is
//! reported as such so the caller can refresh the JWKS (rate-limited there).
//!
//! Claims: `iss` must equal the issuer, `aud` must contain one of the
//! configured audiences, `exp` is required, `nbf` and `iat` are honoured,
//! all with a configured leeway. Tokens above a size cap are refused before
//! any decoding. This module does no I/O: the server fetches discovery
//! documents and JWKS and hands their JSON to [`Jwks::parse`].

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

/// Tokens longer than this are refused unread (a JWT is a few hundred bytes
/// to a few kilobytes; megabyte headers are a parser-exhaustion attack).
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Smallest RSA modulus accepted, in bits (NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits (bounds verification cost).
pub const MAX_RSA_BITS: usize = 8192;
/// Most keys kept from one JWKS document.
pub const MAX_JWKS_KEYS: usize = 64;

/// The signature algorithms moat verifies. There is deliberately no `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Rs256,
    Es256,
    EdDsa,
    Hs256,
}

impl Algorithm {
    /// Parses a JOSE `alg` name; `None` for anything else, `none` included.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Algorithm::Rs256),
            "ES256" => Some(Algorithm::Es256),
            "EdDSA" => Some(Algorithm::EdDsa),
            "HS256" => Some(Algorithm::Hs256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
            Algorithm::Hs256 => "HS256",
        }
    }
}

/// A verification key, typed by algorithm family.
#[derive(Clone)]
pub enum Key {
    Rsa(Box<rsa::pkcs1v15::VerifyingKey<Sha256>>),
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    /// An HS256 shared secret (from configuration only).
    Hmac(zeroize::Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material (an HMAC secret is a password).
        f.write_str(match self {
            Key::Rsa(_) => "Key::Rsa",
            Key::P256(_) => "Key::P256",
            Key::Ed25519(_) => "Key::Ed25519",
            Key::Hmac(_) => "Key::Hmac(..)",
        })
    }
}

impl Key {
    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Key::Rsa(_) => Algorithm::Rs256,
            Key::P256(_) => Algorithm::Es256,
            Key::Ed25519(_) => Algorithm::EdDsa,
            Key::Hmac(_) => Algorithm::Hs256,
        }
    }

    fn verify(&self, signing_input: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier as _;
        match self {
            Key::Rsa(k) => rsa::pkcs1v15::Signature::try_from(signature)
                .map(|s| k.verify(signing_input, &s).is_ok())
                .unwrap_or(false),
            Key::P256(k) => p256::ecdsa::Signature::from_slice(signature)
                .map(|s| k.verify(signing_input, &s).is_ok())
                .unwrap_or(false),
            Key::Ed25519(k) => ed25519_dalek::Signature::from_slice(signature)
                .map(|s| k.verify_strict(signing_input, &s).is_ok())
                .unwrap_or(false),
            Key::Hmac(secret) => {
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
                    return false;
                };
                mac.update(signing_input);
                // verify_slice compares in constant time.
                mac.verify_slice(signature).is_ok()
            }
        }
    }
}

/// One key of a JWKS, with its id.
#[derive(Debug, Clone)]
pub struct Jwk {
    pub kid: Option<String>,
    pub key: Key,
}

/// The usable signing keys of an issuer.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// Why a JWKS document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS is not a JSON object with a \"keys\" array")]
    Shape,
    #[error("JWKS key {index} (kid {kid:?}): {message}")]
    Key {
        index: usize,
        kid: Option<String>,
        message: String,
    },
}

impl Jwks {
    /// Parses a JWKS document. Keys for encryption (`use: enc`) and key
    /// types moat does not verify with are skipped; a key of a supported
    /// type that is malformed (or an RSA modulus below 2048 bits) is an
    /// error, since it means the issuer is misconfigured.
    pub fn parse(json: &[u8]) -> Result<Self, JwksError> {
        let doc: Value = serde_json::from_slice(json).map_err(|_| JwksError::Shape)?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::Shape)?;
        let mut out = Vec::new();
        for (index, jwk) in keys.iter().enumerate().take(MAX_JWKS_KEYS) {
            let Some(obj) = jwk.as_object() else {
                return Err(JwksError::Key {
                    index,
                    kid: None,
                    message: "not an object".into(),
                });
            };
            let kid = obj.get("kid").and_then(Value::as_str).map(str::to_owned);
            if obj.get("use").and_then(Value::as_str) == Some("enc") {
                continue;
            }
            let fail = |message: String| JwksError::Key {
                index,
                kid: kid.clone(),
                message,
            };
            let key = match parse_jwk(obj).map_err(fail)? {
                Some(key) => key,
                None => continue,
            };
            // A JWK may pin its algorithm; it must agree with the key type.
            if let Some(alg) = obj.get("alg").and_then(Value::as_str)
                && Algorithm::parse(alg) != Some(key.algorithm())
            {
                continue;
            }
            out.push(Jwk { kid, key });
        }
        Ok(Jwks { keys: out })
    }
}

fn b64_field(obj: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = obj
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing member {name:?}"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("member {name:?} is not base64url"))
}

fn parse_jwk(obj: &Map<String, Value>) -> Result<Option<Key>, String> {
    match obj.get("kty").and_then(Value::as_str) {
        Some("RSA") => {
            let n = b64_field(obj, "n")?;
            let e = b64_field(obj, "e")?;
            let n = strip_zeros(&n);
            let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                return Err(format!(
                    "RSA modulus of {bits} bits (allowed {MIN_RSA_BITS}..={MAX_RSA_BITS})"
                ));
            }
            let n = rsa::BoxedUint::from_be_slice_vartime(n);
            let e = rsa::BoxedUint::from_be_slice_vartime(strip_zeros(&e));
            let public = rsa::RsaPublicKey::new_with_size_limits(n, e, MIN_RSA_BITS..=MAX_RSA_BITS)
                .map_err(|err| format!("RSA key: {err}"))?;
            Ok(Some(Key::Rsa(Box::new(rsa::pkcs1v15::VerifyingKey::new(public)))))
        }
        Some("EC") => {
            if obj.get("crv").and_then(Value::as_str) != Some("P-256") {
                return Ok(None);
            }
            let x = b64_field(obj, "x")?;
            let y = b64_field(obj, "y")?;
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes".into());
            }
            let mut sec1 = Vec::with_capacity(65);
            sec1.push(4);
            sec1.extend_from_slice(&x);
            sec1.extend_from_slice(&y);
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                .map_err(|_| "P-256 point is not on the curve".to_string())?;
            Ok(Some(Key::P256(key)))
        }
        Some("OKP") => {
            if obj.get("crv").and_then(Value::as_str) != Some("Ed25519") {
                return Ok(None);
            }
            let x = b64_field(obj, "x")?;
            let bytes: [u8; 32] = x
                .as_slice()
                .try_into()
                .map_err(|_| "Ed25519 key must be 32 bytes".to_string())?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|_| "Ed25519 key is not a valid point".to_string())?;
            Ok(Some(Key::Ed25519(key)))
        }
        // Symmetric keys are never taken from a JWKS (see the module doc).
        _ => Ok(None),
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b.get(first..).unwrap_or(&[])
}

/// What one issuer is trusted for.
#[derive(Debug, Clone)]
pub struct IssuerPolicy {
    /// Exact `iss` value.
    pub issuer: String,
    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// Algorithms accepted from this issuer.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    pub max_token_bytes: usize,
}

/// A token whose signature and claims checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub issuer: String,
    pub subject: String,
    pub expires: u64,
    /// All claims, for role mapping.
    pub claims: Map<String, Value>,
}

/// Why a token was refused: each message is what a 401 body says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is {len} bytes; at most {max} are accepted")]
    Oversized { len: usize, max: usize },
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token algorithm \"none\" is never accepted")]
    AlgNone,
    #[error("token algorithm {alg:?} is not allowed for issuer {issuer:?}")]
    AlgNotAllowed { alg: String, issuer: String },
    #[error("token key id {0:?} is not among the issuer's keys")]
    UnknownKid(String),
    #[error("token has no key id and the issuer has several {0} keys")]
    AmbiguousKey(&'static str),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token is not valid before {nbf} (now {now})")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("token was issued in the future ({iat}, now {now})")]
    IssuedInFuture { iat: u64, now: u64 },
    #[error("token issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    #[error("token lacks the required claim {0:?}")]
    MissingClaim(&'static str),
}

impl JwtError {
    /// Stable reason for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Oversized { .. } => "jwt_oversized",
            JwtError::Malformed(_) => "jwt_malformed",
            JwtError::AlgNone => "jwt_alg_none",
            JwtError::AlgNotAllowed { .. } => "jwt_alg_not_allowed",
            JwtError::UnknownKid(_) => "jwt_unknown_kid",
            JwtError::AmbiguousKey(_) => "jwt_ambiguous_key",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired { .. } => "jwt_expired",
            JwtError::NotYetValid { .. } => "jwt_not_yet_valid",
            JwtError::IssuedInFuture { .. } => "jwt_issued_in_future",
            JwtError::UnknownIssuer(_) => "jwt_unknown_issuer",
            JwtError::WrongAudience(_) => "jwt_wrong_audience",
            JwtError::MissingClaim(_) => "jwt_missing_claim",
        }
    }
}

/// A token split and decoded, nothing verified yet.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl Parsed<'_> {
    /// The unverified `iss`, used only to choose which issuer's policy and
    /// keys verify the token.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    pub fn kid(&self) -> Option<&str> {
        self.header.get("kid").and_then(Value::as_str)
    }
}

/// Splits and decodes a compact JWS, refusing oversized input first.
pub fn parse(token: &str, max_bytes: usize) -> Result<Parsed<'_>, JwtError> {
    if token.len() > max_bytes {
        return Err(JwtError::Oversized {
            len: token.len(),
            max: max_bytes,
        });
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let object = |part: &str, what: &'static str| -> Result<Map<String, Value>, JwtError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| JwtError::Malformed(what))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(JwtError::Malformed(what)),
        }
    };
    let header = object(h, "header is not base64url JSON object")?;
    let claims = object(c, "claims are not a base64url JSON object")?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    let signing_input = token.get(..h.len() + 1 + c.len()).unwrap_or_default();
    Ok(Parsed {
        header,
        claims,
        signing_input,
        signature,
    })
}

/// Verifies `parsed` for `policy` with the issuer's `keys` at Unix time `now`.
pub fn verify(
    parsed: &Parsed<'_>,
    policy: &IssuerPolicy,
    keys: &Jwks,
    now: u64,
) -> Result<Verified, JwtError> {
    let alg_name = parsed
        .header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed("header has no \"alg\""))?;
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(JwtError::AlgNone);
    }
    let alg = Algorithm::parse(alg_name)
        .filter(|a| policy.algorithms.contains(a))
        .ok_or_else(|| JwtError::AlgNotAllowed {
            alg: alg_name.to_owned(),
            issuer: policy.issuer.clone(),
        })?;
    // Only keys of the header's algorithm are candidates: an RSA key is
    // never used as an HMAC secret, whatever the header says.
    let candidates: Vec<&Jwk> = keys.keys.iter().filter(|k| k.key.algorithm() == alg).collect();
    let key = match parsed.kid() {
        Some(kid) => candidates
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .ok_or_else(|| JwtError::UnknownKid(kid.to_owned()))?,
        None => match candidates.as_slice() {
            [only] => only,
            [] => return Err(JwtError::UnknownKid(String::new())),
            _ => return Err(JwtError::AmbiguousKey(alg.as_str())),
        },
    };
    if !key.key.verify(parsed.signing_input.as_bytes(), &parsed.signature) {
        return Err(JwtError::BadSignature);
    }

    let claims = &parsed.claims;
    let leeway = policy.leeway.as_secs();
    let num = |name: &'static str| -> Result<Option<u64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(JwtError::Malformed("a time claim is not a number")),
        }
    };
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingClaim("iss"))?;
    if iss != policy.issuer {
        return Err(JwtError::UnknownIssuer(iss.to_owned()));
    }
    let exp = num("exp")?.ok_or(JwtError::MissingClaim("exp"))?;
    if now > exp.saturating_add(leeway) {
        return Err(JwtError::Expired { exp, now });
    }
    if let Some(nbf) = num("nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(JwtError::NotYetValid { nbf, now });
    }
    if let Some(iat) = num("iat")?
        && iat > now.saturating_add(leeway)
    {
        return Err(JwtError::IssuedInFuture { iat, now });
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => policy.audiences.iter().any(|x| x == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| policy.audiences.iter().any(|x| x == a)),
        _ => return Err(JwtError::MissingClaim("aud")),
    };
    if !audience_ok {
        return Err(JwtError::WrongAudience(policy.audiences.join(" or ")));
    }
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingClaim("sub"))?;
    Ok(Verified {
        issuer: iss.to_owned(),
        subject: subject.to_owned(),
        expires: exp,
        claims: claims.clone(),
    })
}

/// The issuers moat trusts, each with its policy and current keys.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    pub issuers: Vec<(IssuerPolicy, Jwks)>,
}

impl Verifier {
    /// Parses `token`, picks the issuer named by its (unverified) `iss`, and
    /// verifies it against that issuer's policy and keys only.
    pub fn verify(&self, token: &str, now: u64) -> Result<Verified, JwtError> {
        let max = self
            .issuers
            .iter()
            .map(|(p, _)| p.max_token_bytes)
            .max()
            .unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
        let parsed = parse(token, max)?;
        let iss = parsed.issuer().ok_or(JwtError::MissingClaim("iss"))?;
        let (policy, keys) = self
            .issuers
            .iter()
            .find(|(p, _)| p.issuer == iss)
            .ok_or_else(|| JwtError::UnknownIssuer(iss.to_owned()))?;
        if token.len() > policy.max_token_bytes {
            return Err(JwtError::Oversized {
                len: token.len(),
                max: policy.max_token_bytes,
            });
        }
        verify(&parsed, policy, keys, now)
    }
}

#[cfg(test)]
mod tests;
