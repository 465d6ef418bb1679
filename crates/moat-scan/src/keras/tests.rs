//! Keras config rules on Keras 2 and Keras 3 shaped configs, and the HDF5
//! config finder on synthetic files.

use super::*;

fn rules(json: &str) -> Vec<String> {
    check_config(json.as_bytes())
        .into_iter()
        .map(|f| f.rule)
        .collect()
}

const KERAS3_BENIGN: &str = r#"{"module": "keras", "class_name": "Sequential", "config": {"name": "seq",
  "layers": [
    {"module": "keras.layers", "class_name": "InputLayer", "config": {"batch_shape": [null, 4]}, "registered_name": null},
    {"module": "keras.layers", "class_name": "Dense", "config": {"units": 8,
      "activation": {"module": "keras.src.activations", "class_name": "function", "config": "relu", "registered_name": "relu"},
      "kernel_initializer": {"module": "keras.initializers", "class_name": "GlorotUniform", "config": {"seed": null}, "registered_name": null}},
     "registered_name": null}
  ]}, "registered_name": null,
  "compile_config": {"optimizer": {"module": "keras.optimizers", "class_name": "Adam", "config": {}, "registered_name": null},
    "loss": {"module": "keras.losses", "class_name": "function", "config": "mean_squared_error", "registered_name": null}}}"#;

pub(crate) const KERAS2_BENIGN: &str = r#"{"class_name": "Sequential", "config": {"name": "sequential", "layers": [
  {"class_name": "Dense", "config": {"name": "dense", "units": 1, "activation": "linear"}}]},
  "keras_version": "2.15.0", "backend": "tensorflow"}"#;

#[test]
fn benign_configs_pass() {
    assert_eq!(rules(KERAS3_BENIGN), Vec::<String>::new());
    assert_eq!(rules(KERAS2_BENIGN), Vec::<String>::new());
    assert_eq!(
        rules(r#"{"module": "tensorflow.keras.layers", "class_name": "Dense", "config": {}}"#),
        Vec::<String>::new()
    );
}

#[test]
fn lambda_layers_are_critical() {
    let keras2 = r#"{"class_name": "Sequential", "config": {"layers": [{"class_name": "Lambda",
        "config": {"name": "l", "function": ["4wEAAAAAAAAA", null, null], "function_type": "lambda"}}]}}"#;
    let found = check_config(keras2.as_bytes());
    // The layer, and the lambda function in its config.
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().all(|f| f.rule == rule::LAMBDA));
    assert_eq!(found[0].severity, Severity::Critical);
    assert_eq!(found[0].location, "$.config.layers[0]");
    let keras3 = r#"{"module": "keras.layers", "class_name": "Dense", "config": {"activation":
        {"class_name": "__lambda__", "config": {"code": "4wEAAAAA", "defaults": null, "closure": null}}}}"#;
    assert_eq!(rules(keras3), vec![rule::LAMBDA]);
}

#[test]
fn foreign_modules_are_refused() {
    // CVE-2025-1550 shape: a layer whose module is a code-running module.
    let os = r#"{"module": "keras.layers", "class_name": "Dense", "config": {"activation":
        {"module": "os", "class_name": "system", "config": "id", "registered_name": null}}}"#;
    let found = check_config(os.as_bytes());
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].rule.as_str(), found[0].severity),
        (rule::MODULE, Severity::Critical)
    );
    for m in ["builtins", "subprocess", "os.path", "importlib.util", "posix"] {
        let j = format!(r#"{{"module": "{m}", "class_name": "x", "config": {{}}}}"#);
        let found = check_config(j.as_bytes());
        assert_eq!(found[0].severity, Severity::Critical, "{m}");
    }
    let other = r#"{"module": "my_company.layers", "class_name": "Fancy", "config": {}}"#;
    let found = check_config(other.as_bytes());
    assert_eq!(
        (found[0].rule.as_str(), found[0].severity),
        (rule::MODULE, Severity::High)
    );
    // A prefix trick: "keras_evil" is not "keras".
    assert_eq!(
        rules(r#"{"module": "keras_evil", "class_name": "x"}"#),
        vec![rule::MODULE]
    );
    assert_eq!(
        rules(r#"{"module": "keras.utils", "class_name": "x"}"#),
        vec![rule::MODULE]
    );
    let registered =
        r#"{"module": "keras.layers", "class_name": "Dense", "registered_name": "evilpkg>Dense"}"#;
    assert_eq!(rules(registered), vec![rule::MODULE]);
}

#[test]
fn functions_outside_function_modules_are_refused() {
    let get_file = r#"{"module": "keras.src.utils", "class_name": "function", "config": "get_file"}"#;
    assert_eq!(rules(get_file), vec![rule::FUNCTION]);
}

#[test]
fn invalid_json_is_a_finding() {
    assert_eq!(rules("{\"class_name\": "), vec![rule::CONFIG]);
}

/// An h5py-like file: signature, binary structure, a global heap object
/// holding the JSON config, stray `{` bytes, weights.
pub(crate) fn fake_h5(config: &str) -> Vec<u8> {
    let mut out = HDF5_MAGIC.to_vec();
    out.extend_from_slice(&[0, 0, 0, 0, 8, 8, 0, 0, b'{', 1, 2, b'{', b'"', 0xff, 0x7b]);
    out.extend(std::iter::repeat_n(0xab, 300));
    out.extend_from_slice(b"GCOL\x01\x00\x00\x00");
    out.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&(config.len() as u64).to_le_bytes());
    out.extend_from_slice(config.as_bytes());
    out.extend(std::iter::repeat_n(0u8, 7));
    out.extend((0..5000u32).flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes()));
    out
}

#[test]
fn hdf5_configs_are_found_and_checked() {
    assert!(is_hdf5(&fake_h5("")));
    let mut with_user_block = vec![0u8; 512];
    with_user_block.extend_from_slice(HDF5_MAGIC);
    assert!(is_hdf5(&with_user_block));
    assert!(!is_hdf5(b"\x89HDF"));

    let weights_only = fake_h5("");
    assert_eq!(check_hdf5(io::Cursor::new(weights_only)).unwrap(), vec![]);
    let benign = fake_h5(KERAS2_BENIGN);
    assert_eq!(check_hdf5(io::Cursor::new(benign)).unwrap(), vec![]);

    let evil = r#"{"config": {"layers": [{"config": {"function": ["4wEA", null, null]}, "class_name": "Lambda"}]}, "class_name": "Functional"}"#;
    let data = fake_h5(evil);
    let found = check_hdf5(io::Cursor::new(&data)).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].rule, rule::LAMBDA);
    let at = data.windows(10).position(|w| w == b"{\"config\":").unwrap();
    assert!(
        found[0].location.starts_with(&format!("offset {at}, $")),
        "{}",
        found[0].location
    );

    // The config straddles a window edge: still found once.
    for window in [64, 333, 350, 400] {
        let found = scan_windows(io::Cursor::new(&data), window, 4096).unwrap();
        assert_eq!(found.len(), 1, "window {window}: {found:?}");
    }
}
