//! A model served by OpenAI-compatible upstreams (vLLM, TGI, llama.cpp
//! server, Ollama): a pool of replicas behind one model name.
//!
//! - choice: power of two choices over available replicas (healthy, not
//!   cooling down, not yet tried by this request), cost = peak-EWMA latency
//!   × (outstanding requests + 1) ([`replica`]);
//! - one retry loop: a failed attempt (connect error, timeout, 429, 5xx,
//!   refused credentials, a broken body) moves to another replica, but only
//!   while nothing has reached the client: for a stream, until the first
//!   piece of text; for a plain answer, until the whole answer is in hand;
//! - breaker: a refused connection or a 429 cools its replica down at once
//!   (for the 429's `Retry-After`), other failures (5xx, timeouts, broken
//!   bodies) after `failure_threshold` in a row; the cooldown doubles while
//!   failures go on. Active health checks
//!   ([`health`]) take dead replicas out and bring restarted ones back;
//! - streaming: chunks are relayed as they arrive, as engine [`Event`]s, so
//!   the server re-frames them with its own `id` and `created`.
//!
//! Requests go out with hyper's pooled keep-alive client: one connection
//! pool per model, no TLS, URLs and credentials only from the config.

pub mod config;
mod health;
mod replica;
mod wire;

pub use config::{ApiKey, BaseUrl, PoolConfig, UpstreamConfig, tls_client_config};

use crate::error::EngineError;
use crate::generate::Event;
use crate::request::ChatRequest;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use replica::Replica;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How one attempt on one replica ended; fixed strings for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    /// TCP connect refused or failed.
    Connect,
    /// No response head, first piece or next piece in time.
    Timeout,
    /// 429 from the upstream.
    RateLimited,
    /// 5xx from the upstream.
    ServerError,
    /// 401/403/404: our credentials or model name are wrong there.
    Refused,
    /// 400/413/422: the upstream judged the request bad; not retried.
    ClientError,
    /// The body broke (reset, malformed chunk) before anything was relayed.
    Protocol,
    /// The stream broke after text was relayed: too late to retry.
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Connect => "connect_error",
            Outcome::Timeout => "timeout",
            Outcome::RateLimited => "rate_limited",
            Outcome::ServerError => "server_error",
            Outcome::Refused => "refused",
            Outcome::ClientError => "client_error",
            Outcome::Protocol => "protocol_error",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// Where the pool reports what it does (the server's Prometheus metrics).
pub trait PoolObserver: Send + Sync {
    /// One attempt on `upstream` ended; `latency` is the time to the first
    /// piece of the answer when there was one.
    fn attempt(&self, model: &str, upstream: &str, outcome: Outcome, latency: Option<Duration>);
    /// A request moved on to another replica after a failure.
    fn failover(&self, model: &str);
}

/// One replica's state, for metrics and `/ready`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    pub upstream: String,
    pub healthy: bool,
    pub cooling_down: bool,
    pub pending: usize,
}

pub struct UpstreamPool {
    name: String,
    replicas: Vec<Arc<Replica>>,
    config: PoolConfig,
    rng: AtomicU64,
    observer: OnceLock<Arc<dyn PoolObserver>>,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("name", &self.name)
            .field(
                "replicas",
                &self.replicas.iter().map(|r| &r.label).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A failed attempt: what to record, whether another replica may help, and
/// what the client gets if none does.
struct Failure {
    outcome: Outcome,
    retry_after: Option<Duration>,
    error: EngineError,
}

impl Failure {
    fn new(outcome: Outcome, message: String) -> Self {
        Self {
            outcome,
            retry_after: None,
            error: EngineError::BadGateway(message),
        }
    }

    fn retryable(&self) -> bool {
        !matches!(self.outcome, Outcome::ClientError)
    }
}

/// Decrements a replica's outstanding count when the request ends,
/// whichever way (a stream's task finishing, a client leaving).
struct PendingGuard(Arc<Replica>);

impl PendingGuard {
    fn new(r: &Arc<Replica>) -> Self {
        r.pending.fetch_add(1, Ordering::Relaxed);
        Self(r.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamPool {
    /// Build the pool (no I/O yet; health checks start with
    /// [`UpstreamPool::start_health_checks`], inside a runtime).
    pub fn new(config: PoolConfig) -> Result<Self, EngineError> {
        let load = |message: String| EngineError::Load {
            model: config.name.clone(),
            message,
        };
        if config.upstreams.is_empty() {
            return Err(load("no upstreams configured".into()));
        }
        let replicas = config
            .upstreams
            .iter()
            .map(|u| Replica::new(u.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(load)?;
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| load(format!("no OS randomness: {e}")))?;
        Ok(Self {
            name: config.name.clone(),
            replicas,
            rng: AtomicU64::new(u64::from_le_bytes(seed) | 1),
            config,
            observer: OnceLock::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where metrics go; set once, after the server built its registry.
    pub fn set_observer(&self, observer: Arc<dyn PoolObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Start the active health checks of every replica (needs a runtime).
    /// They stop when the pool is dropped.
    pub fn start_health_checks(self: &Arc<Self>) {
        for (i, _) in self.replicas.iter().enumerate() {
            health::spawn(Arc::downgrade(self), i);
        }
    }

    pub fn status(&self) -> Vec<ReplicaStatus> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|r| ReplicaStatus {
                upstream: r.label.clone(),
                healthy: r.healthy(),
                cooling_down: r.cooling_until(now).is_some(),
                pending: r.pending.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Count an attempt; a failure is also logged with what went wrong
    /// (hyper's error or the status: never a credential, never a body
    /// beyond the clipped error message).
    fn observe(&self, r: &Replica, outcome: Outcome, latency: Option<Duration>, error: Option<&EngineError>) {
        if let Some(o) = self.observer.get() {
            o.attempt(&self.name, &r.label, outcome, latency);
        }
        let error = error.map(ToString::to_string).unwrap_or_default();
        match outcome {
            Outcome::Ok => {}
            Outcome::ClientError => {
                tracing::info!(model = %self.name, upstream = %r.label, outcome = outcome.as_str(), %error, "upstream refused the request")
            }
            _ => {
                tracing::warn!(model = %self.name, upstream = %r.label, outcome = outcome.as_str(), %error, "upstream attempt failed")
            }
        }
    }

    /// xorshift64*: cheap, lock-free, good enough to spread choices.
    fn random(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Power of two choices among available replicas not yet tried.
    fn pick(&self, tried: &[usize], now: Instant) -> Option<usize> {
        let n = self.replicas.len();
        let mut candidates = [0usize; 2];
        let mut found = 0;
        // Scan from a random offset so ties and small pools spread too;
        // reservoir-sample two of the eligible ones.
        let offset = (self.random() % n as u64) as usize;
        let mut seen = 0u64;
        for k in 0..n {
            let i = (offset + k) % n;
            if tried.contains(&i) || !self.replicas[i].available(now) {
                continue;
            }
            seen += 1;
            if found < 2 {
                candidates[found] = i;
                found += 1;
            } else {
                let j = self.random() % seen;
                if j < 2 {
                    candidates[j as usize] = i;
                }
            }
        }
        match found {
            0 => None,
            1 => Some(candidates[0]),
            _ => {
                let (a, b) = (candidates[0], candidates[1]);
                Some(if self.replicas[b].cost(now) < self.replicas[a].cost(now) {
                    b
                } else {
                    a
                })
            }
        }
    }

    /// Checks that need no tokenizer (the upstream does the rest and its
    /// 400s are relayed).
    fn validate(&self, req: &ChatRequest) -> Result<(), EngineError> {
        crate::request::check_messages(req)?;
        crate::generate::check_sampling(req)?;
        // The relay speaks chat with one choice and no log-probabilities;
        // refused rather than silently answered differently.
        if req.is_completion() {
            return Err(EngineError::invalid(
                Some("prompt"),
                "completions are not supported for a model served by upstreams; use chat completions",
            ));
        }
        if req.choices() != 1 || req.n == Some(0) {
            return Err(EngineError::invalid(
                Some("n"),
                "only n = 1 is supported for a model served by upstreams",
            ));
        }
        if req.logprobs.is_some() {
            return Err(EngineError::invalid(
                Some("logprobs"),
                "logprobs are not supported for a model served by upstreams",
            ));
        }
        if req.ignore_eos {
            return Err(EngineError::invalid(
                Some("ignore_eos"),
                "ignore_eos is not supported for a model served by upstreams",
            ));
        }
        if req.include_reasoning == Some(false) {
            return Err(EngineError::invalid(
                Some("include_reasoning"),
                "include_reasoning is not supported for a model served by upstreams",
            ));
        }
        if req.max_tokens == Some(0) {
            return Err(EngineError::invalid(
                Some("max_tokens"),
                "max_tokens must be at least 1",
            ));
        }
        Ok(())
    }

    /// Send `req` to the pool. Resolves once an upstream produced the first
    /// piece of the answer (streams) or the whole answer (plain), retrying
    /// on other replicas before that; later events arrive on the receiver.
    pub async fn submit(
        &self,
        req: &ChatRequest,
        stream: bool,
    ) -> Result<mpsc::Receiver<Event>, EngineError> {
        self.validate(req)?;
        let attempts = self.config.max_attempts.clamp(1, self.replicas.len());
        let mut tried: Vec<usize> = Vec::with_capacity(attempts);
        let mut last: Option<EngineError> = None;
        // Bodies differ per replica only by the model name: encode each
        // distinct one once (usually all replicas share it).
        let mut body: Option<(usize, Bytes)> = None;
        while tried.len() < attempts {
            let now = Instant::now();
            let Some(i) = self.pick(&tried, now) else { break };
            if !tried.is_empty()
                && let Some(o) = self.observer.get()
            {
                o.failover(&self.name);
            }
            tried.push(i);
            let r = self.replicas[i].clone();
            let bytes = match &body {
                Some((j, b)) if self.replicas[*j].config.model == r.config.model => b.clone(),
                _ => {
                    let b = Bytes::from(
                        wire::request_body(&r.config.model, req, stream).map_err(EngineError::Inference)?,
                    );
                    body = Some((i, b.clone()));
                    b
                }
            };
            let started = Instant::now();
            let result = if stream {
                self.try_stream(&r, bytes, started).await
            } else {
                self.try_complete(&r, bytes, started).await
            };
            match result {
                Ok(rx) => return Ok(rx),
                Err(f) => {
                    self.observe(&r, f.outcome, None, Some(&f.error));
                    if !f.retryable() {
                        return Err(f.error);
                    }
                    let breaker = replica::Breaker {
                        base: self.config.cooldown,
                        max: self.config.max_cooldown,
                        threshold: self.config.failure_threshold,
                    };
                    r.failed(
                        f.outcome == Outcome::Connect,
                        f.retry_after,
                        &breaker,
                        Instant::now(),
                    );
                    last = Some(f.error);
                }
            }
        }
        Err(self.unavailable(last))
    }

    /// Nothing could answer: 503 with the earliest time a replica comes
    /// back, naming the last failure.
    fn unavailable(&self, last: Option<EngineError>) -> EngineError {
        let now = Instant::now();
        let retry_after = self
            .replicas
            .iter()
            .filter_map(|r| r.cooling_until(now))
            .min()
            // Whole seconds, rounded up: a client retrying on time finds
            // the replica back.
            .map(|t| t.duration_since(now).as_millis().div_ceil(1000).max(1) as u64)
            .unwrap_or(1);
        let message = match last {
            Some(e) => format!("no upstream of model {} could answer: {e}", self.name),
            None => format!(
                "no upstream of model {} is available (all unhealthy or cooling down)",
                self.name
            ),
        };
        EngineError::Unavailable {
            model: self.name.clone(),
            message,
            retry_after,
        }
    }

    /// Send one request and wait for the response head.
    async fn send(
        &self,
        r: &Replica,
        body: Bytes,
        stream: bool,
        started: Instant,
    ) -> Result<Response<Incoming>, Failure> {
        let mut req = Request::post(r.chat_uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::ACCEPT,
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .body(Full::new(body))
            .map_err(|e| Failure::new(Outcome::Protocol, format!("cannot build the request: {e}")))?;
        if let Some(auth) = &r.auth {
            req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
        }
        let timeout = r.config.response_timeout;
        let resp = match tokio::time::timeout_at((started + timeout).into(), r.client.request(req)).await {
            Err(_) => {
                return Err(Failure::new(
                    Outcome::Timeout,
                    format!("upstream gave no response within {timeout:?}"),
                ));
            }
            Ok(Err(e)) => {
                let outcome = if e.is_connect() {
                    Outcome::Connect
                } else {
                    Outcome::Protocol
                };
                return Err(Failure::new(outcome, format!("upstream request failed: {e}")));
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // A short read of the error body for its message; never waits long.
        let text = read_capped(resp.into_body(), 64 << 10, r.config.read_timeout)
            .await
            .unwrap_or_default();
        let (outcome, error) = match status {
            StatusCode::TOO_MANY_REQUESTS => (
                Outcome::RateLimited,
                EngineError::BadGateway("upstream is rate limiting (429)".into()),
            ),
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY => (
                Outcome::ClientError,
                EngineError::invalid(
                    None,
                    format!(
                        "the upstream refused the request: {}",
                        wire::error_message(&text).unwrap_or_else(|| status.to_string())
                    ),
                ),
            ),
            s if s.is_server_error() => (
                Outcome::ServerError,
                EngineError::BadGateway(format!("upstream answered {s}")),
            ),
            s => (
                Outcome::Refused,
                EngineError::BadGateway(format!("upstream answered {s}")),
            ),
        };
        Err(Failure {
            outcome,
            retry_after: if outcome == Outcome::RateLimited {
                Some(retry_after.unwrap_or(self.config.cooldown))
            } else {
                None
            },
            error,
        })
    }

    async fn try_complete(
        &self,
        r: &Arc<Replica>,
        body: Bytes,
        started: Instant,
    ) -> Result<mpsc::Receiver<Event>, Failure> {
        let _pending = PendingGuard::new(r);
        let resp = self.send(r, body, false, started).await?;
        let bytes = read_capped(resp.into_body(), wire::MAX_BODY_BYTES, r.config.read_timeout)
            .await
            .map_err(|(o, m)| Failure::new(o, m))?;
        let events = wire::completion_events(&bytes).map_err(|m| Failure::new(Outcome::Protocol, m))?;
        let rtt = started.elapsed();
        r.succeeded(rtt, Instant::now());
        self.observe(r, Outcome::Ok, Some(rtt), None);
        let (tx, rx) = mpsc::channel(events.len().max(1));
        for ev in events {
            // Capacity equals the count: never blocks, never fails.
            let _ = tx.try_send(ev);
        }
        Ok(rx)
    }

    async fn try_stream(
        &self,
        r: &Arc<Replica>,
        body: Bytes,
        started: Instant,
    ) -> Result<mpsc::Receiver<Event>, Failure> {
        let pending = PendingGuard::new(r);
        let resp = self.send(r, body, true, started).await?;
        let mut relay = Relay {
            body: resp.into_body(),
            sse: wire::SseParser::default(),
            state: wire::StreamState::default(),
            events: Vec::new(),
            read_timeout: r.config.read_timeout,
        };
        // Before the first piece of text nothing has reached the client:
        // any failure here is retried elsewhere.
        match relay.next().await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Failure::new(
                    Outcome::Protocol,
                    "upstream ended the stream before answering".into(),
                ));
            }
            Err((o, m)) => return Err(Failure::new(o, m)),
        }
        let rtt = started.elapsed();
        r.succeeded(rtt, Instant::now());
        self.observe(r, Outcome::Ok, Some(rtt), None);
        let (tx, rx) = mpsc::channel(64);
        let observer = self.observer.get().cloned();
        let model = self.name.clone();
        let replica = r.clone();
        tokio::spawn(async move {
            let _pending = pending;
            loop {
                for ev in relay.events.drain(..) {
                    if tx.send(ev).await.is_err() {
                        // The client left: dropping the body closes the
                        // upstream connection, which stops its generation.
                        return;
                    }
                }
                if relay.state.done {
                    return;
                }
                let next = tokio::select! {
                    next = relay.next() => next,
                    // The client left while the upstream was quiet: stop
                    // now rather than at the next chunk.
                    () = tx.closed() => return,
                };
                match next {
                    Ok(_) => {}
                    Err((outcome, message)) => {
                        if let Some(o) = &observer {
                            o.attempt(&model, &replica.label, Outcome::Interrupted, None);
                        }
                        tracing::warn!(model = %model, upstream = %replica.label, reason = outcome.as_str(), "upstream stream broke after text was relayed");
                        let _ = tx.send(Event::Error(message)).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Reads a streamed body into events.
struct Relay {
    body: Incoming,
    sse: wire::SseParser,
    state: wire::StreamState,
    /// Events parsed and not yet handed on.
    events: Vec<Event>,
    read_timeout: Duration,
}

impl Relay {
    /// Read until at least one event is ready (`Ok(true)`) or the body
    /// ended without any (`Ok(false)`).
    async fn next(&mut self) -> Result<bool, (Outcome, String)> {
        while self.events.is_empty() {
            if self.state.done {
                return Ok(false);
            }
            let frame = match tokio::time::timeout(self.read_timeout, self.body.frame()).await {
                Err(_) => {
                    return Err((
                        Outcome::Timeout,
                        format!("upstream sent nothing for {:?}", self.read_timeout),
                    ));
                }
                Ok(None) => {
                    // Some servers close after the finish chunk without
                    // `[DONE]`; anything else ended too early.
                    if self.state.saw_finish() {
                        let done = self.state.finish();
                        self.events.push(done);
                        return Ok(true);
                    }
                    return Err((Outcome::Protocol, "upstream stream ended before finishing".into()));
                }
                Ok(Some(Err(e))) => return Err((Outcome::Protocol, format!("upstream stream broke: {e}"))),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            let (state, events) = (&mut self.state, &mut self.events);
            self.sse
                .push(&data, |d| state.data(d, events))
                .map_err(|m| (Outcome::Protocol, m))?;
        }
        Ok(true)
    }
}

/// A whole body, at most `cap` bytes, each piece within `timeout`.
async fn read_capped(
    mut body: Incoming,
    cap: usize,
    timeout: Duration,
) -> Result<Vec<u8>, (Outcome, String)> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err((Outcome::Timeout, format!("upstream body stalled for {timeout:?}"))),
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => return Err((Outcome::Protocol, format!("upstream body broke: {e}"))),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    if out.len() + d.len() > cap {
                        return Err((Outcome::Protocol, format!("upstream body exceeds {cap} bytes")));
                    }
                    out.extend_from_slice(&d);
                }
            }
        }
    }
}
