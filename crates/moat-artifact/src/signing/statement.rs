//! The in-toto Statement v1 that is signed, in both predicate versions the
//! tool verifies:
//!
//! - `https://model_signing/signature/v1.0`: one subject named after the
//!   model whose sha256 is SHA-256 over the raw resource digests in order;
//!   `predicate.resources` lists `{name, algorithm, digest}`;
//!   `predicate.serialization` says how to re-hash (method, hash type,
//!   symlinks, ignored paths, shard size);
//! - `https://model_signing/Digests/v0.1` (model_signing v0.2): one subject
//!   per file; no name, no serialization (files, sha256 implied).

use super::error::SignatureError;
use super::manifest::{Method, Resource, ResourceKey, Serialization, parse_resource_name, root_digest};
use super::pyjson::to_python_pretty;
use serde_json::{Map, Value, json};

pub(crate) const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub(crate) const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
pub(crate) const PREDICATE_TYPE_COMPAT: &str = "https://model_signing/Digests/v0.1";
/// The name the tool gives a v0.1 manifest, which has none.
pub const COMPAT_MODEL_NAME: &str = "compat-undefined-not-present";

/// The statement's content once its signature has been checked.
#[derive(Debug, Clone)]
pub(crate) struct Statement {
    pub model_name: String,
    pub serialization: Serialization,
    /// In the order signed, with parsed keys.
    pub resources: Vec<(ResourceKey, Resource)>,
    /// True for the v0.1 predicate.
    pub legacy: bool,
}

/// Render the payload for `resources` (already in manifest order).
pub(crate) fn render(
    model_name: &str,
    serialization: &Serialization,
    resources: &[Resource],
) -> Result<Vec<u8>, String> {
    let root = root_digest(resources.iter().map(|r| r.digest.as_str()))?;
    // Keys in the order the tool builds them (protobuf keeps Struct keys in
    // a map whose order varies run to run; this is the insertion order).
    let mut ser = Map::new();
    let (method, shard_size) = match serialization.method {
        Method::Files => ("files", None),
        Method::Shards { shard_size } => ("shards", Some(shard_size)),
    };
    ser.insert("method".into(), json!(method));
    ser.insert("hash_type".into(), json!(serialization.hash_type));
    if let Some(size) = shard_size {
        // A protobuf Struct number is a double: the tool writes `1000000000.0`.
        ser.insert("shard_size".into(), json!(size as f64));
    }
    ser.insert("allow_symlinks".into(), json!(serialization.allow_symlinks));
    if !serialization.ignore_paths.is_empty() {
        ser.insert("ignore_paths".into(), json!(serialization.ignore_paths));
    }
    let statement = json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": Value::Object(ser),
            "resources": resources
                .iter()
                .map(|r| json!({"name": r.name, "algorithm": r.algorithm, "digest": r.digest}))
                .collect::<Vec<_>>(),
        },
    });
    Ok(to_python_pretty(&statement).into_bytes())
}

/// The member named by the last segment of `path` (`subject[0].digest.sha256`
/// looks up `sha256`); `path` is only there to name the field in errors.
fn get<'a>(obj: &'a Map<String, Value>, path: &str) -> Result<&'a Value, SignatureError> {
    let key = path.rsplit('.').next().unwrap_or(path);
    let key = key.split('[').next().unwrap_or(key);
    obj.get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| SignatureError::malformed(format!("payload {path}"), "missing"))
}

fn as_obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, SignatureError> {
    v.as_object()
        .ok_or_else(|| SignatureError::malformed(format!("payload {path}"), "not a JSON object"))
}

fn as_str<'a>(v: &'a Value, path: &str) -> Result<&'a str, SignatureError> {
    v.as_str()
        .ok_or_else(|| SignatureError::malformed(format!("payload {path}"), "not a string"))
}

fn as_array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>, SignatureError> {
    v.as_array()
        .ok_or_else(|| SignatureError::malformed(format!("payload {path}"), "not an array"))
}

/// A hex digest as the tool accepts it (`bytes.fromhex`), lower-cased.
fn hex_digest(v: &Value, path: &str) -> Result<String, SignatureError> {
    let s: String = as_str(v, path)?.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(&s)
        .map(hex::encode)
        .map_err(|e| SignatureError::malformed(format!("payload {path}"), format!("not hex: {e}")))
}

/// Parse a signature-checked payload.
pub(crate) fn parse(payload: &[u8]) -> Result<Statement, SignatureError> {
    let root: Value = serde_json::from_slice(payload)
        .map_err(|e| SignatureError::malformed("payload", format!("not JSON: {e}")))?;
    let root = as_obj(&root, "(statement)")?;
    let ty = as_str(get(root, "_type")?, "_type")?;
    if ty != STATEMENT_TYPE {
        return Err(SignatureError::UnsupportedStatement(ty.to_owned()));
    }
    let predicate_type = as_str(get(root, "predicateType")?, "predicateType")?;
    let subjects = as_array(get(root, "subject")?, "subject")?;
    match predicate_type {
        PREDICATE_TYPE => parse_v1(root, subjects),
        PREDICATE_TYPE_COMPAT => parse_compat(subjects),
        other => Err(SignatureError::UnsupportedPredicate(other.to_owned())),
    }
}

fn parse_v1(root: &Map<String, Value>, subjects: &[Value]) -> Result<Statement, SignatureError> {
    let [subject] = subjects else {
        return Err(SignatureError::malformed(
            "payload subject",
            format!("expected exactly one subject, found {}", subjects.len()),
        ));
    };
    let subject = as_obj(subject, "subject[0]")?;
    let model_name = as_str(get(subject, "subject[0].name")?, "subject[0].name")?.to_owned();
    let digest = as_obj(get(subject, "subject[0].digest")?, "subject[0].digest")?;
    let subject_digest = hex_digest(
        get(digest, "subject[0].digest.sha256")?,
        "subject[0].digest.sha256",
    )?;

    let predicate = as_obj(get(root, "predicate")?, "predicate")?;
    let ser = as_obj(
        get(predicate, "predicate.serialization")?,
        "predicate.serialization",
    )?;
    let method = match as_str(
        get(ser, "predicate.serialization.method")?,
        "predicate.serialization.method",
    )? {
        "files" => Method::Files,
        "shards" => {
            let v = get(ser, "predicate.serialization.shard_size")?;
            let size = v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f < 1.8e19)
                        .map(|f| f as u64)
                })
                .filter(|s| *s > 0)
                .ok_or_else(|| {
                    SignatureError::malformed(
                        "payload predicate.serialization.shard_size",
                        "not a positive whole number",
                    )
                })?;
            Method::Shards { shard_size: size }
        }
        other => {
            return Err(SignatureError::Unsupported(format!(
                "serialization method \"{other}\""
            )));
        }
    };
    let hash_type = as_str(
        get(ser, "predicate.serialization.hash_type")?,
        "predicate.serialization.hash_type",
    )?
    .to_owned();
    let allow_symlinks = get(ser, "predicate.serialization.allow_symlinks")?
        .as_bool()
        .ok_or_else(|| {
            SignatureError::malformed("payload predicate.serialization.allow_symlinks", "not a boolean")
        })?;
    let ignore_paths = match ser.get("ignore_paths") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => as_array(v, "predicate.serialization.ignore_paths")?
            .iter()
            .enumerate()
            .map(|(i, p)| as_str(p, &format!("predicate.serialization.ignore_paths[{i}]")).map(str::to_owned))
            .collect::<Result<_, _>>()?,
    };
    let serialization = Serialization {
        method,
        hash_type,
        allow_symlinks,
        ignore_paths,
    };

    let mut resources = Vec::new();
    for (i, r) in as_array(get(predicate, "predicate.resources")?, "predicate.resources")?
        .iter()
        .enumerate()
    {
        let path = format!("predicate.resources[{i}]");
        let r = as_obj(r, &path)?;
        let name = as_str(get(r, &format!("{path}.name"))?, &format!("{path}.name"))?.to_owned();
        let algorithm = as_str(
            get(r, &format!("{path}.algorithm"))?,
            &format!("{path}.algorithm"),
        )?
        .to_owned();
        let digest = hex_digest(get(r, &format!("{path}.digest"))?, &format!("{path}.digest"))?;
        let key = parse_resource_name(&name, method)
            .map_err(|e| SignatureError::malformed(format!("payload {path}.name"), e))?;
        resources.push((
            key,
            Resource {
                name,
                algorithm,
                digest,
            },
        ));
    }
    let computed = root_digest(resources.iter().map(|(_, r)| r.digest.as_str()))
        .map_err(|e| SignatureError::malformed("payload predicate.resources", e))?;
    if computed != subject_digest {
        return Err(SignatureError::InconsistentManifest {
            subject: subject_digest,
            computed,
        });
    }
    Ok(Statement {
        model_name,
        serialization,
        resources,
        legacy: false,
    })
}

fn parse_compat(subjects: &[Value]) -> Result<Statement, SignatureError> {
    let mut resources = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        let path = format!("subject[{i}]");
        let s = as_obj(s, &path)?;
        let name = as_str(get(s, &format!("{path}.name"))?, &format!("{path}.name"))?.to_owned();
        let digest = as_obj(get(s, &format!("{path}.digest"))?, &format!("{path}.digest"))?;
        let digest = hex_digest(
            get(digest, &format!("{path}.digest.sha256"))?,
            &format!("{path}.digest.sha256"),
        )?;
        let key = parse_resource_name(&name, Method::Files)
            .map_err(|e| SignatureError::malformed(format!("payload {path}.name"), e))?;
        resources.push((
            key,
            Resource {
                name,
                algorithm: "sha256".to_owned(),
                digest,
            },
        ));
    }
    Ok(Statement {
        model_name: COMPAT_MODEL_NAME.to_owned(),
        serialization: Serialization {
            method: Method::Files,
            hash_type: "sha256".to_owned(),
            allow_symlinks: false,
            ignore_paths: Vec::new(),
        },
        resources,
        legacy: true,
    })
}
