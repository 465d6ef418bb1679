//! Secret patterns: each kind is found with its line and column and never
//! echoed; vocabularies and look-alikes are not flagged. Test secrets are
//! assembled at run time so no credential-shaped literal sits in the source.

use super::*;

fn rules(text: &str) -> Vec<String> {
    scan_text(text.as_bytes()).into_iter().map(|f| f.rule).collect()
}

fn alnum(n: usize) -> String {
    "aB3dE5gH7jK9mN1pQ2sT4vW6yZ8".chars().cycle().take(n).collect()
}

#[test]
fn each_kind_is_found_and_redacted() {
    let upper: String = alnum(16).to_ascii_uppercase();
    let cases = [
        (format!("key = AKIA{upper}"), rule::AWS_ACCESS_KEY),
        (format!("\"ASIA{upper}\""), rule::AWS_ACCESS_KEY),
        (
            format!("aws_secret_access_key = {}", alnum(40)),
            rule::AWS_SECRET_KEY,
        ),
        (
            format!("{{\"AWS_SECRET_KEY\": \"{}/+\"}}", alnum(38)),
            rule::AWS_SECRET_KEY,
        ),
        (format!("token: hf_{}", alnum(34)), rule::HUGGINGFACE_TOKEN),
        (format!("sk-proj-{}", alnum(60)), rule::OPENAI_KEY),
        (format!("sk-{}T3BlbkFJ{}", alnum(20), alnum(20)), rule::OPENAI_KEY),
        (format!("OPENAI_API_KEY=sk-{}", alnum(48)), rule::OPENAI_KEY),
        (format!("sk-ant-api03-{}", alnum(95)), rule::ANTHROPIC_KEY),
        (format!("ghp_{}", alnum(36)), rule::GITHUB_TOKEN),
        (format!("gho_{}", alnum(36)), rule::GITHUB_TOKEN),
        (format!("ghs_{}", alnum(36)), rule::GITHUB_TOKEN),
        (
            format!("github_pat_{}_{}", alnum(22), alnum(59)),
            rule::GITHUB_TOKEN,
        ),
        (format!("xoxb-{}", alnum(40)), rule::SLACK_TOKEN),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE...\n".to_owned(),
            rule::PRIVATE_KEY,
        ),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----".to_owned(),
            rule::PRIVATE_KEY,
        ),
        ("-----BEGIN PRIVATE KEY-----".to_owned(), rule::PRIVATE_KEY),
        ("-----BEGIN EC PRIVATE KEY-----".to_owned(), rule::PRIVATE_KEY),
    ];
    for (text, rule) in &cases {
        let found = scan_text(text.as_bytes());
        assert_eq!(found.len(), 1, "{text}: {found:?}");
        assert_eq!(found[0].rule, *rule, "{text}");
        assert_eq!(found[0].severity, Severity::High);
        assert!(
            found[0].location.starts_with("line 1 column "),
            "{}",
            found[0].location
        );
        // Never the secret itself: at most its first four characters.
        let secret_tail = &text[text.len().saturating_sub(12)..];
        if *rule != rule::PRIVATE_KEY {
            assert!(!found[0].message.contains(secret_tail), "{}", found[0].message);
        }
        assert!(found[0].message.contains("characters"), "{}", found[0].message);
    }
}

#[test]
fn location_is_line_and_column() {
    let text = format!("{{\n  \"a\": 1,\n  \"token\": \"hf_{}\"\n}}\n", alnum(34));
    let found = scan_text(text.as_bytes());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].location, "line 3 column 13");
    assert!(
        found[0].message.contains("'hf_a…', 37 characters"),
        "{}",
        found[0].message
    );
}

#[test]
fn look_alikes_are_not_flagged() {
    let cases = [
        // A vocabulary entry: 34+ alphanumerics without a prefix.
        format!("{{\"{}\": 1234}}", alnum(40)),
        // Prefix inside a longer word: no boundary.
        format!("xhf_{}", alnum(34)),
        format!("myAKIA{}", alnum(16).to_ascii_uppercase()),
        // Too short.
        format!("hf_{}", alnum(20)),
        format!("ghp_{}", alnum(20)),
        format!("sk-{}", alnum(30)),
        // Lower case after AKIA is not a key id.
        format!("AKIA{}", alnum(16)),
        // A public key is not a secret.
        "-----BEGIN PUBLIC KEY-----".to_owned(),
        "aws_secret_access_key = YOUR_SECRET_HERE".to_owned(),
        String::new(),
    ];
    for text in &cases {
        assert_eq!(rules(text), Vec::<String>::new(), "{text}");
    }
}

#[test]
fn findings_are_capped() {
    let text = (0..30).map(|_| format!("hf_{}\n", alnum(34))).collect::<String>();
    let found = scan_text(text.as_bytes());
    assert_eq!(found.len(), MAX_FINDINGS + 1);
    assert!(found[MAX_FINDINGS].message.contains("10 more"));
}

#[test]
fn invalid_utf8_and_binary_do_not_break_the_scan() {
    let mut data = vec![0xff, 0xfe, 0x00];
    data.extend_from_slice(format!("ghp_{}", alnum(36)).as_bytes());
    data.push(0xc3);
    assert_eq!(scan_text(&data).len(), 1);
}

/// A tokenizer.json-shaped vocabulary of 150k entries, some of them long
/// random-looking alphanumerics, yields nothing.
#[test]
fn large_vocabulary_is_clean() {
    let text = big_vocabulary(150_000);
    assert!(text.len() > 3_000_000);
    assert_eq!(scan_text(text.as_bytes()), vec![]);
}

pub(crate) fn big_vocabulary(n: usize) -> String {
    let mut s = String::from("{\"model\":{\"type\":\"BPE\",\"vocab\":{");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 2 + (x % 40) as usize;
        let word: String = (0..len)
            .map(|k| {
                let c = ((x >> (k % 8 * 8)) as usize + k * 7) % 62;
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[c] as char
            })
            .collect();
        let prefix = if i % 3 == 0 { "\u{120}" } else { "" };
        s.push_str(&format!("\"{prefix}{word}\":{i},"));
    }
    s.push_str("\"end\":0}}}");
    s
}
