//! Tests for the Hugging Face folder rules, on names and config contents.

use super::*;

fn rules(findings: &[Finding]) -> Vec<&str> {
    findings.iter().map(|f| f.rule.as_str()).collect()
}

#[test]
fn python_files_are_refused_by_name_in_any_case() {
    for name in ["modeling_evil.py", "sub/dir/x.py", "UPPER.PY", "a.Py"] {
        let f = check_name(name);
        assert_eq!(rules(&f), vec![rule::PYTHON_FILE], "{name}");
        assert_eq!(f[0].severity, Severity::Critical);
    }
    for name in [
        "model.safetensors",
        "py",
        "x.pyc",
        "notes.py.txt",
        "py/config.json",
    ] {
        assert!(check_name(name).is_empty(), "{name}");
    }
}

#[test]
fn config_file_names() {
    for name in [
        "config.json",
        "a/b/config.json",
        "tokenizer_config.json",
        "CONFIG.JSON",
    ] {
        assert!(is_config_file(name), "{name}");
    }
    for name in [
        "generation_config.json",
        "config.json.bak",
        "tokenizer.json",
        "myconfig.json",
    ] {
        assert!(!is_config_file(name), "{name}");
    }
}

#[test]
fn top_level_auto_map_is_remote_code() {
    let cfg = br#"{"model_type":"x","auto_map":{"AutoModel":"modeling_x.XModel"}}"#;
    let f = check_config("config.json", Some(cfg));
    assert_eq!(rules(&f), vec![rule::REMOTE_CODE]);
    assert_eq!(f[0].severity, Severity::Critical);
    assert_eq!(f[0].location, "key auto_map");
}

#[test]
fn nested_auto_map_is_found_with_its_path() {
    let cfg = br#"{"text_config":{"auto_map":{"AutoModel":"m.M"}},"vision":[{"auto_map":{}}]}"#;
    let f = check_config("sub/config.json", Some(cfg));
    let locations: Vec<&str> = f.iter().map(|f| f.location.as_str()).collect();
    assert_eq!(
        locations,
        vec!["key text_config.auto_map", "key vision[0].auto_map"]
    );
}

#[test]
fn tokenizer_config_auto_map_is_remote_code() {
    let cfg = br#"{"auto_map":{"AutoTokenizer":["tok.T",null]},"model_max_length":4096}"#;
    let f = check_config("tokenizer_config.json", Some(cfg));
    assert_eq!(rules(&f), vec![rule::REMOTE_CODE]);
    assert!(f[0].message.contains("tokenizer_config.json"));
}

#[test]
fn clean_config_has_no_findings() {
    let cfg = br#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","auto_map_note":"x"}"#;
    assert!(check_config("config.json", Some(cfg)).is_empty());
}

#[test]
fn unparsable_config_names_line_and_column() {
    let f = check_config("config.json", Some(b"{\n  \"a\": 1,\n}"));
    assert_eq!(rules(&f), vec![rule::CONFIG_JSON]);
    assert_eq!(f[0].severity, Severity::High);
    assert_eq!(f[0].location, "line 3 column 1");
    assert!(f[0].message.contains("line 3 column 1"), "{}", f[0].message);

    let f = check_config("config.json", None);
    assert_eq!(rules(&f), vec![rule::CONFIG_JSON]);
}

#[test]
fn chat_templates_in_tokenizer_config_are_checked() {
    let evil = r#"{"chat_template": "{{ cycler.__init__.__globals__.os.popen('id').read() }}"}"#;
    let found = check_config("tokenizer_config.json", Some(evil.as_bytes()));
    assert!(!found.is_empty());
    assert!(found.iter().all(|f| f.rule.starts_with("template.")), "{found:?}");
    assert!(
        found[0].location.starts_with("key chat_template line 1"),
        "{}",
        found[0].location
    );

    let list = r#"{"chat_template": [{"name": "default", "template": "{{ messages }}"},
        {"name": "tool_use", "template": "{{ x.__class__ }}"}]}"#;
    let found = check_config("tokenizer_config.json", Some(list.as_bytes()));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].location.starts_with("key chat_template[1] ('tool_use')"),
        "{}",
        found[0].location
    );

    let bad = r#"{"chat_template": 5}"#;
    let found = check_config("tokenizer_config.json", Some(bad.as_bytes()));
    assert_eq!(found[0].rule, rule::CONFIG_JSON);

    let benign = format!(
        "{{\"chat_template\": {}}}",
        serde_json::Value::String(include_str!("../template/fixtures/deepseek_r1.jinja").into())
    );
    assert_eq!(
        check_config("tokenizer_config.json", Some(benign.as_bytes())),
        vec![]
    );
    // config.json has no chat template to check.
    assert_eq!(check_config("config.json", Some(evil.as_bytes())), vec![]);
}

#[test]
fn template_files_are_checked() {
    assert!(is_template_file("sub/chat_template.jinja"));
    assert!(!is_template_file("README.md"));
    assert_eq!(check_template_file(Some(b"{{ messages }}")), vec![]);
    assert_eq!(
        check_template_file(Some(b"{% include 'x' %}"))[0].rule,
        template::rule::IMPORT
    );
    assert_eq!(check_template_file(None)[0].rule, template::rule::PARSE);
}
