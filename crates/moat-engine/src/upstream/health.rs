//! Active health checks: every `health_interval`, `GET` the replica's health
//! path (`/v1/models`, `/health`) with its credentials; a 2xx within
//! `health_timeout` passes. `unhealthy_threshold` failures in a row take the
//! replica out of rotation, `healthy_threshold` passes bring it back (and
//! clear a failure cooldown: the replica proved itself again).
//!
//! One task per replica holding only a weak reference, so dropping the pool
//! ends its checks.

use super::{Replica, UpstreamPool};
use http_body_util::{BodyExt, Full};
use hyper::{Request, header};
use std::sync::{Arc, Weak};
use std::time::Duration;

pub(super) fn spawn(pool: Weak<UpstreamPool>, index: usize) {
    tokio::spawn(async move {
        loop {
            let Some(p) = pool.upgrade() else { return };
            let interval = p.config.health_interval;
            let Some(r) = p.replicas.get(index).cloned() else {
                return;
            };
            let ok = check(&p, &r).await;
            if let Some(now_healthy) = r.checked(ok, p.config.unhealthy_threshold, p.config.healthy_threshold)
            {
                if now_healthy {
                    tracing::info!(model = %p.name, upstream = %r.label, "upstream healthy again");
                } else {
                    tracing::warn!(model = %p.name, upstream = %r.label, "upstream unhealthy: out of rotation");
                }
            }
            drop(p);
            tokio::time::sleep(interval).await;
        }
    });
}

async fn check(pool: &UpstreamPool, r: &Arc<Replica>) -> bool {
    let mut req = match Request::get(r.health_uri.clone()).body(Full::default()) {
        Ok(req) => req,
        Err(_) => return false,
    };
    if let Some(auth) = &r.auth {
        req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
    }
    let timeout: Duration = pool.config.health_timeout;
    let probe = async {
        let resp = r.client.request(req).await.ok()?;
        let ok = resp.status().is_success();
        // Read the (small) body so the connection goes back to the pool.
        let _ = resp.into_body().collect().await;
        Some(ok)
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}
