//! The floor for any proxy built on hyper, for `bench/guard.sh`: the same
//! hyper server and pooled keep-alive client moat uses, on the same
//! multi-thread tokio runtime with two workers, and nothing else: no
//! routing, no authentication, no limits, no records, the upstream's body
//! passed back as is. What moat measures above this is the cost of the
//! guard and of moat's own request handling; what this measures above the
//! upstream alone is the cost of one more hop on this machine.
//!
//!   bare_proxy LISTEN_ADDR UPSTREAM_URL
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Full<Bytes>>;

async fn forward(
    client: Upstream,
    to: hyper::Uri,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, String> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let up = Request::post(to)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = client.request(up).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(to)) = (args.next(), args.next()) else {
        return Err("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL".into());
    };
    let to: hyper::Uri = to.parse().map_err(|e| format!("upstream url: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let client: Upstream = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let _ = socket.set_nodelay(true);
            let (client, to) = (client.clone(), to.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| forward(client.clone(), to.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), svc)
                    .await;
            });
        }
    })
}
