//! Allowed model sources (`[sources]`): which schemes, hosts, buckets and
//! repositories a pull may reach, and which IP addresses a connection may
//! land on. Deny by default: a URL, a redirect hop or a DNS answer that no
//! rule allows is refused before a byte is sent.
//!
//! Why it is shaped so: TorchServe's CVE-2023-43654 / CVE-2024-35198 were
//! SSRF through "load a model from this URL". So every hop is checked by
//! host, and the DNS answer is checked too (loopback, RFC 1918, ULA,
//! link-local, CGNAT, multicast, the cloud metadata addresses): a public
//! name resolving to 169.254.169.254 is as refused as the literal. The
//! checked addresses are the ones the HTTP client connects to
//! ([`PinnedResolver`] is ureq's resolver), so a DNS answer that changes
//! between check and connect (rebinding) cannot slip through.

use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// The scheme a rule (and a source) is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    File,
    S3,
    Hf,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::File => "file",
            Scheme::S3 => "s3",
            Scheme::Hf => "hf",
            Scheme::Https => "https",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "file" => Scheme::File,
            "s3" => Scheme::S3,
            "hf" => Scheme::Hf,
            "https" => Scheme::Https,
            _ => return None,
        })
    }
}

/// `[sources]` as written in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSources {
    /// Keep the built-in rules (default true); false allows only `allow`.
    pub defaults: Option<bool>,
    #[serde(default)]
    pub allow: Vec<RawRule>,
}

/// One `[[sources.allow]]` rule as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub scheme: String,
    pub host: Option<String>,
    pub prefix: Option<String>,
    pub allow_private: Option<bool>,
    pub allow_http: Option<bool>,
    #[serde(default)]
    pub cidrs: Vec<String>,
}

/// A host pattern: `*` (any), `*.example.com` (proper subdomains) or an
/// exact name / IP literal (case-insensitive, IPv6 without brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Suffix(String),
    Exact(String),
}

impl HostPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(format!("{s:?}: expected *, *.domain or a host name"));
            }
            return Ok(HostPattern::Suffix(format!(".{rest}")));
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']').to_owned();
        if bare.is_empty() || bare.contains(['*', '/', ' ']) {
            return Err(format!("{s:?}: expected *, *.domain or a host name"));
        }
        Ok(HostPattern::Exact(bare))
    }

    fn matches(&self, host: &str) -> bool {
        let host = normalize_host(host);
        match self {
            HostPattern::Any => true,
            HostPattern::Suffix(sfx) => host.ends_with(sfx.as_str()) && host.len() > sfx.len(),
            HostPattern::Exact(h) => *h == host,
        }
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, b)) => (ip, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: not an IP network"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Self { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical_ip(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a.get(..full) != b.get(..full) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(full), b.get(full)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// One validated allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub scheme: Scheme,
    /// Which hosts: for `s3` the endpoint, for `hf` the Hub or its CDN, for
    /// `https` the server (every redirect hop too). Ignored for `file`.
    pub host: HostPattern,
    /// For `s3`: `bucket` or `bucket/key-prefix`; for `hf`: `org` or
    /// `org/repo`; for `https`: a path prefix; for `file`: a folder. Applies
    /// to the source URL, not to redirect hops (CDN paths are opaque).
    pub prefix: Option<String>,
    /// Addresses in private, loopback, link-local or metadata ranges are
    /// allowed for this host.
    pub allow_private: bool,
    /// Plain `http://` is allowed for this host.
    pub allow_http: bool,
    /// Non-public addresses allowed for this host, narrower than
    /// `allow_private`.
    pub cidrs: Vec<Cidr>,
}

impl Rule {
    fn new(scheme: Scheme, host: &str) -> Self {
        Self {
            scheme,
            host: HostPattern::parse(host).unwrap_or(HostPattern::Exact(host.to_owned())),
            prefix: None,
            allow_private: false,
            allow_http: false,
            cidrs: Vec::new(),
        }
    }

    fn prefix_matches(&self, key: &str) -> bool {
        let Some(p) = &self.prefix else { return true };
        let p = p.trim_end_matches('/');
        if p.is_empty() {
            return true;
        }
        // Whole components only: prefix `org/re` must not allow `org/repo2`.
        key == p || key.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
    }

    /// May this rule's host land on `ip`?
    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.allow_private || self.cidrs.iter().any(|c| c.contains(ip))
    }
}

/// The Hugging Face Hub and the CDN hosts its `resolve` URLs redirect to
/// (LFS: `cdn-lfs*.huggingface.co`; Xet storage: `cas-bridge.xethub.hf.co`
/// and other `*.hf.co` hosts).
pub const HF_DEFAULT_HOSTS: &[&str] = &[
    "huggingface.co",
    "cdn-lfs.huggingface.co",
    "cdn-lfs-us-1.huggingface.co",
    "cdn-lfs-eu-1.huggingface.co",
    "*.hf.co",
];

/// A refusal by the policy: always names the URL or host and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sources policy: {0}")]
pub struct PolicyRefusal(pub String);

/// The validated `[sources]` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    pub rules: Vec<Rule>,
}

impl Default for SourcePolicy {
    /// The built-in rules: local folders; the official Hub and its CDN;
    /// AWS S3 endpoints; HTTPS to any host. Public addresses only, no plain
    /// http.
    fn default() -> Self {
        let mut rules = vec![Rule::new(Scheme::File, "*")];
        rules.extend(HF_DEFAULT_HOSTS.iter().map(|h| Rule::new(Scheme::Hf, h)));
        rules.push(Rule::new(Scheme::S3, "*.amazonaws.com"));
        rules.push(Rule::new(Scheme::S3, "*.amazonaws.com.cn"));
        rules.push(Rule::new(Scheme::Https, "*"));
        Self { rules }
    }
}

impl RawSources {
    /// Validate into a policy; errors name the key under `prefix`
    /// (`sources.allow[1].host: …`).
    pub fn validate(&self, prefix: &str) -> Result<SourcePolicy, (String, String)> {
        let mut rules = match self.defaults.unwrap_or(true) {
            true => SourcePolicy::default().rules,
            false => Vec::new(),
        };
        for (i, r) in self.allow.iter().enumerate() {
            let key = |k: &str| format!("{prefix}.allow[{i}].{k}");
            let scheme = Scheme::parse(&r.scheme).ok_or_else(|| {
                (
                    key("scheme"),
                    format!("{:?}: expected file, s3, hf or https", r.scheme),
                )
            })?;
            let host = match (&r.host, scheme) {
                (None, Scheme::File) => HostPattern::Any,
                (Some(_), Scheme::File) => {
                    return Err((key("host"), "file rules have no host".into()));
                }
                (None, _) => return Err((key("host"), "missing (use \"*\" for any host)".into())),
                (Some(h), _) => HostPattern::parse(h).map_err(|m| (key("host"), m))?,
            };
            let cidrs = r
                .cidrs
                .iter()
                .enumerate()
                .map(|(j, c)| Cidr::parse(c).map_err(|m| (format!("{prefix}.allow[{i}].cidrs[{j}]"), m)))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(p) = &r.prefix
                && (p.contains("..") || p.contains('\0'))
            {
                return Err((key("prefix"), format!("{p:?} contains .. or NUL")));
            }
            if scheme == Scheme::File
                && (r.allow_http.is_some() || r.allow_private.is_some() || !cidrs.is_empty())
            {
                return Err((
                    key("scheme"),
                    "allow_http, allow_private and cidrs apply to network schemes only".into(),
                ));
            }
            rules.push(Rule {
                scheme,
                host,
                prefix: r.prefix.clone(),
                allow_private: r.allow_private.unwrap_or(false),
                allow_http: r.allow_http.unwrap_or(false),
                cidrs,
            });
        }
        Ok(SourcePolicy { rules })
    }
}

impl SourcePolicy {
    /// No rules at all: everything is refused.
    pub fn deny_all() -> Self {
        Self { rules: Vec::new() }
    }

    /// Is the source itself allowed: a rule for `scheme` whose host matches
    /// `host` (the endpoint; `None` for files) and whose prefix covers `key`
    /// (bucket/prefix, org/repo, URL path or folder)?
    pub fn check_source(&self, scheme: Scheme, host: Option<&str>, key: &str) -> Result<(), PolicyRefusal> {
        let ok = self
            .rules
            .iter()
            .any(|r| r.scheme == scheme && host.is_none_or(|h| r.host.matches(h)) && r.prefix_matches(key));
        if ok {
            return Ok(());
        }
        Err(PolicyRefusal(match host {
            Some(h) => format!(
                "no [[sources.allow]] rule allows {}://{key} via host {h}",
                scheme.as_str()
            ),
            None => format!("no [[sources.allow]] rule allows {}://{key}", scheme.as_str()),
        }))
    }

    /// Is one HTTP hop (`http[s]://host[:port]/…`) of a `scheme` pull
    /// allowed? Returns the rules that matched the host, which decide the
    /// addresses it may resolve to.
    pub fn check_hop(&self, scheme: Scheme, url: &str) -> Result<Vec<Rule>, PolicyRefusal> {
        let uri: ureq::http::Uri = url
            .parse()
            .map_err(|_| PolicyRefusal(format!("{url:?} is not a URL")))?;
        let host = uri
            .host()
            .ok_or_else(|| PolicyRefusal(format!("{url:?} has no host")))?;
        let http = match uri.scheme_str() {
            Some("https") => false,
            Some("http") => true,
            _ => {
                return Err(PolicyRefusal(format!(
                    "{url:?}: only http(s) URLs can be fetched"
                )));
            }
        };
        let matched: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| r.scheme == scheme && r.host.matches(host) && (!http || r.allow_http))
            .cloned()
            .collect();
        if matched.is_empty() {
            let why = if http
                && self
                    .rules
                    .iter()
                    .any(|r| r.scheme == scheme && r.host.matches(host))
            {
                "plain http is not allowed for this host (allow_http = true)"
            } else {
                "no [[sources.allow]] rule names this host"
            };
            return Err(PolicyRefusal(format!(
                "{} pull may not connect to {host}: {why}",
                scheme.as_str()
            )));
        }
        Ok(matched)
    }

    /// Resolve `host:port` and check every address against the rules that
    /// matched the host. Any forbidden address refuses the whole name (a
    /// mixed answer is how rebinding attacks hedge).
    pub fn resolve_checked(
        &self,
        rules: &[Rule],
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, PolicyRefusal> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => (bare, port)
                .to_socket_addrs()
                .map_err(|e| PolicyRefusal(format!("cannot resolve {bare}: {e}")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(PolicyRefusal(format!("{bare} resolves to no address")));
        }
        for a in &addrs {
            let ip = canonical_ip(a.ip());
            if let Some(why) = non_public(ip)
                && !rules.iter().any(|r| r.allows_ip(ip))
            {
                return Err(PolicyRefusal(format!(
                    "{bare} resolves to {ip}, a {why} address; allow it with allow_private = true or cidrs on that host's rule"
                )));
            }
        }
        Ok(addrs)
    }
}

/// IPv4-mapped and IPv4-compatible IPv6 addresses checked as the IPv4
/// address they carry.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why an address is not a public unicast address, or `None` when it is.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [169, 254, 169, 254] => "cloud metadata",
        [127, ..] => "loopback",
        [10, ..] | [192, 168, ..] => "private (RFC 1918)",
        [172, b, ..] if (16..32).contains(&b) => "private (RFC 1918)",
        [169, 254, ..] => "link-local",
        [100, b, ..] if (64..128).contains(&b) => "carrier-grade NAT",
        [0, ..] => "unspecified / this-network",
        [192, 0, 0, _] => "IETF protocol assignment",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking",
        [a, ..] if (224..240).contains(&a) => "multicast",
        [a, ..] if a >= 240 => "reserved / broadcast",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some("cloud metadata");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        x if x & 0xffc0 == 0xfe80 => "link-local",
        x if x & 0xff00 == 0xff00 => "multicast",
        0x2001 if s[1] == 0xdb8 => "documentation",
        // 6to4 and NAT64 carry an IPv4 address: judge that one.
        0x2002 => {
            return non_public_v4(Ipv4Addr::new(
                (s[1] >> 8) as u8,
                s[1] as u8,
                (s[2] >> 8) as u8,
                s[2] as u8,
            ));
        }
        0x64 if s[1] == 0xff9b => {
            return non_public_v4(Ipv4Addr::new(
                (s[6] >> 8) as u8,
                s[6] as u8,
                (s[7] >> 8) as u8,
                s[7] as u8,
            ));
        }
        0 if s[1..6] == [0, 0, 0, 0, 0] => "IPv4-compatible (deprecated)",
        _ => return None,
    })
}

/// ureq's resolver for one pull: re-checks the host against the policy and
/// returns only addresses the policy allows, so the connection goes to
/// exactly the addresses that were checked.
#[derive(Debug, Clone)]
pub struct PinnedResolver {
    pub policy: Arc<SourcePolicy>,
    pub scheme: Scheme,
}

/// Marker carried in the `io::Error` a refused resolution becomes, so the
/// HTTP layer can tell a policy refusal from a network failure.
pub const POLICY_ERROR_TAG: &str = "sources policy:";

impl ureq::unversioned::resolver::Resolver for PinnedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let refused = |r: PolicyRefusal| {
            ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                r.to_string(),
            ))
        };
        let rules = self
            .policy
            .check_hop(self.scheme, &uri.to_string())
            .map_err(refused)?;
        let host = uri.host().ok_or(ureq::Error::HostNotFound)?;
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
        let addrs = self.policy.resolve_checked(&rules, host, port).map_err(refused)?;
        let mut out = ureq::unversioned::resolver::ResolvedSocketAddrs::from_fn(|_| {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        });
        for a in addrs {
            if out.try_push(a).is_err() {
                break; // 16 addresses are plenty to connect to
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step must abort")]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_addresses() {
        for (a, why) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private (RFC 1918)"),
            ("172.31.0.1", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("100.100.0.1", "carrier-grade NAT"),
            ("0.0.0.0", "unspecified / this-network"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved / broadcast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00:ec2::254", "cloud metadata"),
            ("fc00::1", "unique local (fc00::/7)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("2002:a00:1::", "private (RFC 1918)"),
            ("64:ff9b::a9fe:a9fe", "cloud metadata"),
        ] {
            assert_eq!(non_public(ip(a)), Some(why), "{a}");
        }
        for a in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "1.1.1.1",
        ] {
            assert_eq!(non_public(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.255.1.1")));
        assert!(c.contains(ip("::ffff:10.0.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        let c = Cidr::parse("fd00::/12").unwrap();
        assert!(c.contains(ip("fd0f::1")));
        assert!(!c.contains(ip("fd10::1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
    }

    #[test]
    fn default_policy() {
        let p = SourcePolicy::default();
        assert!(
            p.check_source(Scheme::Hf, Some("huggingface.co"), "org/repo")
                .is_ok()
        );
        assert!(
            p.check_hop(Scheme::Hf, "https://cas-bridge.xethub.hf.co/x")
                .is_ok()
        );
        assert!(p.check_hop(Scheme::Hf, "https://evil.example/x").is_err());
        assert!(p.check_hop(Scheme::Hf, "http://huggingface.co/x").is_err());
        assert!(
            p.check_hop(Scheme::S3, "https://s3.eu-west-1.amazonaws.com/b")
                .is_ok()
        );
        assert!(p.check_hop(Scheme::S3, "https://127.0.0.1/b").is_err());
        let rules = p.check_hop(Scheme::Https, "https://anything.example/x").unwrap();
        // Any host, but never a private address.
        let err = p.resolve_checked(&rules, "127.0.0.1", 443).unwrap_err();
        assert!(err.0.contains("loopback"), "{err}");
        let err = p.resolve_checked(&rules, "169.254.169.254", 80).unwrap_err();
        assert!(err.0.contains("cloud metadata"), "{err}");
        let err = p.resolve_checked(&rules, "[fd00:ec2::254]", 80).unwrap_err();
        assert!(err.0.contains("cloud metadata"), "{err}");
        assert!(p.resolve_checked(&rules, "localhost", 80).is_err());
    }

    #[test]
    fn config_rules_and_errors() {
        let raw: RawSources = toml::from_str(
            r#"
            defaults = false
            [[allow]]
            scheme = "s3"
            host = "127.0.0.1"
            prefix = "models/r1"
            allow_http = true
            cidrs = ["127.0.0.0/8"]
            "#,
        )
        .unwrap();
        let p = raw.validate("sources").unwrap();
        assert_eq!(p.rules.len(), 1);
        assert!(
            p.check_source(Scheme::S3, Some("127.0.0.1"), "models/r1/x")
                .is_ok()
        );
        assert!(p.check_source(Scheme::S3, Some("127.0.0.1"), "models/r1").is_ok());
        assert!(
            p.check_source(Scheme::S3, Some("127.0.0.1"), "models/r10")
                .is_err()
        );
        assert!(p.check_source(Scheme::Hf, Some("huggingface.co"), "a/b").is_err());
        let rules = p.check_hop(Scheme::S3, "http://127.0.0.1:9000/models").unwrap();
        assert!(p.resolve_checked(&rules, "127.0.0.1", 9000).is_ok());

        for (text, key) in [
            (
                "[[allow]]\nscheme = \"ftp\"\nhost = \"x\"",
                "sources.allow[0].scheme",
            ),
            ("[[allow]]\nscheme = \"s3\"", "sources.allow[0].host"),
            (
                "[[allow]]\nscheme = \"s3\"\nhost = \"a*b\"",
                "sources.allow[0].host",
            ),
            (
                "[[allow]]\nscheme = \"s3\"\nhost = \"x\"\ncidrs = [\"1.2.3.4/99\"]",
                "sources.allow[0].cidrs[0]",
            ),
        ] {
            let raw: RawSources = toml::from_str(text).unwrap();
            let (k, _) = raw.validate("sources").unwrap_err();
            assert_eq!(k, key, "{text}");
        }
        assert!(toml::from_str::<RawSources>("[[allow]]\nscheme = \"s3\"\nhots = \"x\"").is_err());
    }

    #[test]
    fn suffix_patterns_need_a_subdomain() {
        let p = HostPattern::parse("*.hf.co").unwrap();
        assert!(p.matches("cas-bridge.xethub.hf.co"));
        assert!(p.matches("CDN.HF.CO."));
        assert!(!p.matches("hf.co"));
        assert!(!p.matches("evilhf.co"));
    }
}
