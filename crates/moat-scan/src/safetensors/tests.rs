//! Tests for the strict safetensors header rules: one per rule, valid edge
//! cases (empty tensors, padding), and a deterministic fuzz loop.

use super::*;

/// A safetensors file: length prefix, header, then `data_len` zero bytes.
pub(crate) fn build(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

/// A small valid file with two tensors and metadata.
pub(crate) fn valid_file() -> Vec<u8> {
    build(
        r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
        22,
    )
}

fn check(bytes: &[u8]) -> Result<Header, Vec<Violation>> {
    check_header(bytes, bytes.len() as u64)
}

fn rules(bytes: &[u8]) -> Vec<&'static str> {
    match check(bytes) {
        Ok(_) => Vec::new(),
        Err(v) => v.iter().map(|v| v.rule).collect(),
    }
}

fn only_violation(bytes: &[u8]) -> Violation {
    let violations = check(bytes).expect_err("must be rejected");
    assert_eq!(violations.len(), 1, "{violations:#?}");
    violations.into_iter().next().expect("one violation")
}

fn tensor(name: &str, dtype: &str, shape: &str, begin: u64, end: u64) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}"#)
}

#[test]
fn valid_file_passes_with_sorted_tensors_and_metadata() {
    let header = check(&valid_file()).expect("valid");
    assert_eq!(header.tensors.len(), 2);
    assert_eq!(header.tensors[0].name, "a");
    assert_eq!(header.tensors[0].shape, vec![2, 2]);
    assert_eq!((header.tensors[1].begin, header.tensors[1].end), (16, 22));
    assert_eq!(header.metadata, vec![("format".into(), "pt".into())]);
}

#[test]
fn zero_element_tensors_scalars_and_space_padding_pass() {
    let json = format!(
        "{{{},{},{},{}}}     ",
        tensor("empty", "F32", "[0]", 0, 0),
        tensor("empty2", "I64", "[2,0,3]", 4, 4),
        tensor("scalar", "F32", "[]", 0, 4),
        tensor(
            "huge_but_empty",
            "F64",
            "[18446744073709551615,18446744073709551615,0]",
            4,
            4
        ),
    );
    let header = check(&build(&json, 4)).expect("valid");
    assert_eq!(header.tensors.len(), 4);
    assert_eq!(header.header_len, json.len() as u64);
}

#[test]
fn empty_header_object_is_valid() {
    let header = check(&build("{}", 0)).expect("valid");
    assert!(header.tensors.is_empty());
}

#[test]
fn header_length_file_shorter_than_8_bytes() {
    let v = only_violation(&[1, 0, 0]);
    assert_eq!(v.rule, rule::HEADER_LENGTH);
    assert!(v.message.contains("3 bytes"), "{}", v.message);
}

#[test]
fn header_length_beyond_end_of_file() {
    let mut bytes = 100u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let v = only_violation(&bytes);
    assert_eq!(v.rule, rule::HEADER_LENGTH);
    assert!(v.message.contains("100"), "{}", v.message);
}

#[test]
fn header_length_prefix_shorter_than_header() {
    let file = valid_file();
    let v = check_header(&file[..20], file.len() as u64).expect_err("short prefix");
    assert_eq!(v[0].rule, rule::HEADER_LENGTH);
}

#[test]
fn header_too_large_is_checked_before_reading() {
    // Declares 200 MB in an 8-byte "file": must be refused from the prefix
    // alone, without allocating the declared size.
    let bytes = 200_000_000u64.to_le_bytes();
    let v = only_violation(&bytes);
    assert_eq!(v.rule, rule::HEADER_TOO_LARGE);
    assert!(v.message.contains("200000000"), "{}", v.message);

    let v = only_violation(&u64::MAX.to_le_bytes());
    assert_eq!(v.rule, rule::HEADER_TOO_LARGE);

    // Exactly at the limit is only a length problem in a tiny file.
    let v = only_violation(&MAX_HEADER_LEN.to_le_bytes());
    assert_eq!(v.rule, rule::HEADER_LENGTH);
}

#[test]
fn header_too_large_from_disk_reads_only_the_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.safetensors");
    let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, &bytes).expect("write");
    let v = check_file(&path).expect_err("too large");
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].rule, rule::HEADER_TOO_LARGE);
}

#[test]
fn header_json_invalid_is_one_violation() {
    let v = only_violation(&build(r#"{"a":{"dtype":"#, 0));
    assert_eq!(v.rule, rule::HEADER_JSON);
    assert!(v.location.starts_with("header line 1 column"), "{}", v.location);
}

#[test]
fn header_json_not_utf8() {
    let mut header = br#"{"a":"#.to_vec();
    header.extend_from_slice(&[0xff, 0xfe]);
    header.push(b'}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    let v = only_violation(&bytes);
    assert_eq!(v.rule, rule::HEADER_JSON);
    assert!(v.message.contains("UTF-8"));
    assert_eq!(v.location, "offset 13");
}

#[test]
fn header_json_padding_must_be_spaces_and_start_must_be_brace() {
    let v = only_violation(&build("{}\n", 0));
    assert_eq!(v.rule, rule::HEADER_JSON);
    let v = only_violation(&build("{}\t ", 0));
    assert_eq!(v.rule, rule::HEADER_JSON);
    let v = only_violation(&build(" {}", 0));
    assert_eq!(v.rule, rule::HEADER_JSON);
    let v = only_violation(&build("[]", 0));
    assert_eq!(v.rule, rule::HEADER_JSON);
    let v = only_violation(&build("{} {}", 0));
    assert_eq!(v.rule, rule::HEADER_JSON);
    let v = only_violation(&build("", 0));
    assert_eq!(v.rule, rule::HEADER_JSON);
}

#[test]
fn header_json_tensor_entry_structure() {
    let cases = [
        (r#"{"t":[1,2]}"#, "found an array"),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#,
            "unknown field 'extra'",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[1]}}"#,
            "missing field data_offsets",
        ),
        (
            r#"{"t":{"shape":[1],"data_offsets":[0,4]}}"#,
            "missing field dtype",
        ),
        (
            r#"{"t":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}"#,
            "dtype must be a string",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            "element 0 is a negative integer",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}"#,
            "element 0 is a non-integer number",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":"1","data_offsets":[0,4]}}"#,
            "found a string",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
            "exactly 2 elements, found 3",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,null]}}"#,
            "element 1 is null",
        ),
        (
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,99999999999999999999]}}"#,
            "non-integer",
        ),
        (
            r#"{"t":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            "'dtype' appears more than once",
        ),
    ];
    for (json, expected) in cases {
        let v = only_violation(&build(json, 4));
        assert_eq!(v.rule, rule::HEADER_JSON, "{json}");
        assert!(v.message.contains(expected), "{json}: {}", v.message);
        assert_eq!(v.location, "tensor 't'");
    }
}

#[test]
fn structural_errors_in_several_tensors_are_all_reported() {
    let json = r#"{"a":1,"b":{"dtype":"F32"},"c":{"dtype":"X","shape":[1],"data_offsets":[0,4]}}"#;
    assert_eq!(
        rules(&build(json, 4)),
        vec![rule::HEADER_JSON, rule::HEADER_JSON, rule::DTYPE]
    );
}

#[test]
fn metadata_good_and_bad() {
    let good = format!(
        r#"{{"__metadata__":{{"a":"1","b":"two"}},{}}}"#,
        tensor("t", "U8", "[1]", 0, 1)
    );
    let header = check(&build(&good, 1)).expect("valid");
    assert_eq!(
        header.metadata,
        vec![("a".into(), "1".into()), ("b".into(), "two".into())]
    );

    let not_string = format!(
        r#"{{"__metadata__":{{"a":1}},{}}}"#,
        tensor("t", "U8", "[1]", 0, 1)
    );
    let v = only_violation(&build(&not_string, 1));
    assert_eq!(v.rule, rule::METADATA);
    assert_eq!(v.location, "key __metadata__.a");

    let not_object = format!(r#"{{"__metadata__":["a"],{}}}"#, tensor("t", "U8", "[1]", 0, 1));
    let v = only_violation(&build(&not_object, 1));
    assert_eq!(v.rule, rule::METADATA);
    assert!(v.message.contains("found an array"));

    let nested = r#"{"__metadata__":{"a":{"b":"c"}}}"#;
    assert_eq!(rules(&build(nested, 0)), vec![rule::METADATA]);

    let dup_key = r#"{"__metadata__":{"a":"1","a":"2"}}"#;
    assert_eq!(rules(&build(dup_key, 0)), vec![rule::METADATA]);
}

#[test]
fn duplicate_tensor_is_detected() {
    // serde_json's map would silently keep the second entry.
    let json = format!(
        "{{{},{}}}",
        tensor("w", "F32", "[1]", 0, 4),
        tensor("w", "F32", "[1]", 0, 4)
    );
    let violations = check(&build(&json, 4)).expect_err("duplicate");
    assert_eq!(violations[0].rule, rule::DUPLICATE_TENSOR);
    assert_eq!(violations[0].location, "tensor 'w'");
    assert!(violations[0].message.contains("'w'"));
}

#[test]
fn duplicate_metadata_is_detected() {
    let json = r#"{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}"#;
    let v = only_violation(&build(json, 0));
    assert_eq!(v.rule, rule::DUPLICATE_TENSOR);
    assert_eq!(v.location, "key __metadata__");
}

#[test]
fn unknown_dtype() {
    let json = format!("{{{}}}", tensor("t", "F128", "[1]", 0, 16));
    let v = only_violation(&build(&json, 16));
    assert_eq!(v.rule, rule::DTYPE);
    assert!(v.message.contains("'F128'"));
}

#[test]
fn every_known_dtype_has_its_size() {
    for (dtype, size) in [
        ("BOOL", 1),
        ("U8", 1),
        ("I8", 1),
        ("F8_E5M2", 1),
        ("F8_E4M3", 1),
        ("I16", 2),
        ("U16", 2),
        ("F16", 2),
        ("BF16", 2),
        ("I32", 4),
        ("U32", 4),
        ("F32", 4),
        ("F64", 8),
        ("I64", 8),
        ("U64", 8),
    ] {
        assert_eq!(dtype_size(dtype), Some(size), "{dtype}");
        let json = format!("{{{}}}", tensor("t", dtype, "[3]", 0, 3 * size));
        assert!(check(&build(&json, 3 * size as usize)).is_ok(), "{dtype}");
    }
    assert_eq!(dtype_size("f32"), None);
}

#[test]
fn offsets_begin_after_end() {
    let json = format!("{{{}}}", tensor("t", "U8", "[0]", 4, 0));
    let v = only_violation(&build(&json, 4));
    assert_eq!(v.rule, rule::OFFSETS);
    assert!(v.message.contains("[4, 0]"));
}

#[test]
fn offsets_must_start_at_zero() {
    let json = format!("{{{}}}", tensor("t", "U8", "[4]", 4, 8));
    let v = only_violation(&build(&json, 8));
    assert_eq!(v.rule, rule::OFFSETS);
    assert!(v.message.contains("offset 0"));
}

#[test]
fn offsets_gap_and_overlap() {
    let gap = format!(
        "{{{},{}}}",
        tensor("a", "U8", "[4]", 0, 4),
        tensor("b", "U8", "[4]", 6, 10)
    );
    let v = only_violation(&build(&gap, 10));
    assert_eq!(v.rule, rule::OFFSETS);
    assert!(v.message.contains("gap of 2 bytes"), "{}", v.message);

    let overlap = format!(
        "{{{},{}}}",
        tensor("a", "U8", "[4]", 0, 4),
        tensor("b", "U8", "[4]", 2, 6)
    );
    let v = only_violation(&build(&overlap, 6));
    assert_eq!(v.rule, rule::OFFSETS);
    assert!(v.message.contains("overlap tensor 'a'"), "{}", v.message);
    assert_eq!(v.location, "tensor 'b'");
}

#[test]
fn size_mismatch() {
    let json = format!("{{{}}}", tensor("t", "F32", "[2,3]", 0, 20));
    let v = only_violation(&build(&json, 20));
    assert_eq!(v.rule, rule::SIZE_MISMATCH);
    assert!(v.message.contains("needs 24 bytes"), "{}", v.message);
    assert!(v.message.contains("span 20 bytes"), "{}", v.message);
}

#[test]
fn size_overflow_in_shape_product_is_a_mismatch() {
    let json = format!("{{{}}}", tensor("t", "F32", "[4294967296,4294967296]", 0, 4));
    let v = only_violation(&build(&json, 4));
    assert_eq!(v.rule, rule::SIZE_MISMATCH);
    assert!(v.message.contains("overflows"), "{}", v.message);

    // Element count fits, times the dtype size does not.
    let json = format!("{{{}}}", tensor("t", "F64", "[2305843009213693952]", 0, 4));
    let v = only_violation(&build(&json, 4));
    assert!(v.message.contains("overflows"), "{}", v.message);
}

#[test]
fn file_length_trailing_and_missing_bytes() {
    let json = format!("{{{}}}", tensor("t", "U8", "[4]", 0, 4));
    let v = only_violation(&build(&json, 5));
    assert_eq!(v.rule, rule::FILE_LENGTH);
    assert!(v.message.contains("1 trailing bytes"), "{}", v.message);

    let v = only_violation(&build(&json, 3));
    assert_eq!(v.rule, rule::FILE_LENGTH);
    assert!(
        v.message.contains("1 bytes of tensor data missing"),
        "{}",
        v.message
    );

    let v = only_violation(&build("{}", 1));
    assert_eq!(v.rule, rule::FILE_LENGTH);
}

#[test]
fn independent_violations_are_all_reported() {
    let json = format!(
        "{{{},{},{}}}",
        tensor("a", "Q4", "[4]", 0, 4),
        tensor("b", "F32", "[4]", 4, 8),
        tensor("a", "U8", "[1]", 8, 9)
    );
    let got = rules(&build(&json, 10));
    assert_eq!(
        got,
        vec![
            rule::DTYPE,
            rule::SIZE_MISMATCH,
            rule::DUPLICATE_TENSOR,
            rule::FILE_LENGTH
        ]
    );
}

#[test]
fn violations_per_rule_are_capped() {
    let entries: Vec<String> = (0..50)
        .map(|i| tensor(&format!("t{i}"), "NOPE", "[0]", 0, 0))
        .collect();
    let json = format!("{{{}}}", entries.join(","));
    let violations = check(&build(&json, 0)).expect_err("bad dtypes");
    assert_eq!(violations.len(), MAX_PER_RULE + 1);
    assert!(violations.iter().all(|v| v.rule == rule::DTYPE));
    assert!(violations[MAX_PER_RULE].message.contains("30 more"));
}

#[test]
fn hostile_names_are_escaped_in_messages() {
    let json = "{\"\\u001b[31mx\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,3]}}";
    let v = only_violation(&build(json, 3));
    assert!(!v.message.contains('\u{1b}'));
    assert!(v.location.contains("\\u{1b}"), "{}", v.location);
}

#[test]
fn check_file_accepts_a_valid_file_and_reports_io_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, valid_file()).expect("write");
    assert_eq!(check_file(&path).expect("valid").tensors.len(), 2);

    let v = check_file(&dir.path().join("missing")).expect_err("missing");
    assert_eq!(v[0].rule, rule::IO_READ);

    let short = dir.path().join("short");
    std::fs::write(&short, b"abc").expect("write");
    assert_eq!(
        check_file(&short).expect_err("short")[0].rule,
        rule::HEADER_LENGTH
    );
}

/// Deterministic xorshift, so the fuzz loop needs no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzz_never_panics_on_random_truncated_or_mutated_input() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let valid = valid_file();

    // Every truncation of a valid file.
    for len in 0..=valid.len() {
        fuzz(&valid[..len]);
    }
    // Random bytes, with a plausible length prefix half the time.
    for _ in 0..2000 {
        let len = rng.below(96);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len >= 9 && rng.next().is_multiple_of(2) {
            let n = (len - 8) as u64;
            data[..8].copy_from_slice(&n.to_le_bytes());
            data[8] = b'{';
        }
        fuzz(&data);
    }
    // Mutations of a valid file: flips, JSON-ish byte insertions, deletions.
    let alphabet = b"{}[]\":,0123456789-.e ";
    for _ in 0..5000 {
        let mut data = valid.clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(data.len());
            match rng.below(3) {
                0 => data[at] ^= 1 << rng.below(8),
                1 => data.insert(at, alphabet[rng.below(alphabet.len())]),
                _ => {
                    data.remove(at);
                }
            }
        }
        fuzz(&data);
        // A mutation may well still be valid; if so it must re-check clean.
        if let Ok(h) = check(&data) {
            assert!(h.tensors.windows(2).all(|w| w[0].end == w[1].begin));
        }
    }
}

#[test]
fn fuzz_seed_corpus_is_what_its_names_say() {
    let dir = // The folder at run time (cargo sets it for tests): a test binary reused
    // from a build in another checkout must not read that checkout's files.
    std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("../../fuzz/corpus/safetensors_header");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("seed corpus exists") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).expect("read seed");
        fuzz(&bytes);
        assert_eq!(check(&bytes).is_ok(), name.starts_with("valid"), "seed {name}");
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} seeds");
}
