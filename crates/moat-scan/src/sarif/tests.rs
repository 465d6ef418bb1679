//! SARIF mapping: levels, rule indexes, regions, error files. Schema
//! validity is tested in tests/scanner/test_sarif_schema.py.

use super::*;
use crate::report::{FileReport, Finding};
use crate::sniff::Format;

fn sample() -> Report {
    Report::from_files(vec![
        FileReport::new("model.safetensors", Format::Safetensors, vec![]),
        FileReport::new(
            "sub dir/m.gguf",
            Format::Gguf,
            vec![
                Finding::new("gguf.truncated", Severity::Critical, "short", "offset 24"),
                Finding::new(
                    "template.dunder",
                    Severity::Critical,
                    "dunder",
                    "key 'k' line 3 column 7",
                ),
            ],
        ),
        FileReport::new(
            "README.md",
            Format::Text,
            vec![
                Finding::new(
                    "secrets.huggingface-token",
                    Severity::High,
                    "token",
                    "line 2 column 11",
                ),
                Finding::new("gguf.truncated", Severity::Critical, "again", "offset 8"),
                Finding::new("x.info", Severity::Low, "fyi", ""),
                Finding::new("x.warn", Severity::Medium, "hmm", "key a"),
            ],
        ),
        FileReport::failed(
            "/abs/gone.bin",
            Format::Unknown,
            vec![Finding::new("io.read", Severity::High, "cannot read", "")],
        ),
    ])
}

#[test]
fn shape_and_mapping() {
    let v: Value = serde_json::from_str(&sample().to_sarif()).unwrap();
    assert_eq!(v["version"], "2.1.0");
    assert_eq!(v["$schema"], SCHEMA_URI);
    let run = &v["runs"][0];
    assert_eq!(run["tool"]["driver"]["name"], "moat");
    let rules = run["tool"]["driver"]["rules"].as_array().unwrap();
    let ids: Vec<&str> = rules.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "gguf.truncated",
            "template.dunder",
            "secrets.huggingface-token",
            "x.info",
            "x.warn",
            "io.read"
        ]
    );
    let results = run["results"].as_array().unwrap();
    assert_eq!(results.len(), 7);
    // The same rule keeps one index.
    assert_eq!(results[0]["ruleIndex"], 0);
    assert_eq!(results[3]["ruleIndex"], 0);
    assert_eq!(results[0]["level"], "error");
    assert_eq!(results[4]["level"], "note");
    assert_eq!(results[5]["level"], "warning");
    let loc = &results[0]["locations"][0];
    assert_eq!(
        loc["physicalLocation"]["artifactLocation"]["uri"],
        "sub%20dir/m.gguf"
    );
    assert_eq!(loc["physicalLocation"]["region"]["byteOffset"], 24);
    let loc = &results[2]["locations"][0]["physicalLocation"]["region"];
    assert_eq!(
        (loc["startLine"].as_u64(), loc["startColumn"].as_u64()),
        (Some(2), Some(11))
    );
    assert_eq!(
        results[1]["locations"][0]["logicalLocations"][0]["fullyQualifiedName"],
        "key 'k' line 3 column 7"
    );
    assert!(
        results[1]["locations"][0]["physicalLocation"]
            .get("region")
            .is_none()
    );
    assert_eq!(
        results[6]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
        "file:///abs/gone.bin"
    );
    let inv = &run["invocations"][0];
    assert_eq!(inv["executionSuccessful"], false);
    assert_eq!(inv["toolExecutionNotifications"].as_array().unwrap().len(), 1);
}

#[test]
fn clean_report_is_successful_and_empty() {
    let report = Report::from_files(vec![FileReport::new("a.json", Format::Json, vec![])]);
    let v = report.to_sarif_value();
    assert_eq!(v["runs"][0]["invocations"][0]["executionSuccessful"], true);
    assert!(
        v["runs"][0]["invocations"][0]
            .get("toolExecutionNotifications")
            .is_none()
    );
    assert_eq!(v["runs"][0]["results"].as_array().unwrap().len(), 0);
}

#[test]
fn regions_parse_only_well_formed_locations() {
    assert_eq!(region("offset 8"), Some(json!({"byteOffset": 8})));
    assert_eq!(region("offset 8, tensor 'w'"), Some(json!({"byteOffset": 8})));
    assert_eq!(region("line 0 column 1"), None);
    assert_eq!(region("line 4"), Some(json!({"startLine": 4})));
    assert_eq!(region("offset -1"), None);
    assert_eq!(region("key auto_map"), None);
    assert_eq!(region(""), None);
}
