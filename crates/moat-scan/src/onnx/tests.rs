//! ONNX walker tests on protobuf built by hand: external data locations in
//! every place a tensor can hide, and malformed wire data.

use super::*;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field_varint(field: u64, v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(field << 3, &mut out);
    varint(v, &mut out);
    out
}

fn field_bytes(field: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(field << 3 | 2, &mut out);
    varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

pub(crate) fn tensor(name: &str, location: Option<&str>) -> Vec<u8> {
    let mut t = field_varint(1, 2); // dims
    t.extend(field_varint(2, 1)); // data_type FLOAT
    t.extend(field_bytes(8, name.as_bytes()));
    match location {
        Some(loc) => {
            let mut entry = field_bytes(1, b"location");
            entry.extend(field_bytes(2, loc.as_bytes()));
            t.extend(field_bytes(13, &entry));
            let mut entry = field_bytes(1, b"offset");
            entry.extend(field_bytes(2, b"0"));
            t.extend(field_bytes(13, &entry));
            t.extend(field_varint(14, 1));
        }
        None => t.extend(field_bytes(9, &[0u8; 8])), // raw_data
    }
    t
}

pub(crate) fn model(graph_body: &[u8], functions: &[Vec<u8>]) -> Vec<u8> {
    let mut m = field_varint(1, 8); // ir_version
    m.extend(field_bytes(2, b"pytorch"));
    m.extend(field_bytes(7, graph_body));
    let mut opset = field_bytes(1, b"");
    opset.extend(field_varint(2, 17));
    m.extend(field_bytes(8, &opset));
    for f in functions {
        m.extend(field_bytes(25, f));
    }
    m
}

pub(crate) fn graph_with_initializer(t: &[u8]) -> Vec<u8> {
    let mut g = field_bytes(2, b"main_graph");
    g.extend(field_bytes(5, t));
    g
}

fn node_with_attribute(attr: &[u8]) -> Vec<u8> {
    let mut n = field_bytes(1, b"x");
    n.extend(field_bytes(4, b"Constant"));
    n.extend(field_bytes(5, attr));
    n
}

fn run(data: &[u8]) -> Result<Vec<Finding>, NotOnnx> {
    check(io::Cursor::new(data), None)
}

#[test]
fn benign_models_pass() {
    let m = model(&graph_with_initializer(&tensor("w", None)), &[]);
    assert!(looks_like_onnx(&m));
    assert_eq!(run(&m).unwrap(), vec![]);
    let m = model(&graph_with_initializer(&tensor("w", Some("weights.bin"))), &[]);
    assert_eq!(run(&m).unwrap(), vec![]);
    let m = model(&graph_with_initializer(&tensor("w", Some("data/w.bin"))), &[]);
    assert_eq!(run(&m).unwrap(), vec![]);
}

#[test]
fn traversal_locations_are_critical_wherever_the_tensor_is() {
    let evil = tensor("w", Some("../../../etc/passwd"));
    let mut attr_t = field_bytes(1, b"value");
    attr_t.extend(field_bytes(5, &evil));
    let mut attr_g = field_bytes(1, b"then_branch");
    attr_g.extend(field_bytes(6, &graph_with_initializer(&evil)));
    let mut sparse = field_bytes(1, &evil);
    sparse.extend(field_bytes(2, &tensor("idx", None)));
    let mut sparse_graph = field_bytes(2, b"g");
    sparse_graph.extend(field_bytes(15, &sparse));
    let function = field_bytes(7, &node_with_attribute(&attr_t));
    let cases = [
        ("initializer", model(&graph_with_initializer(&evil), &[])),
        (
            "attribute t",
            model(&field_bytes(1, &node_with_attribute(&attr_t)), &[]),
        ),
        (
            "subgraph",
            model(&field_bytes(1, &node_with_attribute(&attr_g)), &[]),
        ),
        ("sparse initializer", model(&sparse_graph, &[])),
        (
            "function",
            model(&graph_with_initializer(&tensor("ok", None)), &[function]),
        ),
    ];
    for (name, m) in cases {
        let found = run(&m).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        assert_eq!(found[0].rule, rule::EXTERNAL_DATA, "{name}");
        assert_eq!(found[0].severity, Severity::Critical);
        assert!(found[0].location.contains("tensor 'w'"), "{}", found[0].location);
    }
}

#[test]
fn unsafe_locations() {
    for loc in [
        "/etc/passwd",
        "\\\\server\\share",
        "C:/x",
        "c:\\x",
        "a/../../b",
        "..",
        "a\\b",
        "",
        "~/.ssh/id",
        "x:stream",
    ] {
        assert!(unsafe_location(loc).is_some(), "{loc}");
    }
    for loc in ["w.bin", "sub/w.bin", "a..b", "...x"] {
        assert_eq!(unsafe_location(loc), None, "{loc}");
    }
}

#[test]
fn external_without_location_is_high() {
    let mut t = field_bytes(8, b"w");
    t.extend(field_varint(14, 1));
    let found = run(&model(&graph_with_initializer(&t), &[])).unwrap();
    assert_eq!(found[0].severity, Severity::High);
}

#[test]
fn missing_external_file_is_reported_with_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("here.bin"), b"x").unwrap();
    let m = model(&graph_with_initializer(&tensor("w", Some("gone.bin"))), &[]);
    let found = check(io::Cursor::new(&m), Some(dir.path())).unwrap();
    assert_eq!(found[0].rule, rule::EXTERNAL_MISSING);
    assert_eq!(found[0].severity, Severity::Medium);
    let m = model(&graph_with_initializer(&tensor("w", Some("here.bin"))), &[]);
    assert_eq!(check(io::Cursor::new(&m), Some(dir.path())).unwrap(), vec![]);
}

#[test]
fn malformed_or_non_onnx_data_is_not_onnx() {
    let good = model(&graph_with_initializer(&tensor("w", None)), &[]);
    // A cut inside the graph fails (its length no longer fits); a cut at a
    // field boundary after the graph is still a model (protobuf has no
    // framing). None panics.
    let graph_end = good.len() - field_bytes(8, &[0; 4]).len();
    for cut in 1..good.len() {
        let result = run(&good[..cut]);
        if cut < graph_end {
            assert!(result.is_err(), "cut {cut}");
        }
    }
    let cases: Vec<Vec<u8>> = vec![
        b"hello world, plain text".to_vec(),
        vec![0x08, 0x08, 0x0b], // group start
        vec![0x08, 0x08, 0x0f], // wire type 7
        [vec![0x08], vec![0xff; 11]].concat(),
        field_varint(1, 8),  // no graph or opset
        field_bytes(7, b""), // no ir_version
        vec![],
    ];
    for c in cases {
        assert!(run(&c).is_err(), "{c:?}");
        fuzz_onnx(&c);
    }
    // Deep nesting is refused, not recursed into without bound.
    let mut g = graph_with_initializer(&tensor("w", None));
    for _ in 0..40 {
        let mut attr = field_bytes(1, b"body");
        attr.extend(field_bytes(6, &g));
        g = field_bytes(1, &node_with_attribute(&attr));
    }
    assert!(run(&model(&g, &[])).is_err());
}
