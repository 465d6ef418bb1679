//! Upstream pools against fake OpenAI-compatible servers running in the
//! test (real HTTP over loopback, real keep-alive connections): failover
//! when a replica is killed with no client-visible error, cooldown of a
//! 429-ing replica honouring `Retry-After`, health checks taking a dead
//! replica out and bringing it back after a restart, chunk-by-chunk
//! streaming, credentials from a file, and errors that must not be retried.

// Fixture helpers abort loudly on a broken setup; the lints are relaxed for
// this test file only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use moat_engine::upstream::{
    BaseUrl, Outcome, PoolConfig, PoolObserver, UpstreamConfig, UpstreamPool, tls_client_config,
};
use moat_engine::{ChatMessage, ChatRequest, EngineError, Event, FinishReason};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// How a fake answers chat requests.
#[derive(Clone, Debug)]
enum Mode {
    /// Answer "a b c" (streamed: one chunk per word), after `first_delay`;
    /// streams pause `gap` between chunks.
    Ok { first_delay: Duration, gap: Duration },
    /// 429 with this `Retry-After`.
    RateLimited(u64),
    /// This status with an OpenAI error body.
    Status(u16),
    /// Stream one chunk, then end the body with no finish and no `[DONE]`.
    BreakAfterFirst,
}

struct FakeState {
    mode: Mutex<Mode>,
    healthy: std::sync::atomic::AtomicBool,
    chats: AtomicUsize,
    health_checks: AtomicUsize,
    /// Streams whose reader went away before the end.
    abandoned: AtomicUsize,
    /// Required `Authorization` header value, if any.
    token: Option<String>,
    /// Last request body seen.
    last_body: Mutex<Option<serde_json::Value>>,
}

struct Fake {
    addr: SocketAddr,
    state: Arc<FakeState>,
    tasks: JoinSet<()>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

fn chunk(content: &str, finish: Option<&str>) -> Bytes {
    let v = serde_json::json!({"id":"up-1","object":"chat.completion.chunk","created":1,"model":"up",
        "choices":[{"index":0,"delta":{"content":content},"finish_reason":finish}]});
    Bytes::from(format!("data: {v}\n\n"))
}

async fn handle(state: Arc<FakeState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if let Some(t) = &state.token {
        let got = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        if got != Some(t.as_str()) {
            return Ok(full(401, r#"{"error":{"message":"bad key"}}"#.into()));
        }
    }
    if req.uri().path() == "/v1/models" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        let ok = state.healthy.load(Ordering::SeqCst);
        return Ok(full(
            if ok { 200 } else { 503 },
            r#"{"object":"list","data":[]}"#.into(),
        ));
    }
    if req.uri().path() != "/v1/chat/completions" {
        return Ok(full(404, "{}".into()));
    }
    state.chats.fetch_add(1, Ordering::SeqCst);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let stream = body["stream"] == true;
    *state.last_body.lock().unwrap() = Some(body);
    let mode = state.mode.lock().unwrap().clone();
    match mode {
        Mode::RateLimited(secs) => Ok(Response::builder()
            .status(429)
            .header("retry-after", secs.to_string())
            .body(Full::new(Bytes::from(r#"{"error":{"message":"slow down"}}"#)).boxed())
            .unwrap()),
        Mode::Status(s) => Ok(full(
            s,
            r#"{"error":{"message":"upstream says no","type":"x"}}"#.into(),
        )),
        Mode::Ok { first_delay, gap } if !stream => {
            tokio::time::sleep(first_delay + gap * 2).await;
            Ok(full(
                200,
                serde_json::json!({"id":"up-1","object":"chat.completion","created":1,"model":"up",
                    "choices":[{"index":0,"message":{"role":"assistant","content":"a b c"},"finish_reason":"stop"}],
                    "usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}})
                .to_string(),
            ))
        }
        Mode::Ok { first_delay, gap } => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
            let st = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(first_delay).await;
                let role =
                    serde_json::json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]});
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(format!("data: {role}\n\n")))))
                    .await;
                for (i, w) in ["a", " b", " c"].iter().enumerate() {
                    if i > 0 {
                        tokio::select! {
                            () = tokio::time::sleep(gap) => {}
                            // hyper dropped the body: the client closed
                            // the connection.
                            () = tx.closed() => {
                                st.abandoned.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                    if tx.send(Ok(Frame::data(chunk(w, None)))).await.is_err() {
                        // hyper dropped the body: the connection is gone.
                        st.abandoned.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                let _ = tx.send(Ok(Frame::data(chunk("", Some("stop"))))).await;
                let usage = serde_json::json!({"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}});
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(format!("data: {usage}\n\n")))))
                    .await;
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
                    .await;
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(body))
                .unwrap())
        }
        Mode::BreakAfterFirst => {
            let (tx2, rx2) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
            let _ = tx2.send(Ok(Frame::data(chunk("a", None)))).await;
            // Dropping the sender with no `[DONE]` and no finish reason ends
            // the body before the answer did.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(tx2);
            });
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(
                    tokio_stream::wrappers::ReceiverStream::new(rx2),
                )))
                .unwrap())
        }
    }
}

impl Fake {
    async fn start(mode: Mode, token: Option<&str>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(FakeState {
            mode: Mutex::new(mode),
            healthy: true.into(),
            chats: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            token: token.map(|t| format!("Bearer {t}")),
            last_body: Mutex::new(None),
        });
        let mut f = Fake {
            addr: listener.local_addr().unwrap(),
            state,
            tasks: JoinSet::new(),
        };
        f.serve(listener);
        f
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        // Connections live in the accept task's own set, so aborting it
        // closes every connection too: a real crash, not a polite close.
        self.tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
    }

    /// Crash: the listener and every open connection go away.
    async fn kill(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Come back on the same port.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    fn chats(&self) -> usize {
        self.state.chats.load(Ordering::SeqCst)
    }

    fn upstream(&self) -> UpstreamConfig {
        let mut u = UpstreamConfig::new(
            BaseUrl::parse(&format!("http://{}/v1", self.addr)).unwrap(),
            "up-model".into(),
        );
        u.connect_timeout = Duration::from_millis(500);
        u.response_timeout = Duration::from_secs(5);
        u.read_timeout = Duration::from_secs(5);
        u
    }

    fn label(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

fn fast() -> Mode {
    Mode::Ok {
        first_delay: Duration::ZERO,
        gap: Duration::ZERO,
    }
}

fn slow() -> Mode {
    Mode::Ok {
        first_delay: Duration::from_millis(150),
        gap: Duration::ZERO,
    }
}

#[derive(Default)]
struct Recorder {
    attempts: Mutex<Vec<(String, Outcome)>>,
    failovers: AtomicUsize,
}

impl PoolObserver for Recorder {
    fn attempt(&self, _model: &str, upstream: &str, outcome: Outcome, _latency: Option<Duration>) {
        self.attempts.lock().unwrap().push((upstream.to_owned(), outcome));
    }
    fn failover(&self, _model: &str) {
        self.failovers.fetch_add(1, Ordering::SeqCst);
    }
}

impl Recorder {
    fn failures_of(&self, label: &str) -> Vec<Outcome> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, o)| l == label && *o != Outcome::Ok)
            .map(|(_, o)| *o)
            .collect()
    }
}

fn pool(fakes: &[&Fake], tweak: impl FnOnce(&mut PoolConfig)) -> (Arc<UpstreamPool>, Arc<Recorder>) {
    let mut c = PoolConfig::new("m".into(), fakes.iter().map(|f| f.upstream()).collect());
    c.health_interval = Duration::from_secs(3600);
    c.health_timeout = Duration::from_millis(300);
    c.unhealthy_threshold = 1;
    c.healthy_threshold = 1;
    c.cooldown = Duration::from_millis(200);
    c.max_cooldown = Duration::from_millis(400);
    tweak(&mut c);
    let p = Arc::new(UpstreamPool::new(c).unwrap());
    let rec = Arc::new(Recorder::default());
    p.set_observer(rec.clone());
    (p, rec)
}

fn request() -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        max_tokens: Some(8),
        ..ChatRequest::default()
    }
}

/// Run one request to the end; the text, finish reason and usage.
async fn run(
    p: &UpstreamPool,
    stream: bool,
) -> Result<(String, FinishReason, moat_engine::Usage), EngineError> {
    let mut rx = p.submit(&request(), stream).await?;
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta { content, .. } => text.push_str(&content),
            Event::Done { finish_reason, usage } => return Ok((text, finish_reason, usage)),
            Event::Error(e) => return Err(EngineError::BadGateway(e)),
            Event::Started { .. } | Event::ChoiceEnd { .. } => {}
        }
    }
    panic!("stream ended without Done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_fails_over_without_client_error_and_health_checks_bring_it_back() {
    let mut a = Fake::start(fast(), None).await;
    let b = Fake::start(slow(), None).await;
    let (p, _) = pool(&[&a, &b], |c| c.health_interval = Duration::from_millis(100));
    // Warm up: B's slow first byte raises its peak-EWMA latency, so A (the
    // one about to die) is preferred.
    for i in 0..6 {
        let (text, finish, usage) = run(&p, i % 2 == 0).await.unwrap();
        assert_eq!(text, "a b c");
        assert_eq!(finish, FinishReason::Stop);
        assert_eq!(usage.completion_tokens, 3);
    }
    assert!(a.chats() >= 4, "A preferred once B is known slow: {}", a.chats());
    // Start the health checks only now, so the kill is first met by a request.
    p.start_health_checks();
    a.kill().await;
    let served_by_b = b.chats();
    for i in 0..6 {
        let r = run(&p, i % 2 == 0).await;
        assert_eq!(r.unwrap().0, "a b c", "request {i} after the kill must not fail");
    }
    assert_eq!(b.chats(), served_by_b + 6);
    // The health checks (every 100 ms, one failure suffices) took A out.
    let deadline = Instant::now() + Duration::from_secs(3);
    while p.status()[0].healthy {
        assert!(Instant::now() < deadline, "A never marked unhealthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Back on the same port: the checks bring it back and it serves again.
    let before = a.chats();
    a.restart().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !p.status()[0].healthy {
        assert!(Instant::now() < deadline, "A never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        run(&p, true).await.unwrap();
    }
    assert!(a.chats() > before, "the restarted replica gets traffic again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_is_met_by_a_request_and_retried_elsewhere() {
    // With health checks off, the first request after the kill must itself
    // meet the dead replica (it is the cheaper one) and move on.
    let mut a = Fake::start(fast(), None).await;
    let b = Fake::start(slow(), None).await;
    let (p, rec) = pool(&[&a, &b], |_| {});
    for _ in 0..6 {
        run(&p, true).await.unwrap();
    }
    a.kill().await;
    for stream in [true, false] {
        let (text, _, _) = run(&p, stream).await.unwrap();
        assert_eq!(text, "a b c");
    }
    let failures = rec.failures_of(&a.label());
    assert!(!failures.is_empty(), "the dead replica was tried first");
    assert!(
        failures
            .iter()
            .all(|o| matches!(o, Outcome::Connect | Outcome::Protocol)),
        "{failures:?}"
    );
    assert!(rec.failovers.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_replica_cools_down_for_retry_after_then_is_tried_again() {
    let a = Fake::start(Mode::RateLimited(1), None).await;
    let b = Fake::start(slow(), None).await;
    let (p, rec) = pool(&[&a, &b], |c| {
        c.cooldown = Duration::from_millis(50);
        c.max_cooldown = Duration::from_secs(10);
    });
    // Until A has been tried once (the first pick between equals is random).
    let mut n = 0;
    while a.chats() == 0 {
        run(&p, true).await.unwrap();
        n += 1;
        assert!(n < 20);
    }
    let limited_at = Instant::now();
    assert_eq!(rec.failures_of(&a.label()), vec![Outcome::RateLimited]);
    assert!(p.status()[0].cooling_down);
    // During the 1 s Retry-After nothing goes to A, however cheap it looks.
    while limited_at.elapsed() < Duration::from_millis(700) {
        run(&p, false).await.unwrap();
    }
    assert_eq!(a.chats(), 1, "no request during the cooldown");
    a.set_mode(fast());
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(limited_at.elapsed())).await;
    for _ in 0..3 {
        run(&p, true).await.unwrap();
    }
    assert!(a.chats() > 1, "tried again after Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_relayed_chunk_by_chunk() {
    let a = Fake::start(
        Mode::Ok {
            first_delay: Duration::ZERO,
            gap: Duration::from_millis(400),
        },
        None,
    )
    .await;
    let (p, _) = pool(&[&a], |_| {});
    let t0 = Instant::now();
    let mut rx = p.submit(&request(), true).await.unwrap();
    let Some(Event::Delta { content, tokens, .. }) = rx.recv().await else {
        panic!("first event is text")
    };
    let first = t0.elapsed();
    assert_eq!((content.as_str(), tokens), ("a", 1));
    assert!(first < Duration::from_millis(300), "first chunk after {first:?}");
    let mut last = None;
    while let Some(ev) = rx.recv().await {
        last = Some(ev);
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "the upstream took 800 ms"
    );
    assert!(matches!(last, Some(Event::Done { .. })));
    // What went upstream: the configured model name, usage asked for.
    let body = a.state.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(body["model"], "up-model");
    assert_eq!(body["stream_options"]["include_usage"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_closes_the_upstream_stream() {
    let a = Fake::start(
        Mode::Ok {
            first_delay: Duration::ZERO,
            gap: Duration::from_secs(5),
        },
        None,
    )
    .await;
    let (p, _) = pool(&[&a], |_| {});
    let mut rx = p.submit(&request(), true).await.unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Delta { .. })));
    assert_eq!(p.status()[0].pending, 1);
    drop(rx);
    // The relay notices at once (not at the next chunk), drops the body
    // and so the connection; the upstream's next write fails.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while a.state.abandoned.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the upstream kept streaming to nobody");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(p.status()[0].pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_after_text_is_an_error_not_a_retry() {
    let a = Fake::start(Mode::BreakAfterFirst, None).await;
    let b = Fake::start(slow(), None).await;
    let (p, _) = pool(&[&a, &b], |_| {});
    // B is slow, so once it has answered once A is the cheaper pick.
    let mut saw_error = false;
    for _ in 0..10 {
        let before_b = b.chats();
        match run(&p, true).await {
            Err(EngineError::BadGateway(m)) => {
                assert!(m.contains("ended before finishing"), "{m}");
                assert_eq!(b.chats(), before_b, "no retry after text reached the client");
                saw_error = true;
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(saw_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_is_relayed_not_retried_and_all_down_is_503() {
    let a = Fake::start(Mode::Status(400), None).await;
    let b = Fake::start(Mode::Status(400), None).await;
    let (p, _) = pool(&[&a, &b], |c| c.failure_threshold = 1);
    match run(&p, false).await {
        Err(EngineError::InvalidRequest { message, .. }) => {
            assert!(message.contains("upstream says no"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.chats() + b.chats(), 1, "a 400 is not retried");

    a.set_mode(Mode::Status(500));
    b.set_mode(Mode::Status(503));
    match run(&p, true).await {
        Err(EngineError::Unavailable {
            retry_after, message, ..
        }) => {
            assert!(retry_after >= 1);
            assert!(message.contains("answered 50"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.chats() + b.chats(), 3, "both tried once");
    // Both cooling down now: refused at once, no request sent.
    assert!(matches!(
        run(&p, true).await,
        Err(EngineError::Unavailable { .. })
    ));
    assert_eq!(a.chats() + b.chats(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_error_does_not_take_the_only_replica_out() {
    let a = Fake::start(Mode::Status(500), None).await;
    let (p, rec) = pool(&[&a], |c| {
        c.failure_threshold = 2;
        c.cooldown = Duration::from_secs(30);
        c.max_cooldown = Duration::from_secs(30);
    });
    // The one replica failed: 503 for this request (nowhere to retry)...
    assert!(matches!(
        run(&p, false).await,
        Err(EngineError::Unavailable { .. })
    ));
    assert!(!p.status()[0].cooling_down);
    // ...but the next one is sent, and answered.
    a.set_mode(fast());
    assert_eq!(run(&p, true).await.unwrap().0, "a b c");
    // Two in a row do open the breaker: the third request is not sent.
    a.set_mode(Mode::Status(502));
    for _ in 0..2 {
        assert!(run(&p, false).await.is_err());
    }
    assert!(p.status()[0].cooling_down);
    let sent = a.chats();
    assert!(
        matches!(run(&p, false).await, Err(EngineError::Unavailable { retry_after, .. }) if retry_after >= 29)
    );
    assert_eq!(a.chats(), sent);
    assert_eq!(rec.failures_of(&a.label()).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_the_key_file() {
    let a = Fake::start(fast(), Some("s3cret-token")).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "s3cret-token\n").unwrap();
    let mut up = a.upstream();
    up.api_key = Some(moat_engine::upstream::ApiKey::from_file(&key).unwrap());
    assert!(!format!("{up:?}").contains("s3cret"), "never printed");
    let mut c = PoolConfig::new("m".into(), vec![up]);
    c.health_interval = Duration::from_millis(50);
    let p = Arc::new(UpstreamPool::new(c).unwrap());
    p.start_health_checks();
    assert_eq!(run(&p, true).await.unwrap().0, "a b c");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.state.health_checks.load(Ordering::SeqCst) >= 2);
    assert!(p.status()[0].healthy, "health checks carry the key too");
    // Without the key the upstream refuses: a 502-class failure, retried
    // nowhere (one replica) and reported as unavailable.
    let (p2, rec) = pool(&[&a], |_| {});
    assert!(matches!(
        run(&p2, false).await,
        Err(EngineError::Unavailable { .. })
    ));
    assert_eq!(rec.failures_of(&a.label()), vec![Outcome::Refused]);
}

#[test]
fn urls_are_checked() {
    for bad in ["ftp://x", "http://user:pw@x/v1", "http://x/v1?a=b", "x:80"] {
        assert!(BaseUrl::parse(bad).is_err(), "{bad}");
    }
    let u = BaseUrl::parse("http://10.0.0.1:8000/v1/").unwrap();
    assert_eq!(u.to_string(), "http://10.0.0.1:8000/v1");
    let u = BaseUrl::parse("https://vllm.internal:8443/v1").unwrap();
    assert!(u.is_tls());
    assert_eq!(u.to_string(), "https://vllm.internal:8443/v1");
}

/// A private CA, a server certificate for 127.0.0.1 and a client
/// certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, file: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
}

/// An https fake: TLS 1.3 in front of the same handler, optionally
/// demanding a client certificate from `client_ca`.
async fn tls_fake(
    pki: &Pki,
    client_ca: Option<&Pki>,
) -> (SocketAddr, Arc<FakeState>, tokio::task::JoinHandle<()>) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = pki.leaf("server", &["127.0.0.1"]);
    let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match client_ca {
        None => builder
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca.ca()).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap()
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(FakeState {
        mode: Mutex::new(fast()),
        healthy: true.into(),
        chats: AtomicUsize::new(0),
        health_checks: AtomicUsize::new(0),
        abandoned: AtomicUsize::new(0),
        token: None,
        last_body: Mutex::new(None),
    });
    let st = state.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, st) = (acceptor.clone(), st.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, state, task)
}

fn tls_pool(addr: SocketAddr, tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>) -> Arc<UpstreamPool> {
    let mut u = UpstreamConfig::new(
        BaseUrl::parse(&format!("https://{addr}/v1")).unwrap(),
        "up-model".into(),
    );
    u.connect_timeout = Duration::from_millis(500);
    u.response_timeout = Duration::from_secs(5);
    u.tls = tls;
    let mut c = PoolConfig::new("m".into(), vec![u]);
    c.health_interval = Duration::from_secs(3600);
    c.max_attempts = 1;
    Arc::new(UpstreamPool::new(c).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_verified_against_the_configured_ca() {
    let pki = Pki::new("inference CA");
    let (addr, state, task) = tls_fake(&pki, None).await;
    // Trusting the private CA: the request goes through TLS, streamed too.
    let trusted = tls_client_config(Some(&pki.ca()), None).unwrap();
    let p = tls_pool(addr, Some(trusted));
    assert_eq!(run(&p, false).await.unwrap().0, "a b c");
    assert_eq!(run(&p, true).await.unwrap().0, "a b c");
    assert_eq!(state.chats.load(Ordering::SeqCst), 2);
    // Mozilla's roots (the default) do not know this CA; another private
    // CA does not either: refused before any request is sent.
    for tls in [
        None,
        Some(tls_client_config(Some(&Pki::new("other CA").ca()), None).unwrap()),
    ] {
        let p = tls_pool(addr, tls);
        assert!(run(&p, false).await.is_err());
    }
    assert_eq!(state.chats.load(Ordering::SeqCst), 2);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_demanding_a_client_certificate_gets_the_configured_one() {
    let server_pki = Pki::new("inference CA");
    let client_pki = Pki::new("client CA");
    let (addr, state, task) = tls_fake(&server_pki, Some(&client_pki)).await;
    let without = tls_client_config(Some(&server_pki.ca()), None).unwrap();
    assert!(run(&tls_pool(addr, Some(without)), false).await.is_err());
    let (cert, key) = client_pki.leaf("moat", &["moat.internal"]);
    let with = tls_client_config(Some(&server_pki.ca()), Some((&cert, &key))).unwrap();
    assert_eq!(run(&tls_pool(addr, Some(with)), false).await.unwrap().0, "a b c");
    assert_eq!(state.chats.load(Ordering::SeqCst), 1);
    task.abort();
}

#[test]
fn tls_files_are_checked() {
    let t = tempfile::tempdir().unwrap();
    let empty = t.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let e = tls_client_config(Some(&empty), None).unwrap_err();
    assert!(e.contains("empty.pem") && e.contains("no PEM certificate"), "{e}");
    let missing = t.path().join("missing.pem");
    assert!(
        tls_client_config(Some(&missing), None)
            .unwrap_err()
            .contains("missing.pem")
    );
}
