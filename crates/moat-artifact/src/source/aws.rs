//! AWS credentials, region and endpoint for S3 pulls, found the way the AWS
//! CLI and SDKs find them (a subset: no SSO, no process credentials, no
//! instance metadata, which the sources policy would refuse anyway):
//!
//! 1. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
//! 2. the shared files for `AWS_PROFILE` (default `default`):
//!    `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`), then
//!    `AWS_CONFIG_FILE` (default `~/.aws/config`, section `[profile NAME]`);
//! 3. web identity: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (EKS
//!    IRSA), exchanged with STS `AssumeRoleWithWebIdentity` (endpoint
//!    `AWS_ENDPOINT_URL_STS`, else `AWS_ENDPOINT_URL`, else
//!    `https://sts.REGION.amazonaws.com`);
//! 4. none: requests go unsigned (public buckets).
//!
//! Everything is read through [`Env`], and secrets live in
//! [`AwsCredentials`] (zeroized, redacted in `Debug`); nothing here logs or
//! puts a secret on a command line.

use super::{Env, SourceError};
use crate::crypto::AwsCredentials;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

/// Where the credentials came from (for messages; never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Environment,
    Profile(String),
    WebIdentity(String),
    Anonymous,
}

impl std::fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialSource::Environment => f.write_str("AWS_ACCESS_KEY_ID from the environment"),
            CredentialSource::Profile(p) => write!(f, "profile {p:?} of the shared credentials files"),
            CredentialSource::WebIdentity(r) => write!(f, "web identity for role {r}"),
            CredentialSource::Anonymous => f.write_str("no credentials (anonymous)"),
        }
    }
}

/// Region, endpoint and credentials for S3.
#[derive(Debug, Clone)]
pub struct AwsS3Config {
    pub region: String,
    /// Base URL without a trailing slash (path-style requests go below it).
    pub endpoint: String,
    pub credentials: Option<AwsCredentials>,
    pub credential_source: CredentialSource,
}

fn home_file(env: &Env, var: &str, default: &str) -> Option<PathBuf> {
    env.get(var)
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|h| Path::new(&h).join(default)))
}

/// `key = value` pairs of section `section` of an INI file (AWS's shared
/// files), or `None` when the file or section is absent.
fn ini_section(text: &str, section: &str) -> Option<Vec<(String, String)>> {
    let mut current: Option<String> = None;
    let mut out = None::<Vec<(String, String)>>;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim().to_owned());
            if name.trim() == section && out.is_none() {
                out = Some(Vec::new());
            }
            continue;
        }
        if current.as_deref() == Some(section)
            && let (Some(kv), Some((k, v))) = (out.as_mut(), line.split_once('='))
        {
            kv.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn lookup(kv: &[(String, String)], key: &str) -> Option<String> {
    kv.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

fn read_optional(path: &Path) -> Result<Option<String>, SourceError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SourceError::Remote {
            url: path.display().to_string(),
            message: format!("cannot read AWS shared file: {e}"),
        }),
    }
}

impl AwsS3Config {
    /// Resolve region, endpoint and credentials from `env` (see the module
    /// comment for the order).
    pub fn from_env(env: &Env) -> Result<Self, SourceError> {
        let profile = env.get("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let creds_file = home_file(env, "AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
        let config_file = home_file(env, "AWS_CONFIG_FILE", ".aws/config");
        let creds_section = match &creds_file {
            Some(p) => read_optional(p)?.and_then(|t| ini_section(&t, &profile)),
            None => None,
        };
        let config_section = match &config_file {
            Some(p) => read_optional(p)?.and_then(|t| {
                let name = if profile == "default" {
                    "default".to_owned()
                } else {
                    format!("profile {profile}")
                };
                ini_section(&t, &name)
            }),
            None => None,
        };
        let from_profile = |key: &str| {
            creds_section
                .as_deref()
                .and_then(|s| lookup(s, key))
                .or_else(|| config_section.as_deref().and_then(|s| lookup(s, key)))
        };
        let region = env
            .get("AWS_REGION")
            .or_else(|| env.get("AWS_DEFAULT_REGION"))
            .or_else(|| from_profile("region"))
            .unwrap_or_else(|| "us-east-1".into());
        if !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(SourceError::Remote {
                url: "s3".into(),
                message: format!("AWS region {region:?} is not a region name"),
            });
        }
        let endpoint = env
            .get("AWS_ENDPOINT_URL_S3")
            .or_else(|| env.get("AWS_ENDPOINT_URL"))
            .or_else(|| from_profile("endpoint_url"))
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"))
            .trim_end_matches('/')
            .to_owned();

        let (credentials, credential_source) = if let (Some(id), Some(secret)) =
            (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"))
        {
            (
                Some(AwsCredentials {
                    access_key_id: id,
                    secret_access_key: Zeroizing::new(secret),
                    session_token: env.get("AWS_SESSION_TOKEN"),
                }),
                CredentialSource::Environment,
            )
        } else if let (Some(id), Some(secret)) = (
            from_profile("aws_access_key_id"),
            from_profile("aws_secret_access_key"),
        ) {
            (
                Some(AwsCredentials {
                    access_key_id: id,
                    secret_access_key: Zeroizing::new(secret),
                    session_token: from_profile("aws_session_token"),
                }),
                CredentialSource::Profile(profile.clone()),
            )
        } else if let (Some(token_file), Some(role)) = (
            env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
                .or_else(|| from_profile("web_identity_token_file")),
            env.get("AWS_ROLE_ARN").or_else(|| from_profile("role_arn")),
        ) {
            let session = env
                .get("AWS_ROLE_SESSION_NAME")
                .unwrap_or_else(|| format!("moat-{}", std::process::id()));
            let sts = env
                .get("AWS_ENDPOINT_URL_STS")
                .or_else(|| env.get("AWS_ENDPOINT_URL"))
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
            let creds = assume_role_with_web_identity(&sts, Path::new(&token_file), &role, &session)?;
            (Some(creds), CredentialSource::WebIdentity(role))
        } else {
            (None, CredentialSource::Anonymous)
        };
        Ok(Self {
            region,
            endpoint,
            credentials,
            credential_source,
        })
    }
}

fn is_loopback_url(url: &str) -> bool {
    url.parse::<ureq::http::Uri>().is_ok_and(|u| {
        u.host().is_some_and(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        })
    })
}

/// STS `AssumeRoleWithWebIdentity` (an unsigned call: the web identity
/// token is the credential). Plain http only to loopback (an emulator):
/// the answer holds a secret key.
fn assume_role_with_web_identity(
    endpoint: &str,
    token_file: &Path,
    role_arn: &str,
    session: &str,
) -> Result<AwsCredentials, SourceError> {
    let err = |message: String| SourceError::Remote {
        url: endpoint.to_owned(),
        message: format!("STS AssumeRoleWithWebIdentity: {message}"),
    };
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://") && is_loopback_url(endpoint)) {
        return Err(err(
            "the STS endpoint must be https:// (plain http only to loopback)".into(),
        ));
    }
    let token = Zeroizing::new(
        std::fs::read_to_string(token_file)
            .map_err(|e| err(format!("{}: {e}", token_file.display())))?
            .trim()
            .to_owned(),
    );
    let form = Zeroizing::new(format!(
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
        super::encode_segment(role_arn),
        super::encode_segment(session),
        super::encode_segment(&token)
    ));
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    );
    let url = format!("{}/", endpoint.trim_end_matches('/'));
    let resp = agent
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(form.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .into_with_config()
        .limit(1 << 20)
        .read_to_string()
        .map_err(|e| err(e.to_string()))?;
    if status != 200 {
        let code = xml_tag(&body, "Code").unwrap_or_else(|| format!("HTTP {status}"));
        let message = xml_tag(&body, "Message").unwrap_or_default();
        return Err(SourceError::refused(
            endpoint,
            "source.credentials",
            format!("STS refused AssumeRoleWithWebIdentity for {role_arn}: {code} {message}"),
        ));
    }
    let field = |t: &str| xml_tag(&body, t).ok_or_else(|| err(format!("the answer has no {t}")));
    Ok(AwsCredentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: Zeroizing::new(field("SecretAccessKey")?),
        session_token: Some(field("SessionToken")?),
    })
}

/// The text of the first `<tag>…</tag>` in an XML document, entities
/// decoded. Enough for the flat answers of S3 and STS.
pub fn xml_tag(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml.get(start..)?.find(&close)?;
    Some(xml_unescape(xml.get(start..end)?))
}

/// Every `<tag>…</tag>` block's inner text, in order.
pub fn xml_blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

pub fn xml_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let Some(semi) = after.find(';') else {
            out.push_str(after);
            return out;
        };
        let entity = &after[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e => e
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &after[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step must abort")]
    use super::*;
    use std::collections::BTreeMap;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_map(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn environment_first_then_profile() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = DEF\naws_secret_access_key = defsecret\n\n\
             [ci]\naws_access_key_id = CI\naws_secret_access_key = cisecret\naws_session_token = tok\n",
        )
        .unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, "[profile ci]\nregion = eu-west-3\n").unwrap();
        let c = creds.to_str().unwrap();
        let g = config.to_str().unwrap();

        let e = env(&[
            ("AWS_ACCESS_KEY_ID", "ENV"),
            ("AWS_SECRET_ACCESS_KEY", "envsecret"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_REGION", "us-west-2"),
        ]);
        let cfg = AwsS3Config::from_env(&e).unwrap();
        assert_eq!(cfg.credentials.unwrap().access_key_id, "ENV");
        assert_eq!(cfg.endpoint, "https://s3.us-west-2.amazonaws.com");

        let e = env(&[
            ("AWS_PROFILE", "ci"),
            ("AWS_SHARED_CREDENTIALS_FILE", c),
            ("AWS_CONFIG_FILE", g),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/"),
        ]);
        let cfg = AwsS3Config::from_env(&e).unwrap();
        let creds = cfg.credentials.unwrap();
        assert_eq!(creds.access_key_id, "CI");
        assert_eq!(creds.session_token.as_deref(), Some("tok"));
        assert_eq!(cfg.region, "eu-west-3");
        assert_eq!(cfg.endpoint, "http://127.0.0.1:9000");
        assert_eq!(cfg.credential_source, CredentialSource::Profile("ci".into()));
        // The secret never shows in Debug output.
        assert!(!format!("{creds:?}").contains("cisecret"));

        let cfg = AwsS3Config::from_env(&env(&[("HOME", "/nonexistent")])).unwrap();
        assert!(cfg.credentials.is_none());
        assert_eq!(cfg.credential_source, CredentialSource::Anonymous);
    }

    #[test]
    fn xml_helpers() {
        let x = "<E><Code>AccessDenied</Code><Message>a &amp; b &#x41;</Message></E>";
        assert_eq!(xml_tag(x, "Code").unwrap(), "AccessDenied");
        assert_eq!(xml_tag(x, "Message").unwrap(), "a & b A");
        assert_eq!(
            xml_blocks("<C><K>1</K></C><C><K>2</K></C>", "C"),
            vec!["<K>1</K>", "<K>2</K>"]
        );
    }
}
