//! The metrics that answer "is it healthy", scraped from the real binary
//! after real traffic: request latency by plane/route/status/model, token
//! timing, the engine queue, in-flight requests, every kind of rejection
//! with its stage and reason, the start-up load of each model, and process
//! figures. Names and labels here are the contract the alert rules and the
//! dashboard in `deploy/` rely on (checked again by tests/ops).

// A missing series must fail the test with the whole scrape in the message.
#![allow(clippy::panic)]

mod common;
use common::*;
use serde_json::json;

/// The value of the series written exactly as `series` (name and labels in
/// the order the server writes them), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.split_whitespace().next()?.parse().ok()
    })
}

fn must(text: &str, series: &str) -> f64 {
    match value(text, series) {
        Some(v) => v,
        None => panic!("{series} missing from the scrape:\n{text}"),
    }
}

#[test]
fn healthy_server_metrics_after_traffic() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 3);
    pull_ok(&src, "m", &store);
    let (_, admin) = create_key(&store, "admin", None);
    let (_, scoped) = create_key(&store, "user", Some("other"));
    let server = Server::start(t.path(), &config(&store, &["m"]));
    let chat_url = format!("{}/v1/chat/completions", server.base);

    // Three successful generations, one of them streamed.
    assert_eq!(chat(&server.base, &admin, "m", json!({})).0, 200);
    assert_eq!(chat(&server.base, &admin, "m", json!({"max_tokens": 6})).0, 200);
    let (status, body) = chat(&server.base, &admin, "m", json!({"stream": true}));
    assert_eq!(status, 200);
    assert!(body.as_str().is_some_and(|b| b.contains("[DONE]")), "{body}");
    // One refusal of each kind that exists today.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&chat_url, None, &body).0, 401);
    assert_eq!(post(&chat_url, Some("moat_nope_nope"), &body).0, 401);
    assert_eq!(chat(&server.base, &scoped, "m", json!({})).0, 403);
    assert_eq!(chat(&server.base, &admin, "m", json!({"n": 99})).0, 400);
    assert_eq!(chat(&server.base, &admin, "nope", json!({})).0, 404);
    let huge = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(2 << 20)}]});
    assert_eq!(post(&chat_url, Some(&admin), &huge).0, 413);
    // A non-admin key may not read the metrics: an RBAC refusal too.
    assert_eq!(get(&format!("{}/metrics", server.metrics), Some(&scoped)).0, 403);

    let url = format!("{}/metrics", server.metrics);
    let mut text = String::new();
    // Streams are recorded when their task lets go of the request context,
    // just after the client saw [DONE].
    let settled = wait_until(std::time::Duration::from_secs(10), || {
        let (status, body) = get(&url, Some(&admin));
        assert_eq!(status, 200);
        text = body.as_str().unwrap_or_default().to_owned();
        value(
            &text,
            r#"moat_http_request_duration_seconds_count{plane="inference",route="/v1/chat/completions",status="200",model="m"}"#,
        ) == Some(3.0)
    });
    assert!(settled, "three 200 chat requests expected:\n{text}");

    // Request latency carries plane, route template, status and model; a
    // request refused before the model was known has an empty model.
    must(
        &text,
        r#"moat_http_request_duration_seconds_bucket{le="60.0",plane="inference",route="/v1/chat/completions",status="200",model="m"}"#,
    );
    assert_eq!(
        must(
            &text,
            r#"moat_http_requests_total{plane="inference",route="/v1/chat/completions",status="401",model=""}"#
        ),
        2.0
    );
    assert_eq!(
        must(
            &text,
            r#"moat_http_requests_total{plane="metrics",route="/metrics",status="403",model=""}"#
        ),
        1.0
    );
    // Token timing and counts: one observation per successful generation.
    assert_eq!(
        must(&text, r#"moat_time_to_first_token_seconds_count{model="m"}"#),
        3.0
    );
    assert_eq!(
        must(&text, r#"moat_inter_token_latency_seconds_count{model="m"}"#),
        3.0
    );
    assert!(must(&text, r#"moat_generated_tokens_total{model="m"}"#) >= 3.0);
    assert!(must(&text, r#"moat_prompt_tokens_total{model="m"}"#) > 0.0);
    // The queue: empty now, its capacity, and the wait of each admitted request.
    assert_eq!(must(&text, r#"moat_engine_queue_depth{model="m"}"#), 0.0);
    assert_eq!(must(&text, r#"moat_engine_queue_capacity{model="m"}"#), 64.0);
    assert_eq!(
        must(&text, r#"moat_engine_queue_wait_seconds_count{model="m"}"#),
        3.0
    );
    // In flight: nothing on the inference plane, this scrape on the metrics plane.
    assert_eq!(
        must(&text, r#"moat_http_requests_in_flight{plane="inference"}"#),
        0.0
    );
    assert_eq!(
        must(&text, r#"moat_http_requests_in_flight{plane="metrics"}"#),
        1.0
    );
    // Every refusal, by stage and reason.
    for (stage, reason, n) in [
        ("auth", "missing_key", 1.0),
        ("auth", "invalid_key", 1.0),
        ("rbac", "model_scope", 1.0),
        ("rbac", "admin_required", 1.0),
        ("validation", "invalid_request", 1.0),
        ("validation", "model_not_found", 1.0),
        ("limits", "body_too_large", 1.0),
    ] {
        let series = format!(r#"moat_rejections_total{{stage="{stage}",reason="{reason}"}}"#);
        assert_eq!(must(&text, &series), n, "{series}");
    }
    // The start-up load of the model, stage by stage.
    assert_eq!(
        must(
            &text,
            r#"moat_model_verifications_total{model="m",check="hashes",result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        must(&text, r#"moat_model_scans_total{model="m",result="clean"}"#),
        1.0
    );
    assert_eq!(
        must(
            &text,
            r#"moat_model_load_seconds_count{model="m",result="loaded"}"#
        ),
        1.0
    );
    for stage in ["scan", "verify", "engine"] {
        must(
            &text,
            &format!(r#"moat_model_load_stage_seconds_count{{model="m",stage="{stage}",result="ok"}}"#),
        );
    }
    assert_eq!(must(&text, "moat_models_loaded"), 1.0);
    assert_eq!(must(&text, "moat_models_refused"), 0.0);
    assert_eq!(must(&text, "moat_audit_write_failures_total"), 0.0);
    // Process figures, unprefixed as every Prometheus client writes them.
    assert!(must(&text, "process_cpu_seconds_total") > 0.0);
    assert!(must(&text, "process_resident_memory_bytes") > 1e6);
    assert!(must(&text, "process_open_fds") >= 3.0);
    let start = must(&text, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "start {start} now {now}"
    );
    // No GPU feature in this build: the GPU series are absent, not zero.
    if !cfg!(feature = "nvml") {
        assert!(!text.contains("moat_gpu_"), "{text}");
    }
    assert_eq!(server.stop(), 0);
}

#[test]
fn refused_model_is_counted_as_a_failed_verification() {
    let t = tmp();
    let store = t.path().join("store");
    let src = t.path().join("src");
    demo_model(&src, 4);
    pull_ok(&src, "bad", &store);
    flip_byte(&model_file(&store, "bad", "model.safetensors"), 5000);
    let (_, admin) = create_key(&store, "admin", None);
    let server = Server::start(t.path(), &config(&store, &["bad"]));
    let (status, body) = get(&format!("{}/metrics", server.metrics), Some(&admin));
    assert_eq!(status, 200);
    let text = body.as_str().unwrap_or_default();
    assert_eq!(
        must(
            text,
            r#"moat_model_verifications_total{model="bad",check="hashes",result="failed"}"#
        ),
        1.0
    );
    assert_eq!(
        must(
            text,
            r#"moat_model_load_seconds_count{model="bad",result="refused"}"#
        ),
        1.0
    );
    assert_eq!(must(text, "moat_models_loaded"), 0.0);
    assert_eq!(must(text, "moat_models_refused"), 1.0);
    // The engine never started: no queue series for a model that is not served.
    assert!(!text.contains("moat_engine_queue_depth{"), "{text}");
    assert_eq!(server.stop(), 0);
}
