//! End-to-end tests of `scan_paths` / `scan_file` on real folders: format
//! policy, HF rules, symlinks, special files, paths and ordering.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::safetensors::tests::{build, valid_file};

fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, bytes).expect("write");
}

/// A small clean Hugging Face style folder.
fn clean_model(dir: &Path) {
    write(
        dir,
        "config.json",
        br#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2"}"#,
    );
    write(dir, "model.safetensors", &valid_file());
    write(
        dir,
        "tokenizer.json",
        br#"{"version":"1.0","model":{"type":"BPE"}}"#,
    );
    write(
        dir,
        "tokenizer_config.json",
        br#"{"chat_template":"{{ messages }}"}"#,
    );
    write(dir, "README.md", b"# A model\n\n1. Download.\n");
}

fn find<'a>(report: &'a Report, path: &str) -> &'a FileReport {
    report
        .files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("{path} not in report: {report:#?}"))
}

fn rules(file: &FileReport) -> Vec<&str> {
    file.findings.iter().map(|f| f.rule.as_str()).collect()
}

#[test]
fn clean_folder_is_clean_with_relative_sorted_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    clean_model(dir.path());
    write(dir.path(), "sub/deeper/notes.txt", b"hello\n");
    write(dir.path(), "sub.txt", b"x");
    let report = scan_paths(&[dir.path().to_path_buf()]);
    assert!(report.is_clean(), "{}", report.to_text());
    let paths: Vec<&str> = report.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "README.md",
            "config.json",
            "model.safetensors",
            "sub.txt",
            "sub/deeper/notes.txt",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    );
    assert_eq!(find(&report, "model.safetensors").format, Format::Safetensors);
    assert_eq!(find(&report, "config.json").format, Format::Json);
    assert_eq!(find(&report, "README.md").format, Format::Text);
    assert_eq!(report.summary.files, 7);
}

#[test]
fn python_file_in_subfolder_makes_the_folder_unsafe() {
    let dir = tempfile::tempdir().expect("tempdir");
    clean_model(dir.path());
    write(dir.path(), "sub/x.py", b"import os\n");
    let report = scan_paths(&[dir.path().to_path_buf()]);
    let (file, finding) = report.first_unsafe().expect("unsafe");
    assert_eq!(file.path, "sub/x.py");
    assert_eq!(finding.rule, hf::rule::PYTHON_FILE);
    assert_eq!(finding.severity, Severity::Critical);
    assert_eq!(report.summary.unsafe_files, 1);
}

#[test]
fn auto_map_in_config_is_remote_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    clean_model(dir.path());
    write(
        dir.path(),
        "config.json",
        br#"{"text_config":{"auto_map":{"AutoModelForCausalLM":"modeling.M"}}}"#,
    );
    let report = scan_paths(&[dir.path().to_path_buf()]);
    let file = find(&report, "config.json");
    assert_eq!(file.verdict, Verdict::Unsafe);
    assert_eq!(rules(file), vec![hf::rule::REMOTE_CODE]);
    assert_eq!(file.findings[0].location, "key text_config.auto_map");
}

#[test]
fn broken_config_json_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "config.json", b"{\"a\": ");
    let file = scan_file(&dir.path().join("config.json"), "config.json");
    assert_eq!(file.format, Format::Text);
    assert_eq!(file.verdict, Verdict::Unsafe);
    assert_eq!(rules(&file), vec![hf::rule::CONFIG_JSON]);

    write(dir.path(), "config.json", b"\x80\x04N.");
    let file = scan_file(&dir.path().join("config.json"), "config.json");
    assert_eq!(file.format, Format::Pickle);
    // The pickle itself is harmless; being named config.json is not.
    assert_eq!(rules(&file), vec![hf::rule::CONFIG_JSON]);
    assert!(file.findings[0].message.contains("pickle data, not JSON"));
}

#[test]
fn executable_formats_are_analysed_and_broken_ones_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[u8], Format, Option<&str>); 7] = [
        // A harmless pickle (an empty dict) passes the VM.
        ("pytorch_model.bin", b"\x80\x02}q\x00.", Format::Pickle, None),
        (
            "model.pt",
            b"PK\x03\x04\x14\x00\x00\x00",
            Format::Zip,
            Some(container::rule::MALFORMED),
        ),
        (
            "weights.npy",
            b"\x93NUMPY\x01\x00v\x00",
            Format::Numpy,
            Some(container::rule::NUMPY_HEADER),
        ),
        (
            "data.gz",
            b"\x1f\x8b\x08\x00",
            Format::Gzip,
            Some(container::rule::MALFORMED),
        ),
        (
            "model.7z",
            b"7z\xbc\xaf\x27\x1c\x00\x04",
            Format::SevenZip,
            Some(container::rule::SEVEN_ZIP),
        ),
        (
            "blob",
            b"\x00\x01\x02\x03",
            Format::Unknown,
            Some(rule::FORMAT_NOT_ALLOWED),
        ),
        // Protocol 0 pickle: plain ASCII, must not pass as text.
        (
            "model.ckpt",
            b"cos\nsystem\n(S'id'\ntR.",
            Format::Pickle,
            Some(pickle::rule::IMPORT_CRITICAL),
        ),
    ];
    for (name, bytes, _, _) in &cases {
        write(dir.path(), name, bytes);
    }
    for (name, _, format, first_rule) in cases {
        let file = scan_file(&dir.path().join(name), name);
        assert_eq!(file.format, format, "{name}");
        match first_rule {
            None => assert_eq!(file.verdict, Verdict::Clean, "{name}: {:?}", file.findings),
            Some(first) => {
                assert_eq!(file.verdict, Verdict::Unsafe, "{name}");
                assert_eq!(rules(&file).first(), Some(&first), "{name}: {:?}", file.findings);
                assert!(file.findings[0].severity >= Severity::High);
            }
        }
    }
}

#[test]
fn safetensors_by_name_is_held_to_the_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A pickle pretending to be safetensors by its name.
    write(dir.path(), "model.safetensors", b"\x80\x02}q\x00.");
    let file = scan_file(&dir.path().join("model.safetensors"), "model.safetensors");
    assert_eq!(file.format, Format::Safetensors);
    assert_eq!(file.verdict, Verdict::Unsafe);
    assert!(
        file.findings
            .iter()
            .all(|f| f.severity == Severity::Critical && f.rule.starts_with("safetensors."))
    );
}

#[test]
fn safetensors_by_content_is_validated_whatever_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
    write(dir.path(), "weights.bin", &build(json, 4));
    let file = scan_file(&dir.path().join("weights.bin"), "weights.bin");
    assert_eq!(file.format, Format::Safetensors);
    assert_eq!(rules(&file), vec![safetensors::rule::SIZE_MISMATCH]);
    assert_eq!(file.findings[0].location, "tensor 't'");
}

#[test]
fn symlinks_are_findings_not_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    write(outside.path(), "secret.py", b"import os\n");
    clean_model(dir.path());
    std::os::unix::fs::symlink(outside.path().join("secret.py"), dir.path().join("link.txt"))
        .expect("symlink");
    std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).expect("symlink");
    let report = scan_paths(&[dir.path().to_path_buf()]);
    for name in ["link.txt", "linkdir"] {
        let file = find(&report, name);
        assert_eq!(rules(file), vec![rule::SYMLINK], "{name}");
        assert_eq!(file.verdict, Verdict::Unsafe);
    }
    // Nothing behind the links was scanned.
    assert!(report.files.iter().all(|f| !f.path.contains("secret")));
}

#[test]
fn special_files_are_refused_without_opening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).expect("bind socket");
    let report = scan_paths(&[dir.path().to_path_buf()]);
    let file = find(&report, "sock");
    assert_eq!(rules(file), vec![rule::NOT_REGULAR]);
    assert_eq!(file.verdict, Verdict::Unsafe);
}

#[test]
fn missing_paths_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let report = scan_paths(std::slice::from_ref(&missing));
    assert_eq!(report.summary.errors, 1);
    let file = &report.files[0];
    assert_eq!(file.path, missing.display().to_string());
    assert_eq!(file.verdict, Verdict::Error);
    assert_eq!(rules(file), vec![rule::IO_READ]);
    assert!(
        file.findings[0].message.contains("No such file"),
        "{}",
        file.findings[0].message
    );

    let file = scan_file(&missing, "nope.safetensors");
    assert_eq!(file.verdict, Verdict::Error);
}

#[test]
fn file_arguments_keep_the_path_as_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    clean_model(dir.path());
    let given: PathBuf = dir.path().join("model.safetensors");
    let report = scan_paths(&[given.clone(), dir.path().join("README.md")]);
    assert_eq!(report.files[0].path, given.display().to_string());
    assert_eq!(report.files.len(), 2);
    assert!(report.is_clean());
}

#[test]
fn many_files_keep_sorted_order_when_scanned_in_parallel() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..40 {
        write(dir.path(), &format!("f{i:03}.txt"), b"text\n");
    }
    write(dir.path(), "f020.py", b"x = 1\n");
    let report = scan_paths(&[dir.path().to_path_buf()]);
    let paths: Vec<&str> = report.files.iter().map(|f| f.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    assert_eq!(report.summary.files, 41);
    assert_eq!(
        report.first_unsafe().map(|(f, _)| f.path.as_str()),
        Some("f020.py")
    );
}

#[test]
fn empty_folder_gives_an_empty_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = scan_paths(&[dir.path().to_path_buf()]);
    assert!(report.files.is_empty());
    assert_eq!(
        report.to_json(),
        r#"{"files":[],"summary":{"files":0,"unsafe":0,"errors":0}}"#
    );
}

#[test]
fn gguf_files_are_checked_not_refused() {
    use crate::gguf::tests::{V, benign};
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "good.gguf", &benign().build());
    let evil = benign().kv(
        "tokenizer.chat_template.rag",
        V::Str("{{ cycler.__init__.__globals__.os.popen('id').read() }}".into()),
    );
    write(dir.path(), "evil.gguf", &evil.build());
    write(dir.path(), "short.gguf", b"GGUF\x03\x00\x00\x00");
    let good = scan_file(&dir.path().join("good.gguf"), "good.gguf");
    assert_eq!(
        (good.format, good.verdict),
        (Format::Gguf, Verdict::Clean),
        "{good:?}"
    );
    let evil = scan_file(&dir.path().join("evil.gguf"), "evil.gguf");
    assert_eq!(evil.verdict, Verdict::Unsafe);
    assert!(rules(&evil).contains(&crate::template::rule::DUNDER), "{evil:?}");
    let short = scan_file(&dir.path().join("short.gguf"), "short.gguf");
    assert_eq!(short.verdict, Verdict::Unsafe);
    assert_eq!(rules(&short), vec![crate::gguf::rule::TRUNCATED]);
    assert_eq!(short.findings[0].severity, Severity::Critical);
}

#[test]
fn secrets_and_template_files_in_a_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = format!("hf_{}", "Ab1".repeat(12));
    write(
        dir.path(),
        "README.md",
        format!("# model\nuse token {token}\n").as_bytes(),
    );
    write(
        dir.path(),
        "chat_template.jinja",
        b"{{ joiner.__init__.__globals__ }}",
    );
    write(dir.path(), "notes.txt", b"no secrets here, hf_short\n");
    let report = scan_paths(&[dir.path().to_path_buf()]);
    let by_name = |n: &str| report.files.iter().find(|f| f.path == n).expect(n);
    let readme = by_name("README.md");
    assert_eq!(readme.verdict, Verdict::Unsafe);
    assert_eq!(rules(readme), vec![crate::secrets::rule::HUGGINGFACE_TOKEN]);
    assert_eq!(readme.findings[0].location, "line 2 column 11");
    assert!(!report.to_json().contains(&token));
    let template = by_name("chat_template.jinja");
    assert_eq!(template.verdict, Verdict::Unsafe);
    assert!(rules(template).contains(&crate::template::rule::DUNDER));
    assert_eq!(by_name("notes.txt").verdict, Verdict::Clean);
}

#[test]
fn onnx_and_hdf5_files_are_checked() {
    use crate::keras::tests::{KERAS2_BENIGN, fake_h5};
    use crate::onnx::tests::{graph_with_initializer, model, tensor};
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "w.bin", b"\0\0\0\0\0\0\0\0");
    let good = model(&graph_with_initializer(&tensor("w", Some("w.bin"))), &[]);
    write(dir.path(), "good.onnx", &good);
    let evil = model(
        &graph_with_initializer(&tensor("w", Some("../../etc/passwd"))),
        &[],
    );
    write(dir.path(), "evil.onnx", &evil);
    // Looks like ONNX for a few bytes, is not.
    write(dir.path(), "fake.onnx", b"\x08\x07\x3a\xff\xff\xff\xff\x0f");
    write(dir.path(), "model.h5", &fake_h5(KERAS2_BENIGN));
    let lambda = r#"{"class_name": "Lambda", "config": {"function": ["4wEA", null, null]}}"#;
    write(dir.path(), "lambda.h5", &fake_h5(lambda));
    let report = scan_paths(&[dir.path().to_path_buf()]);
    let by_name = |n: &str| report.files.iter().find(|f| f.path == n).expect(n);
    let good = by_name("good.onnx");
    assert_eq!(
        (good.format, good.verdict),
        (Format::Onnx, Verdict::Clean),
        "{good:?}"
    );
    let evil = by_name("evil.onnx");
    assert_eq!((evil.format, evil.verdict), (Format::Onnx, Verdict::Unsafe));
    assert_eq!(rules(evil), vec![crate::onnx::rule::EXTERNAL_DATA]);
    let fake = by_name("fake.onnx");
    assert_eq!((fake.format, fake.verdict), (Format::Unknown, Verdict::Unsafe));
    assert_eq!(rules(fake), vec![rule::FORMAT_NOT_ALLOWED]);
    let h5 = by_name("model.h5");
    assert_eq!((h5.format, h5.verdict), (Format::Hdf5, Verdict::Clean), "{h5:?}");
    let lambda = by_name("lambda.h5");
    assert_eq!(rules(lambda), vec![crate::keras::rule::LAMBDA]);
}
