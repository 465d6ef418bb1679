//! TLS for the planes: rustls, TLS 1.3 only unless 1.2 is opted into,
//! optional or required client certificates (mTLS), and certificate reload
//! without dropping connections.
//!
//! Reload swaps the `ServerConfig` that *new* handshakes use; connections
//! already established keep the session they negotiated, so rotating a
//! certificate never cuts a stream. [`Reloadable::reload_if_changed`] is
//! cheap (one `stat` per file) and is called on a timer and on SIGHUP.
//!
//! A client certificate maps to a principal name: the first URI SAN
//! (SPIFFE style `spiffe://…`), else the first DNS SAN, else the e-mail
//! SAN, else the subject common name. Chain validation against the
//! configured client CA is rustls-webpki's; the mapping only names who it
//! is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// Lowest protocol version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// Client certificate policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    Off,
    /// Verified when presented (CA bundle); anonymous clients allowed and
    /// authenticated by other means.
    Optional(PathBuf),
    /// Every client must present a certificate chaining to the CA bundle.
    Required(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min_version: MinVersion,
    pub client_auth: ClientAuth,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls configuration from the files, naming the file at fault.
pub fn server_config(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&s.cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&s.key).map_err(|e| file_error(&s.key, format!("private key: {e}")))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        MinVersion::Tls13 => &[&rustls::version::TLS13],
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &s.client_auth {
        ClientAuth::Off => builder.with_no_client_auth(),
        ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error(ca, format!("client CA: {e}")))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if matches!(s.client_auth, ClientAuth::Optional(_)) {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| file_error(ca, format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        file_error(
            &s.cert,
            format!("certificate and key do not match or are unusable: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What identifies a version of the files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<(Option<SystemTime>, u64, u64)>);

fn stamp(s: &TlsSettings) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let mut paths = vec![&s.cert, &s.key];
    if let ClientAuth::Optional(ca) | ClientAuth::Required(ca) = &s.client_auth {
        paths.push(ca);
    }
    Stamp(
        paths
            .into_iter()
            .map(|p| match std::fs::metadata(p) {
                Ok(m) => (m.modified().ok(), m.len(), m.ino()),
                Err(_) => (None, 0, 0),
            })
            .collect(),
    )
}

/// A listener's TLS configuration that can be swapped while serving.
#[derive(Debug)]
pub struct Reloadable {
    settings: TlsSettings,
    current: RwLock<(Arc<ServerConfig>, Stamp)>,
}

impl Reloadable {
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let st = stamp(&settings);
        let config = server_config(&settings)?;
        Ok(Reloadable {
            settings,
            current: RwLock::new((config, st)),
        })
    }

    /// The acceptor new connections should use.
    pub fn acceptor(&self) -> TlsAcceptor {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        TlsAcceptor::from(guard.0.clone())
    }

    /// Rebuilds the configuration when a file changed (or `force`). A
    /// failed rebuild keeps the previous configuration serving and returns
    /// the error for the log; `Ok(true)` means a new one is in use.
    pub fn reload_if_changed(&self, force: bool) -> Result<bool, TlsError> {
        let now = stamp(&self.settings);
        {
            let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
            if !force && guard.1 == now {
                return Ok(false);
            }
        }
        let config = server_config(&self.settings)?;
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        *guard = (config, now);
        Ok(true)
    }
}

/// The principal a verified client certificate names (see module doc).
pub fn principal_from_cert(der: &[u8]) -> Option<String> {
    use der::Decode as _;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;

    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let tbs = cert.tbs_certificate();
    if let Some(exts) = tbs.extensions() {
        for ext in exts {
            if ext.extn_id != const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
                continue;
            }
            let Ok(san) = SubjectAltName::from_der(ext.extn_value.as_bytes()) else {
                continue;
            };
            let pick = |want: fn(&GeneralName) -> Option<String>| san.0.iter().find_map(want);
            let uri = pick(|g| match g {
                GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
                _ => None,
            });
            let dns = pick(|g| match g {
                GeneralName::DnsName(d) => Some(d.to_string()),
                _ => None,
            });
            let mail = pick(|g| match g {
                GeneralName::Rfc822Name(m) => Some(m.to_string()),
                _ => None,
            });
            if let Some(name) = uri.or(dns).or(mail) {
                return Some(name);
            }
        }
    }
    tbs.subject()
        .common_name()
        .ok()
        .flatten()
        .map(|cn| cn.value().into_owned())
}

#[cfg(test)]
mod tests;
