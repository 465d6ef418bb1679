//! AWS KMS as a key-encryption-key provider: `GenerateDataKey` (AES_256)
//! for new objects, `Decrypt` to unwrap, `Encrypt` to rewrap a data key
//! under a KMS key version, and `CreateKey` for setup and tests.
//!
//! It speaks the KMS JSON protocol directly (`POST /`,
//! `X-Amz-Target: TrentService.<Operation>`, SigV4-signed) over a blocking
//! HTTP client, rather than linking the AWS SDK. Configuration is explicit:
//! [`KmsConfig::from_env`] takes a lookup function, so callers decide where
//! values come from (the process environment in the CLI, a map in tests).
//!
//! Plain `http://` endpoints are accepted only on loopback (a local KMS
//! emulator such as moto): `GenerateDataKey` and `Decrypt` return plaintext
//! data keys, which must never cross a network unencrypted.

use super::{CryptoError, Key32, sigv4};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use std::fmt;
use std::time::Duration;
use zeroize::Zeroizing;

/// Response bodies larger than this are refused (KMS answers are < 8 KiB).
const MAX_RESPONSE: u64 = 1 << 20;

/// Static AWS credentials. The secret is never printed.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Option<String>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where and as whom to call KMS.
#[derive(Debug, Clone)]
pub struct KmsConfig {
    pub region: String,
    /// Base URL; default `https://kms.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    pub credentials: AwsCredentials,
    /// Per-request timeout (connect + response).
    pub timeout: Duration,
}

impl KmsConfig {
    /// From the standard AWS variables, looked up through `get`:
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`, optional
    /// endpoint `AWS_ENDPOINT_URL_KMS` (or `AWS_ENDPOINT_URL`).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, CryptoError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let need = |k: &str| get(k).ok_or_else(|| CryptoError::Invalid(format!("AWS KMS: {k} is not set")));
        let region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .ok_or_else(|| CryptoError::Invalid("AWS KMS: AWS_REGION is not set".into()))?;
        Ok(Self {
            region,
            endpoint: get("AWS_ENDPOINT_URL_KMS").or_else(|| get("AWS_ENDPOINT_URL")),
            credentials: AwsCredentials {
                access_key_id: need("AWS_ACCESS_KEY_ID")?,
                secret_access_key: Zeroizing::new(need("AWS_SECRET_ACCESS_KEY")?),
                session_token: get("AWS_SESSION_TOKEN"),
            },
            timeout: Duration::from_secs(30),
        })
    }
}

/// A KMS client for one region and endpoint.
#[derive(Clone)]
pub struct KmsClient {
    config: KmsConfig,
    url: String,
    host: String,
    agent: ureq::Agent,
}

impl fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClient")
            .field("url", &self.url)
            .field("region", &self.config.region)
            .finish()
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl KmsClient {
    pub fn new(config: KmsConfig) -> Result<Self, CryptoError> {
        let bad = |m: String| CryptoError::Invalid(format!("AWS KMS endpoint: {m}"));
        if config.region.is_empty()
            || !config
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(CryptoError::Invalid(format!(
                "AWS KMS: region {:?} is not a region name",
                config.region
            )));
        }
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://kms.{}.amazonaws.com", config.region));
        let uri: ureq::http::Uri = endpoint.parse().map_err(|e| bad(format!("{endpoint:?}: {e}")))?;
        let scheme = uri.scheme_str().unwrap_or("");
        let host = uri
            .host()
            .ok_or_else(|| bad(format!("{endpoint:?} has no host")))?;
        match scheme {
            "https" => {}
            "http" if is_loopback(host) => {}
            "http" => {
                return Err(bad(format!(
                    "{endpoint:?}: plain http is allowed only to loopback; KMS returns plaintext data keys"
                )));
            }
            _ => return Err(bad(format!("{endpoint:?}: expected an https:// URL"))),
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad(format!("{endpoint:?}: expected no path or query")));
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        let host_header = match uri.port_u16() {
            Some(p) if p != default_port => format!("{host}:{p}"),
            _ => host.to_owned(),
        };
        let agent_config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(config.timeout))
            .build();
        Ok(Self {
            url: format!("{scheme}://{host_header}/"),
            host: host_header,
            agent: ureq::Agent::new_with_config(agent_config),
            config,
        })
    }

    /// The endpoint URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn call(&self, operation: &'static str, body: &Value) -> Result<Value, CryptoError> {
        let err = |message: String| CryptoError::Kms { operation, message };
        let payload = serde_json::to_vec(body).map_err(|e| err(e.to_string()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let amz_date = sigv4::amz_date(now);
        let target = format!("TrentService.{operation}");
        let mut headers = vec![
            ("content-type", "application/x-amz-json-1.1"),
            ("host", self.host.as_str()),
            ("x-amz-date", amz_date.as_str()),
            ("x-amz-target", target.as_str()),
        ];
        if let Some(token) = &self.config.credentials.session_token {
            headers.push(("x-amz-security-token", token.as_str()));
        }
        let authorization = sigv4::authorization(
            &self.config.credentials.access_key_id,
            &self.config.credentials.secret_access_key,
            &sigv4::Request {
                method: "POST",
                path: "/",
                headers: &headers,
                payload: &payload,
                amz_date: &amz_date,
                region: &self.config.region,
                service: "kms",
            },
        );
        let mut req = self.agent.post(&self.url);
        for (k, v) in &headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .header("authorization", &authorization)
            .send(&payload[..])
            .map_err(|e| err(format!("{}: {e}", self.url)))?;
        let status = resp.status().as_u16();
        let text = resp
            .into_body()
            .into_with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(|e| err(format!("reading the response: {e}")))?;
        let value: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
        if status != 200 {
            // KMS errors: {"__type": "…Exception", "message": "…"}.
            let kind = value
                .get("__type")
                .and_then(Value::as_str)
                .map(|t| t.rsplit('#').next().unwrap_or(t).to_owned())
                .unwrap_or_else(|| format!("HTTP {status}"));
            let message = value
                .get("message")
                .or_else(|| value.get("Message"))
                .and_then(Value::as_str)
                .unwrap_or("");
            return Err(err(if message.is_empty() {
                kind
            } else {
                format!("{kind}: {message}")
            }));
        }
        if value.is_null() {
            return Err(err("the response is not JSON".into()));
        }
        Ok(value)
    }

    fn b64_field(operation: &'static str, v: &Value, field: &str) -> Result<Vec<u8>, CryptoError> {
        let s = v
            .get(field)
            .and_then(Value::as_str)
            .ok_or_else(|| CryptoError::Kms {
                operation,
                message: format!("the response has no {field}"),
            })?;
        STANDARD.decode(s).map_err(|e| CryptoError::Kms {
            operation,
            message: format!("{field} is not base64: {e}"),
        })
    }

    fn data_key(operation: &'static str, v: &Value) -> Result<Key32, CryptoError> {
        let plain = Zeroizing::new(Self::b64_field(operation, v, "Plaintext")?);
        Key32::from_slice(&plain).ok_or_else(|| CryptoError::Kms {
            operation,
            message: format!("expected a 32-byte data key, got {} bytes", plain.len()),
        })
    }

    /// A fresh AES-256 data key: (plaintext, CiphertextBlob).
    pub(crate) fn generate_data_key(
        &self,
        key_id: &str,
        context: &Value,
    ) -> Result<(Key32, Vec<u8>), CryptoError> {
        const OP: &str = "GenerateDataKey";
        let v = self.call(
            OP,
            &json!({"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context}),
        )?;
        Ok((
            Self::data_key(OP, &v)?,
            Self::b64_field(OP, &v, "CiphertextBlob")?,
        ))
    }

    /// Unwrap a CiphertextBlob; `key_id` must be the key that wrapped it.
    pub(crate) fn decrypt(&self, key_id: &str, blob: &[u8], context: &Value) -> Result<Key32, CryptoError> {
        const OP: &str = "Decrypt";
        let v = self.call(
            OP,
            &json!({
                "KeyId": key_id,
                "CiphertextBlob": STANDARD.encode(blob),
                "EncryptionContext": context,
            }),
        )?;
        Self::data_key(OP, &v)
    }

    /// Wrap an existing data key under `key_id` (used by rewrap).
    pub(crate) fn encrypt(&self, key_id: &str, key: &Key32, context: &Value) -> Result<Vec<u8>, CryptoError> {
        const OP: &str = "Encrypt";
        let plain = Zeroizing::new(STANDARD.encode(key.bytes()));
        let v = self.call(
            OP,
            &json!({"KeyId": key_id, "Plaintext": plain.as_str(), "EncryptionContext": context}),
        )?;
        Self::b64_field(OP, &v, "CiphertextBlob")
    }

    /// Check that `key_id` exists and that these credentials may both
    /// generate and decrypt data keys with it (one GenerateDataKey and one
    /// Decrypt), before an operator makes it the current KEK.
    pub fn check_key(&self, key_id: &str) -> Result<(), CryptoError> {
        let context = json!({"moat:purpose": "key-check"});
        let (key, blob) = self.generate_data_key(key_id, &context)?;
        let back = self.decrypt(key_id, &blob, &context)?;
        if back.bytes() != key.bytes() {
            return Err(CryptoError::Kms {
                operation: "Decrypt",
                message: "returned a different data key than GenerateDataKey".into(),
            });
        }
        Ok(())
    }

    /// Create a symmetric encryption key; returns its ARN.
    pub fn create_key(&self, description: &str) -> Result<String, CryptoError> {
        const OP: &str = "CreateKey";
        let v = self.call(
            OP,
            &json!({
                "Description": description,
                "KeySpec": "SYMMETRIC_DEFAULT",
                "KeyUsage": "ENCRYPT_DECRYPT",
            }),
        )?;
        v.pointer("/KeyMetadata/Arn")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| CryptoError::Kms {
                operation: OP,
                message: "the response has no KeyMetadata.Arn".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const CREDS: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", "AKID"), ("AWS_SECRET_ACCESS_KEY", "s")];

    #[test]
    fn config_from_env_names_the_missing_variable() {
        let e = KmsConfig::from_env(env(&CREDS)).unwrap_err();
        assert!(e.to_string().contains("AWS_REGION"), "{e}");
        let e = KmsConfig::from_env(env(&[("AWS_REGION", "eu-west-1"), CREDS[0]])).unwrap_err();
        assert!(e.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{e}");
        let c = KmsConfig::from_env(env(&[("AWS_DEFAULT_REGION", "eu-west-1"), CREDS[0], CREDS[1]])).unwrap();
        assert_eq!(c.region, "eu-west-1");
        assert!(c.endpoint.is_none());
        assert!(!format!("{c:?}").contains("\"s\""), "secret printed: {c:?}");
        let client = KmsClient::new(c).unwrap();
        assert_eq!(client.url(), "https://kms.eu-west-1.amazonaws.com/");
    }

    #[test]
    fn endpoints() {
        let with = |endpoint: &str| {
            let mut c = KmsConfig::from_env(env(&[("AWS_REGION", "us-east-1"), CREDS[0], CREDS[1]])).unwrap();
            c.endpoint = Some(endpoint.to_owned());
            KmsClient::new(c)
        };
        assert_eq!(
            with("http://127.0.0.1:4566").unwrap().url(),
            "http://127.0.0.1:4566/"
        );
        assert_eq!(with("http://localhost:4566/").unwrap().host, "localhost:4566");
        assert_eq!(with("http://[::1]:80").unwrap().host, "[::1]");
        assert_eq!(with("https://kms.example:443").unwrap().host, "kms.example");
        let e = with("http://kms.example.com").unwrap_err().to_string();
        assert!(e.contains("only to loopback"), "{e}");
        assert!(with("ftp://127.0.0.1").is_err());
        assert!(with("https://kms.example/path").is_err());
    }
}
