//! Leaked credentials in text files of a model (configs, READMEs, notebooks
//! exported as text, tokenizer files, text members of archives).
//!
//! A model folder is published and copied widely; a live cloud key or hub
//! token inside it is a breach waiting to be used, so each kind of credential
//! is a `high` finding of its own rule. Only shapes with a distinctive prefix
//! are matched (`AKIA`, `hf_`, `sk-proj-`, `ghp_`, `-----BEGIN ... PRIVATE
//! KEY-----`), at word boundaries: a 34-character alphanumeric string alone
//! is a tokenizer vocabulary entry, not a token.
//!
//! All patterns are one regex (the `regex` crate: linear time, with a
//! literal prefilter on the prefixes), so a 10 MB `tokenizer.json` costs one
//! pass. The secret itself is never put into a finding: only its first four
//! characters and its length.

use std::sync::OnceLock;

use regex::bytes::Regex;

use crate::report::{Finding, Severity};

/// Stable rule ids.
pub mod rule {
    pub const AWS_ACCESS_KEY: &str = "secrets.aws-access-key";
    pub const AWS_SECRET_KEY: &str = "secrets.aws-secret-key";
    pub const HUGGINGFACE_TOKEN: &str = "secrets.huggingface-token";
    pub const OPENAI_KEY: &str = "secrets.openai-key";
    pub const ANTHROPIC_KEY: &str = "secrets.anthropic-key";
    pub const GITHUB_TOKEN: &str = "secrets.github-token";
    pub const SLACK_TOKEN: &str = "secrets.slack-token";
    pub const PRIVATE_KEY: &str = "secrets.private-key";
}

/// At most this many findings per file; the rest are counted.
const MAX_FINDINGS: usize = 20;

/// (rule, what it is, pattern). The secret is capture group 1 when the
/// pattern has one (the AWS secret follows its key name), else the match.
/// `(?-u)` keeps classes and `\b` ASCII, so any byte that is not an ASCII
/// letter, digit or `_` is a boundary (JSON quotes, `Ġ`, spaces).
const PATTERNS: &[(&str, &str, &str)] = &[
    (
        rule::AWS_ACCESS_KEY,
        "an AWS access key id",
        r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
    ),
    (
        rule::AWS_SECRET_KEY,
        "an AWS secret access key",
        r#"(?i:aws_?secret_?(?:access_?)?key)["']?\s{0,4}[:=]\s{0,4}["']?([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)"#,
    ),
    (
        rule::HUGGINGFACE_TOKEN,
        "a Hugging Face token",
        r"\bhf_[A-Za-z0-9]{34,}\b",
    ),
    (
        rule::ANTHROPIC_KEY,
        "an Anthropic API key",
        r"\bsk-ant-(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{80,}",
    ),
    (
        rule::OPENAI_KEY,
        "an OpenAI API key",
        r"\bsk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,}|[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}\b|[A-Za-z0-9]{48}\b)",
    ),
    (
        rule::GITHUB_TOKEN,
        "a GitHub token",
        r"\b(?:(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}\b|github_pat_[A-Za-z0-9_]{50,}\b)",
    ),
    (
        rule::SLACK_TOKEN,
        "a Slack token",
        r"\bxox[baprs]-[0-9A-Za-z-]{10,}",
    ),
    (
        rule::PRIVATE_KEY,
        "a PEM private key",
        r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----",
    ),
];

struct Compiled {
    all: Regex,
    each: Vec<Regex>,
}

fn compiled() -> Option<&'static Compiled> {
    static C: OnceLock<Option<Compiled>> = OnceLock::new();
    C.get_or_init(|| {
        let joined = PATTERNS
            .iter()
            .map(|(_, _, p)| format!("(?:{p})"))
            .collect::<Vec<_>>()
            .join("|");
        let all = Regex::new(&format!("(?-u){joined}")).ok()?;
        let each = PATTERNS
            .iter()
            .map(|(_, _, p)| Regex::new(&format!("(?-u)^(?:{p})")))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Some(Compiled { all, each })
    })
    .as_ref()
}

/// Below this size a text is first checked for the patterns' literal
/// prefixes: most model text files (configs, `byteorder`, small READMEs)
/// hold none, and skipping the regex then also skips compiling it, which
/// costs more than scanning a whole small folder. Above it the regex's own
/// literal prefilter is the faster single pass.
const PREFILTER_MAX: usize = 1 << 20;

/// Literal prefixes, one of which every pattern's match contains
/// (the AWS secret's key name is matched case-insensitively below).
const NEEDLES: &[&[u8]] = &[
    b"AKIA",
    b"ASIA",
    b"hf_",
    b"sk-",
    b"ghp_",
    b"gho_",
    b"ghu_",
    b"ghs_",
    b"ghr_",
    b"github_pat_",
    b"xox",
    b"PRIVATE KEY",
];

/// Whether `data` may hold a match: a needle, or `secret` in any case.
fn may_contain_secret(data: &[u8]) -> bool {
    if NEEDLES.iter().any(|n| memchr::memmem::find(data, n).is_some()) {
        return true;
    }
    memchr::memchr2_iter(b's', b'S', data).any(|i| {
        data.get(i..i + 6)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"secret"))
    })
}

/// Flags leaked credentials in text (any bytes; invalid UTF-8 is fine).
pub fn scan_text(data: &[u8]) -> Vec<Finding> {
    if data.len() <= PREFILTER_MAX && !may_contain_secret(data) {
        return Vec::new();
    }
    let Some(c) = compiled() else {
        // The patterns are constants covered by the tests; failing closed
        // here keeps the function total without a panic.
        return vec![Finding::new(
            rule::PRIVATE_KEY,
            Severity::High,
            "internal error: the secret patterns did not compile, so the file was not checked",
            "",
        )];
    };
    let mut findings = Vec::new();
    let mut extra = 0usize;
    let mut lines = LineCounter::default();
    for m in c.all.find_iter(data) {
        let Some((i, secret)) = classify(c, data, m.start()) else {
            continue;
        };
        let Some((rule, what, _)) = PATTERNS.get(i) else {
            continue;
        };
        if findings.len() >= MAX_FINDINGS {
            extra += 1;
            continue;
        }
        let start = m.start() + secret.0;
        let (line, column) = lines.position(data, start);
        let shown = redact(data.get(start..start + secret.1).unwrap_or(&[]));
        findings.push(Finding::new(
            *rule,
            Severity::High,
            format!(
                "{what} ({shown}) is written in this file; a model must not ship a live credential: \
                 revoke it and remove it from the file and its history"
            ),
            format!("line {line} column {column}"),
        ));
    }
    if extra > 0 {
        findings.push(Finding::new(
            findings.first().map(|f| f.rule.clone()).unwrap_or_default(),
            Severity::High,
            format!("{extra} more credentials in this file were not listed"),
            "",
        ));
    }
    findings
}

/// Which pattern matched at `start`, and the secret's (offset from start,
/// length).
fn classify(c: &Compiled, data: &[u8], start: usize) -> Option<(usize, (usize, usize))> {
    let rest = data.get(start..)?;
    c.each.iter().enumerate().find_map(|(i, re)| {
        let caps = re.captures(rest)?;
        let span = caps.get(1).or_else(|| caps.get(0))?;
        Some((i, (span.start(), span.len())))
    })
}

/// `hf_a… (37 characters)`: enough to find the credential, not to use it.
fn redact(secret: &[u8]) -> String {
    let head: String = secret.iter().take(4).map(|&b| char::from(b)).collect();
    format!("'{head}…', {} characters", secret.len())
}

/// 1-based line and byte column, counted incrementally since matches come
/// in order (so the whole scan stays linear).
#[derive(Default)]
struct LineCounter {
    pos: usize,
    line: usize,
    line_start: usize,
}

impl LineCounter {
    fn position(&mut self, data: &[u8], at: usize) -> (usize, usize) {
        let seg = data.get(self.pos..at).unwrap_or(&[]);
        for (i, b) in seg.iter().enumerate() {
            if *b == b'\n' {
                self.line += 1;
                self.line_start = self.pos + i + 1;
            }
        }
        self.pos = at.max(self.pos);
        (self.line + 1, at - self.line_start + 1)
    }
}

#[cfg(test)]
mod tests;
