//! Real handshakes on loopback with certificates minted by rcgen: TLS 1.2
//! refused under the 1.3 minimum, mTLS refusals, principal mapping, reload.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use super::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "moat test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let ca_pem = ca.pem();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        Pki {
            dir,
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, names: &[&str], cn: &str, uri: Option<&str>) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(u) = uri {
            params.subject_alt_names.push(SanType::URI(u.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write_server(&self, tag: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(&["localhost"], tag, None);
        let (c, k) = (
            self.dir.path().join("server.pem"),
            self.dir.path().join("server.key"),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }

    fn settings(&self, min_version: MinVersion, client_auth: ClientAuth) -> TlsSettings {
        let (cert, key) = self.write_server("server-1");
        TlsSettings {
            cert,
            key,
            min_version,
            client_auth,
        }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn client(&self, tls12_only: bool, identity: Option<(String, String)>) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        TlsConnector::from(Arc::new(config))
    }
}

/// Serves `n` connections: each successful handshake gets the principal (or
/// "-") written back. Returns the address.
async fn serve(tls: Arc<Reloadable>, n: usize) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..n {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tls.acceptor();
            tokio::spawn(async move {
                if let Ok(mut stream) = acceptor.accept(tcp).await {
                    let who = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| principal_from_cert(c))
                        .unwrap_or_else(|| "-".into());
                    let _ = stream.write_all(who.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Connects and reads the reply; Err(..) when the handshake or read fails.
async fn talk(addr: std::net::SocketAddr, connector: TlsConnector) -> Result<(String, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let server_cert = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.map_err(|e| e.to_string())?;
    Ok((out, server_cert))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn tls13_only_refuses_a_tls12_client() {
    let pki = Pki::new();
    let tls = Arc::new(Reloadable::new(pki.settings(MinVersion::Tls13, ClientAuth::Off)).unwrap());
    rt().block_on(async {
        let addr = serve(tls, 2).await;
        assert_eq!(talk(addr, pki.client(false, None)).await.unwrap().0, "-");
        let err = talk(addr, pki.client(true, None)).await.unwrap_err();
        assert!(
            err.to_lowercase().contains("protocol") || err.contains("alert"),
            "{err}"
        );
    });
}

#[test]
fn tls12_when_opted_in() {
    let pki = Pki::new();
    let tls = Arc::new(Reloadable::new(pki.settings(MinVersion::Tls12, ClientAuth::Off)).unwrap());
    rt().block_on(async {
        let addr = serve(tls, 1).await;
        assert!(talk(addr, pki.client(true, None)).await.is_ok());
    });
}

#[test]
fn mtls_required_refuses_anonymous_and_names_the_client() {
    let pki = Pki::new();
    let tls = Arc::new(
        Reloadable::new(pki.settings(MinVersion::Tls13, ClientAuth::Required(pki.ca_path()))).unwrap(),
    );
    let id = pki.leaf(&["client.internal"], "ci-bot", Some("spiffe://moat.test/ci"));
    let other = Pki::new().leaf(&["x"], "stranger", None);
    rt().block_on(async {
        let addr = serve(tls, 3).await;
        assert!(
            talk(addr, pki.client(false, None)).await.is_err(),
            "anonymous client admitted"
        );
        assert!(
            talk(addr, pki.client(false, Some(other))).await.is_err(),
            "foreign CA admitted"
        );
        let (who, _) = talk(addr, pki.client(false, Some(id))).await.unwrap();
        assert_eq!(who, "spiffe://moat.test/ci");
    });
}

#[test]
fn mtls_optional_admits_anonymous() {
    let pki = Pki::new();
    let tls = Arc::new(
        Reloadable::new(pki.settings(MinVersion::Tls13, ClientAuth::Optional(pki.ca_path()))).unwrap(),
    );
    let id = pki.leaf(&[], "alice", None);
    rt().block_on(async {
        let addr = serve(tls, 2).await;
        assert_eq!(talk(addr, pki.client(false, None)).await.unwrap().0, "-");
        assert_eq!(talk(addr, pki.client(false, Some(id))).await.unwrap().0, "alice");
    });
}

#[test]
fn reload_serves_the_new_certificate_and_keeps_old_on_error() {
    let pki = Pki::new();
    let settings = pki.settings(MinVersion::Tls13, ClientAuth::Off);
    let tls = Arc::new(Reloadable::new(settings.clone()).unwrap());
    assert!(!tls.reload_if_changed(false).unwrap());
    rt().block_on(async {
        let addr = serve(tls.clone(), 3).await;
        let (_, first) = talk(addr, pki.client(false, None)).await.unwrap();
        pki.write_server("server-2");
        assert!(tls.reload_if_changed(false).unwrap());
        let (_, second) = talk(addr, pki.client(false, None)).await.unwrap();
        assert_ne!(first, second, "still serving the old certificate");
        // A broken key file: the error names it, the working config stays.
        std::fs::write(&settings.key, "not a key").unwrap();
        let err = tls.reload_if_changed(false).unwrap_err().to_string();
        assert!(err.contains("server.key"), "{err}");
        let (_, third) = talk(addr, pki.client(false, None)).await.unwrap();
        assert_eq!(second, third);
    });
}

#[test]
fn bad_files_are_named() {
    let pki = Pki::new();
    let mut s = pki.settings(MinVersion::Tls13, ClientAuth::Off);
    s.cert = pki.dir.path().join("missing.pem");
    let err = server_config(&s).unwrap_err().to_string();
    assert!(err.contains("missing.pem"), "{err}");
}
