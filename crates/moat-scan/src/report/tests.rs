//! Tests for the report: the exact JSON contract, verdicts, summary, text.

use super::*;

fn sample() -> Report {
    Report::from_files(vec![
        FileReport::new("model.safetensors", Format::Safetensors, Vec::new()),
        FileReport::new(
            "sub/x.py",
            Format::Text,
            vec![
                Finding::new("note.low", Severity::Low, "just so you know", ""),
                Finding::new("hf.python-file", Severity::Critical, "Python file", ""),
            ],
        ),
        FileReport::failed(
            "gone.bin",
            Format::Unknown,
            vec![Finding::new("io.read", Severity::High, "cannot read", "")],
        ),
        FileReport::new(
            "README.md",
            Format::Text,
            vec![Finding::new("note.medium", Severity::Medium, "fyi", "offset 8")],
        ),
    ])
}

#[test]
fn json_shape_is_the_contract() {
    let value: serde_json::Value = serde_json::from_str(&sample().to_json()).expect("json");
    let expected = serde_json::json!({
        "files": [
            {"path": "model.safetensors", "format": "safetensors", "verdict": "clean", "findings": []},
            {"path": "sub/x.py", "format": "text", "verdict": "unsafe", "findings": [
                {"rule": "note.low", "severity": "low", "message": "just so you know", "location": ""},
                {"rule": "hf.python-file", "severity": "critical", "message": "Python file", "location": ""}
            ]},
            {"path": "gone.bin", "format": "unknown", "verdict": "error", "findings": [
                {"rule": "io.read", "severity": "high", "message": "cannot read", "location": ""}
            ]},
            {"path": "README.md", "format": "text", "verdict": "clean", "findings": [
                {"rule": "note.medium", "severity": "medium", "message": "fyi", "location": "offset 8"}
            ]}
        ],
        "summary": {"files": 4, "unsafe": 1, "errors": 1}
    });
    assert_eq!(value, expected);
    // And it reads back.
    let back: Report = serde_json::from_value(value).expect("deserialize");
    assert_eq!(back, sample());
}

#[test]
fn verdicts_and_queries() {
    let report = sample();
    assert!(!report.is_clean());
    let (file, finding) = report.first_unsafe().expect("unsafe");
    assert_eq!(
        (file.path.as_str(), finding.rule.as_str()),
        ("sub/x.py", "hf.python-file")
    );
    let (file, finding) = report.first_error().expect("error");
    assert_eq!(
        (file.path.as_str(), finding.rule.as_str()),
        ("gone.bin", "io.read")
    );

    let clean = Report::from_files(vec![FileReport::new("a", Format::Json, Vec::new())]);
    assert!(clean.is_clean());
    assert!(clean.first_unsafe().is_none());
    assert!(Report::from_files(Vec::new()).is_clean());
}

#[test]
fn text_report_lists_files_findings_and_summary() {
    let text = sample().to_text();
    let expected = "\
model.safetensors  safetensors  clean
sub/x.py  text  unsafe
    low note.low: just so you know
    critical hf.python-file: Python file
gone.bin  unknown  error
    high io.read: cannot read
README.md  text  clean
    medium note.medium: fyi (offset 8)
4 files scanned, 1 unsafe, 1 error
";
    assert_eq!(text, expected);
}

#[test]
fn text_report_escapes_control_characters() {
    let report = Report::from_files(vec![FileReport::new(
        "evil\u{1b}[2Jname\n.py",
        Format::Text,
        Vec::new(),
    )]);
    let text = report.to_text();
    assert!(!text.contains('\u{1b}'));
    assert!(
        text.starts_with("evil\\u{1b}[2Jname\\n.py  text  clean\n"),
        "{text}"
    );
}

#[test]
fn quote_shortens_long_names() {
    let long = "x".repeat(1000);
    let q = quote(&long);
    assert!(q.len() < 220, "{}", q.len());
    assert!(q.ends_with("…'"));
    assert_eq!(quote("a.b"), "'a.b'");
}
