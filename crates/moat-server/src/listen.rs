//! The accept loop of a plane: network allowlist, TLS, and HTTP/1.1 per
//! connection with the connection limits.
//!
//! `axum::serve` cannot wrap a TLS stream, set a header-read timeout or
//! drop a connection before HTTP starts, so each accepted connection is
//! served here with hyper's HTTP/1.1 connection directly:
//!
//! 1. the peer address is checked against the plane's CIDR allowlist and
//!    the socket is closed at once when it is outside (nothing is read);
//! 2. on a TLS plane the handshake must finish within the header-read
//!    timeout; the verified client certificate's principal is kept;
//! 3. hyper reads the request head with `header_read_timeout` (slowloris)
//!    and `max_buf_size` (header bytes), and the router sees the peer
//!    address and client certificate as request extensions;
//! 4. a connection that moves no byte for `idle_timeout` while no request
//!    is being answered is closed gracefully.
//!
//! Shutdown stops accepting, asks every connection to finish its current
//! response and close, and waits for all of them.
//!
//! A refusal at any of these steps happens before there is a request, so
//! the request layers cannot record it; [`ConnRejects`] does what they do
//! for requests: a log line, a `moat_rejections_total{stage,reason}`
//! increment and an audit record (`connection.reject`).

use crate::config::Limits;
use crate::metrics::{Plane, Rejection};
use crate::net::Allowlist;
use crate::state::AppState;
use crate::tls::{Reloadable, principal_from_cert};
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The principal named by the connection's verified client certificate
/// (`None`: plain HTTP, or TLS without a client certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert(pub Option<String>);

/// Audit records of connection refusals per plane per second; the rest
/// are counted and logged but folded into the next record's `suppressed`
/// note. A refusal costs an attacker one TCP connect, so without a budget
/// a port scan would become an audit-log flood (and, with a fail-closed
/// audit, a way to stall it).
const CONN_AUDIT_PER_SECOND: u32 = 50;

/// Counts, logs and audits refusals that happen before any request.
pub struct ConnRejects {
    state: Arc<AppState>,
    plane: Plane,
    /// (start of the current second, records written in it, suppressed
    /// since the last written record).
    budget: Mutex<(Instant, u32, u64)>,
}

impl ConnRejects {
    pub fn new(state: Arc<AppState>, plane: Plane) -> Self {
        ConnRejects {
            state,
            plane,
            budget: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Records one refusal of `peer`: `message` is the log line, `detail`
    /// (the TLS or HTTP error, say) goes to the log only.
    pub fn reject(&self, peer: SocketAddr, r: Rejection, message: &str, detail: Option<&str>) {
        tracing::warn!(
            plane = self.plane.as_str(),
            peer = %peer,
            stage = r.stage,
            reason = r.reason,
            error = detail.unwrap_or(""),
            "{message}"
        );
        self.state.metrics.reject(r);
        let Some(audit) = &self.state.audit else {
            return;
        };
        let suppressed = {
            let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            if b.0.elapsed() >= Duration::from_secs(1) {
                b.0 = Instant::now();
                b.1 = 0;
            }
            if b.1 >= CONN_AUDIT_PER_SECOND {
                b.2 += 1;
                return;
            }
            b.1 += 1;
            std::mem::take(&mut b.2)
        };
        let mut rec = moat_audit::AuditRecord::new("connection.reject", moat_audit::Outcome::Denied);
        rec.resource = Some(if suppressed > 0 {
            format!(
                "{} plane ({suppressed} earlier connection refusals not audited: over {CONN_AUDIT_PER_SECOND}/s)",
                self.plane.as_str()
            )
        } else {
            format!("{} plane", self.plane.as_str())
        });
        rec.stage = Some(r.stage.to_owned());
        rec.reason = Some(r.reason.to_owned());
        rec.client_addr = Some(peer.ip().to_string());
        // Never waits: the accept loop must not stall on the disk.
        if let Err(e) = audit.submit(rec) {
            tracing::error!(error = %e, "audit record of a connection refusal not written");
        }
    }
}

/// The rejection a failed TLS handshake stands for: which of the reasons
/// an operator acts on differently (an old client, a missing client
/// certificate, a client that distrusts our certificate).
fn tls_rejection(e: &std::io::Error) -> Rejection {
    use tokio_rustls::rustls::{Error as TlsError, PeerIncompatible};
    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
        Some(TlsError::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired,
        )) => "protocol_version",
        Some(TlsError::PeerIncompatible(_)) => "peer_incompatible",
        Some(TlsError::NoCertificatesPresented) => "no_client_cert",
        Some(TlsError::InvalidCertificate(_)) => "bad_client_cert",
        Some(TlsError::AlertReceived(_)) => "client_alert",
        _ => "handshake_failed",
    };
    Rejection::new("tls", reason)
}

/// One plane ready to serve.
pub struct PlaneServer {
    pub plane: Plane,
    pub listener: TcpListener,
    pub allow: Allowlist,
    pub tls: Option<Arc<Reloadable>>,
    pub router: Router,
    pub limits: Limits,
}

impl PlaneServer {
    /// Serves until `stop` turns true, then drains open connections.
    pub async fn run(self, state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        let conn_stop = stop.clone();
        let rejects = Arc::new(ConnRejects::new(state.clone(), self.plane));
        loop {
            tokio::select! {
                _ = stop.wait_for(|v| *v) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = self.listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: back off
                            // rather than spin; the listener stays up.
                            tracing::warn!(plane = self.plane.as_str(), error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    if !self.allow.allows(peer.ip()) {
                        drop(tcp);
                        rejects.reject(
                            peer,
                            Rejection::new("network", "cidr_denied"),
                            "connection refused: peer is outside allow_cidrs",
                            None,
                        );
                        continue;
                    }
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(connection(
                        tcp,
                        peer,
                        self.tls.clone(),
                        self.router.clone(),
                        self.limits,
                        rejects.clone(),
                        conn_stop.clone(),
                    ));
                }
            }
        }
        // Drain: open connections finish their requests. Once the drain
        // deadline has passed, handlers end what is still running (streams
        // get an error chunk and `[DONE]`); connections still open a grace
        // period after that are closed.
        let mut deadline = std::pin::pin!(async {
            state.shutdown.deadline_passed().await;
            tokio::time::sleep(DEADLINE_GRACE).await;
        });
        loop {
            tokio::select! {
                next = conns.join_next() => if next.is_none() { break },
                () = &mut deadline => {
                    tracing::warn!(plane = self.plane.as_str(), open = conns.len(), "closing connections still open after the drain deadline");
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }
}

/// After the drain deadline, how long handlers get to write their final
/// bytes before their connections are closed.
const DEADLINE_GRACE: Duration = Duration::from_secs(2);

#[allow(
    clippy::too_many_arguments,
    reason = "one connection's whole context, passed once"
)]
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<Reloadable>>,
    router: Router,
    limits: Limits,
    rejects: Arc<ConnRejects>,
    stop: watch::Receiver<bool>,
) {
    let Some(tls) = tls else {
        serve_http(tcp, peer, ClientCert(None), router, limits, rejects, stop).await;
        return;
    };
    let handshake = tokio::time::timeout(limits.header_read_timeout, tls.acceptor().accept(tcp)).await;
    match handshake {
        Ok(Ok(stream)) => {
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| principal_from_cert(c.as_ref()));
            serve_http(stream, peer, ClientCert(cert), router, limits, rejects, stop).await;
        }
        Ok(Err(e)) => {
            let detail = e.to_string();
            rejects.reject(peer, tls_rejection(&e), "TLS handshake refused", Some(&detail));
        }
        Err(_) => rejects.reject(
            peer,
            Rejection::new("tls", "handshake_timeout"),
            "TLS handshake timed out",
            None,
        ),
    }
}

/// Bytes moved and requests being answered on one connection, for the
/// idle timeout.
#[derive(Default)]
struct Activity {
    /// Milliseconds since `epoch` of the last byte read or written.
    last_ms: AtomicU64,
    busy: AtomicUsize,
    /// Bytes of a next request head arrived since the last request ended:
    /// a header timeout then cut a slow client, not an idle keep-alive.
    partial_head: AtomicBool,
    /// Requests this connection has carried.
    served: AtomicUsize,
}

struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
    epoch: Instant,
}

impl<I> Tracked<I> {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.last_ms.store(ms, Ordering::Relaxed);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
            if self.activity.busy.load(Ordering::Relaxed) == 0 {
                self.activity.partial_head.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decrements the busy count when the handler's future ends (answered or
/// dropped).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.partial_head.store(false, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    cert: ClientCert,
    router: Router,
    limits: Limits,
    rejects: Arc<ConnRejects>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let epoch = Instant::now();
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
        epoch,
    };
    let svc_activity = activity.clone();
    let svc = tower::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(cert.clone());
        svc_activity.busy.fetch_add(1, Ordering::Relaxed);
        svc_activity.served.fetch_add(1, Ordering::Relaxed);
        let busy = Busy(svc_activity.clone());
        let mut router = router.clone();
        // Boxed so the connection is `Unpin` and can be polled without
        // shutting the socket down (see `linger`).
        let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let resp = tower::Service::call(&mut router, req.map(axum::body::Body::new)).await;
            drop(busy);
            resp
        });
        fut
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let mut conn = builder.serve_connection(
        TokioIo::new(io),
        hyper_util::service::TowerToHyperService::new(svc),
    );
    let idle_ms = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let check_every = (limits.idle_timeout / 4).max(Duration::from_millis(25));
    let mut tick = tokio::time::interval(check_every);
    let mut closing = false;
    enum Event {
        Done(hyper::Result<()>),
        Stop,
        Tick,
    }
    loop {
        let event = tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => Event::Done(r),
            _ = stop.wait_for(|v| *v), if !closing => Event::Stop,
            _ = tick.tick(), if !closing => Event::Tick,
        };
        match event {
            Event::Done(Err(e)) => {
                // Header timeouts, oversized heads and resets land here;
                // hyper has already answered what can be answered (431).
                let detail = e.to_string();
                if e.is_parse_too_large() {
                    rejects.reject(
                        peer,
                        Rejection::new("limits", "header_too_large"),
                        "request refused: head larger than limits.max_header_bytes",
                        Some(&detail),
                    );
                } else if e.is_timeout() {
                    // An idle keep-alive connection that sent nothing is
                    // not a refusal; a head that started and did not
                    // finish (or a new connection that never sent one) is
                    // the slowloris cut-off.
                    let started = activity.partial_head.load(Ordering::Relaxed)
                        || activity.served.load(Ordering::Relaxed) == 0;
                    if started {
                        rejects.reject(
                            peer,
                            Rejection::new("limits", "header_timeout"),
                            "connection cut: request head not complete within limits.header_read_timeout",
                            Some(&detail),
                        );
                    }
                } else if e.is_parse() {
                    rejects.reject(
                        peer,
                        Rejection::new("protocol", "bad_request_head"),
                        "request refused: malformed HTTP request head",
                        Some(&detail),
                    );
                } else {
                    tracing::debug!(peer = %peer, error = %detail, "connection ended with an error");
                }
                return;
            }
            Event::Done(Ok(())) => {
                if !closing {
                    linger(conn.into_parts().io.into_inner()).await;
                }
                return;
            }
            Event::Stop => {
                closing = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
            Event::Tick => {
                let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                let quiet = now.saturating_sub(activity.last_ms.load(Ordering::Relaxed));
                if quiet >= idle_ms && activity.busy.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(peer = %peer, "closing idle connection");
                    closing = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
            }
        }
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// Lingering close (as nginx's `lingering_close`): when hyper ends a
/// connection, the client may still be sending a body nobody read (a 413,
/// a 401 before the body). Closing a socket with unread data makes the
/// kernel send a reset, which can destroy the answer before the client
/// reads it. So: send FIN, then read and discard until the client closes,
/// for at most [`LINGER`].
async fn linger<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = io.shutdown().await;
    let drain = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
