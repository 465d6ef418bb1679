//! `[tracing]`: OpenTelemetry trace export over OTLP/HTTP (protobuf). Off
//! unless `otlp_endpoint` is set: traces leave the machine, so sending them
//! is an explicit choice, never a default.

use super::access::{RawDuration, parse_duration};
use super::{ConfigError, invalid};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// Collector base URL (`http://127.0.0.1:4318`); spans go to
    /// `{endpoint}/v1/traces` unless the URL already ends with that path.
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    /// Fraction of new traces recorded, 0.0 to 1.0 (default 1.0). A request
    /// carrying a W3C `traceparent` follows its caller's sampled flag.
    pub sample_ratio: Option<f64>,
    /// Spans waiting for export before new ones are dropped (and counted).
    pub max_queue_spans: Option<usize>,
    /// How long one export request may take before it is abandoned.
    pub export_timeout: Option<RawDuration>,
}

/// Validated `[tracing]`; `None` in [`super::Config`] when export is off.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The full URL spans are POSTed to (ends with `/v1/traces`).
    pub traces_url: String,
    pub service_name: String,
    pub sample_ratio: f64,
    pub max_queue_spans: usize,
    pub export_timeout: Duration,
}

pub const DEFAULT_MAX_QUEUE_SPANS: usize = 4096;
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

impl RawTracing {
    pub fn validate(self) -> Result<Option<TracingConfig>, ConfigError> {
        let Some(endpoint) = self.otlp_endpoint else {
            for (set, key) in [
                (self.service_name.is_some(), "tracing.service_name"),
                (self.sample_ratio.is_some(), "tracing.sample_ratio"),
                (self.max_queue_spans.is_some(), "tracing.max_queue_spans"),
                (self.export_timeout.is_some(), "tracing.export_timeout"),
            ] {
                if set {
                    return Err(invalid(key, "has no effect without tracing.otlp_endpoint"));
                }
            }
            return Ok(None);
        };
        let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
        let rest = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .ok_or_else(|| {
                invalid(
                    "tracing.otlp_endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                )
            })?;
        if rest.is_empty() || rest.starts_with('/') || endpoint.contains(['?', '#', ' ']) {
            return Err(invalid(
                "tracing.otlp_endpoint",
                format!("{endpoint:?} needs a host and no query or fragment"),
            ));
        }
        // The endpoint is logged at start; credentials in it would be too.
        if rest
            .split('/')
            .next()
            .is_some_and(|authority| authority.contains('@'))
        {
            return Err(invalid(
                "tracing.otlp_endpoint",
                "credentials in the URL are not supported (they would be logged); use a local collector",
            ));
        }
        let traces_url = if endpoint.ends_with("/v1/traces") {
            endpoint
        } else {
            format!("{endpoint}/v1/traces")
        };
        let service_name = self.service_name.unwrap_or_else(|| "moat".to_owned());
        if service_name.trim().is_empty() || service_name.len() > 256 {
            return Err(invalid("tracing.service_name", "must be 1 to 256 characters"));
        }
        let sample_ratio = self.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(invalid(
                "tracing.sample_ratio",
                format!("{sample_ratio} is not between 0.0 and 1.0"),
            ));
        }
        let max_queue_spans = self.max_queue_spans.unwrap_or(DEFAULT_MAX_QUEUE_SPANS);
        if !(16..=1_000_000).contains(&max_queue_spans) {
            return Err(invalid(
                "tracing.max_queue_spans",
                format!("{max_queue_spans} is not between 16 and 1000000"),
            ));
        }
        let export_timeout = match self.export_timeout {
            None => DEFAULT_EXPORT_TIMEOUT,
            Some(RawDuration::Seconds(s)) => Duration::from_secs(s),
            Some(RawDuration::Text(t)) => parse_duration(&t).ok_or_else(|| {
                invalid(
                    "tracing.export_timeout",
                    format!("{t:?} is not a duration like \"500ms\" or \"5s\""),
                )
            })?,
        };
        if export_timeout < Duration::from_millis(100) || export_timeout > Duration::from_secs(60) {
            return Err(invalid(
                "tracing.export_timeout",
                format!("{export_timeout:?} is not between 100ms and 60s"),
            ));
        }
        Ok(Some(TracingConfig {
            traces_url,
            service_name,
            sample_ratio,
            max_queue_spans,
            export_timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn parse(text: &str) -> Result<Option<TracingConfig>, String> {
        let raw: RawTracing = toml::from_str(text).map_err(|e| e.to_string())?;
        raw.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn off_by_default_and_stray_keys_are_refused() {
        assert_eq!(parse(""), Ok(None));
        let e = parse("sample_ratio = 0.5").unwrap_err();
        assert!(e.starts_with("tracing.sample_ratio:"), "{e}");
    }

    #[test]
    fn endpoint_gets_the_traces_path_once() {
        let c = parse("otlp_endpoint = \"http://127.0.0.1:4318/\"")
            .unwrap()
            .unwrap();
        assert_eq!(c.traces_url, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(c.service_name, "moat");
        assert_eq!(c.sample_ratio, 1.0);
        let c = parse("otlp_endpoint = \"https://otel.example/v1/traces\"")
            .unwrap()
            .unwrap();
        assert_eq!(c.traces_url, "https://otel.example/v1/traces");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("otlp_endpoint = \"127.0.0.1:4318\"", "tracing.otlp_endpoint"),
            ("otlp_endpoint = \"http://\"", "tracing.otlp_endpoint"),
            (
                "otlp_endpoint = \"https://user:pw@otel.example\"",
                "tracing.otlp_endpoint",
            ),
            (
                "otlp_endpoint = \"http://h\"\nsample_ratio = 1.5",
                "tracing.sample_ratio",
            ),
            (
                "otlp_endpoint = \"http://h\"\nmax_queue_spans = 1",
                "tracing.max_queue_spans",
            ),
            (
                "otlp_endpoint = \"http://h\"\nexport_timeout = \"soon\"",
                "tracing.export_timeout",
            ),
            (
                "otlp_endpoint = \"http://h\"\nservice_name = \"\"",
                "tracing.service_name",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(&format!("{key}:")), "{text}: {e}");
        }
    }
}
