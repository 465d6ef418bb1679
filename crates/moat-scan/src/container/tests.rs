//! Container tests: archives built here byte by byte (so every differential
//! can be forged), plus real numpy and joblib files written by numpy 2.4 and
//! joblib 1.6 (`testdata/`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::Write;

use super::*;
use crate::report::{FileReport, Verdict};
use crate::{pickle, scan_file};

const EVIL: &[u8] = b"\x80\x02cos\nsystem\n(S'id'\ntR.";
const BENIGN: &[u8] = b"\x80\x02ccollections\nOrderedDict\n)R.";

fn scan_bytes(name: &str, data: &[u8]) -> FileReport {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, data).unwrap();
    scan_file(&path, name)
}

fn rules(r: &FileReport) -> Vec<&str> {
    r.findings.iter().map(|f| f.rule.as_str()).collect()
}

#[track_caller]
fn assert_clean(r: &FileReport) {
    assert_eq!(r.verdict, Verdict::Clean, "{:#?}", r.findings);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
}

#[track_caller]
fn assert_rule(r: &FileReport, rule: &str) {
    assert_eq!(r.verdict, Verdict::Unsafe, "{:#?}", r.findings);
    assert!(rules(r).contains(&rule), "expected {rule}: {:#?}", r.findings);
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One member for [`build_zip`].
#[derive(Clone)]
struct M {
    name: &'static str,
    local_name: Option<&'static str>,
    data: Vec<u8>,
    deflate: bool,
    flags: u16,
    attrs: u32,
}

fn m(name: &'static str, data: &[u8]) -> M {
    M {
        name,
        local_name: None,
        data: data.to_vec(),
        deflate: false,
        flags: 0,
        attrs: 0,
    }
}

/// A zip as zipfile/torch write it, with knobs for forging differentials.
fn build_zip(members: &[M], prepend: &[u8], append: &[u8]) -> Vec<u8> {
    let mut out = prepend.to_vec();
    let mut central = Vec::new();
    for mem in members {
        let offset = (out.len() - prepend.len()) as u32;
        let body = if mem.deflate {
            deflate(&mem.data)
        } else {
            mem.data.clone()
        };
        let method: u16 = if mem.deflate { 8 } else { 0 };
        let local_name = mem.local_name.unwrap_or(mem.name);
        out.extend_from_slice(b"PK\x03\x04\x14\x00");
        out.extend_from_slice(&mem.flags.to_le_bytes());
        out.extend_from_slice(&method.to_le_bytes());
        out.extend_from_slice(&[0; 8]); // time, date, crc
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&(mem.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(local_name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(local_name.as_bytes());
        out.extend_from_slice(&body);
        central.extend_from_slice(b"PK\x01\x02\x14\x03\x14\x00");
        central.extend_from_slice(&mem.flags.to_le_bytes());
        central.extend_from_slice(&method.to_le_bytes());
        central.extend_from_slice(&[0; 8]);
        central.extend_from_slice(&(body.len() as u32).to_le_bytes());
        central.extend_from_slice(&(mem.data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(mem.name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attrs
        central.extend_from_slice(&mem.attrs.to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(mem.name.as_bytes());
    }
    let cd_offset = (out.len() - prepend.len()) as u32;
    let n = members.len() as u16;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(append);
    out
}

fn torch_zip(data_pkl: &[u8]) -> Vec<u8> {
    // The storage holds bytes that look like a malicious pickle: torch never
    // unpickles storages, so neither may the scanner (nor even read them).
    build_zip(
        &[
            m("archive/data.pkl", data_pkl),
            m("archive/byteorder", b"little"),
            m("archive/data/0", EVIL),
            m("archive/data/1", &[0xff; 64]),
            m("archive/version", b"3\n"),
            m("archive/.data/serialization_id", b"1234567890\n"),
        ],
        b"",
        b"",
    )
}

#[test]
fn benign_torch_zip_is_clean_and_storages_are_not_read() {
    assert_clean(&scan_bytes("pytorch_model.bin", &torch_zip(pickle_fixture())));
}

fn pickle_fixture() -> &'static [u8] {
    // A torch-style data.pkl: OrderedDict of _rebuild_tensor_v2 with
    // persistent-id storages (same bytes as pickle::tests::real).
    b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00wq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x04tq\x08QK\x00K\x04\x85q\x09K\x01\x85q\x0a\x89h\x00)Rq\x0btq\x0cRq\x0du."
}

#[test]
fn malicious_data_pkl_in_a_torch_zip() {
    let r = scan_bytes("model.pt", &torch_zip(EVIL));
    assert_rule(&r, pickle::rule::IMPORT_CRITICAL);
    assert!(
        r.findings[0]
            .location
            .starts_with("member 'archive/data.pkl', opcode"),
        "{:#?}",
        r.findings
    );
    // Deflated member, any name: found by content.
    let mut evil = m("x/whatever.bin", EVIL);
    evil.deflate = true;
    assert_rule(
        &scan_bytes("a.zip", &build_zip(&[evil], b"", b"")),
        pickle::rule::IMPORT_CRITICAL,
    );
}

#[test]
fn zip_differentials() {
    let mut renamed = m("archive/data.pkl", BENIGN);
    renamed.local_name = Some("archive/data.pkX");
    assert_rule(
        &scan_bytes("a.zip", &build_zip(&[renamed], b"", b"")),
        rule::DIFFERENTIAL,
    );
    // Prepended (polyglot) and trailing data.
    // A file that does not start like a zip is not one by content (and is
    // refused as unknown binary); zipfile would still open it from the end.
    let polyglot = build_zip(&[m("a.pkl", BENIGN)], b"junk", b"");
    assert_eq!(scan_bytes("a.zip", &polyglot).verdict, Verdict::Unsafe);
    let mut ctx = Ctx::new();
    zip::scan(&Mem(&polyglot), "", 0, &mut ctx).unwrap();
    assert!(ctx.sink.finish().iter().any(|f| f.rule == rule::DIFFERENTIAL));
    assert_rule(
        &scan_bytes("a.zip", &build_zip(&[m("a.pkl", BENIGN)], b"", EVIL)),
        rule::DIFFERENTIAL,
    );
    // Duplicate names.
    let dup = build_zip(&[m("a.pkl", BENIGN), m("a.pkl", BENIGN)], b"", b"");
    assert_rule(&scan_bytes("a.zip", &dup), rule::DIFFERENTIAL);
    // Encrypted member.
    let mut enc = m("a.pkl", BENIGN);
    enc.flags = 1;
    assert_rule(
        &scan_bytes("a.zip", &build_zip(&[enc], b"", b"")),
        rule::ENCRYPTED,
    );
}

#[test]
fn zip_member_past_the_end_and_overlaps() {
    let mut z = build_zip(&[m("a.pkl", BENIGN)], b"", b"");
    // Central directory: compressed size field at 46 - 26 = offset 20 of the entry.
    let cd = z.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    z[cd + 20..cd + 24].copy_from_slice(&9999u32.to_le_bytes());
    assert_rule(&scan_bytes("a.zip", &z), rule::MALFORMED);
    // Two central entries pointing at the same local header.
    let mut z = build_zip(&[m("a.pkl", BENIGN), m("b.pkl", BENIGN)], b"", b"");
    let cds: Vec<usize> = z
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"PK\x01\x02")
        .map(|(i, _)| i)
        .collect();
    z[cds[1] + 42..cds[1] + 46].copy_from_slice(&0u32.to_le_bytes());
    let r = scan_bytes("a.zip", &z);
    assert_rule(&r, rule::DIFFERENTIAL);
}

#[test]
fn zip_slip_and_symlinks() {
    for name in ["../../etc/cron.d/x", "/etc/passwd", "a\\..\\b", "C:evil"] {
        let r = scan_bytes("a.zip", &build_zip(&[m(name, b"hello")], b"", b""));
        assert_rule(&r, rule::PATH);
    }
    let mut link = m("weights", b"/etc/shadow");
    link.attrs = 0o120777 << 16;
    assert_rule(&scan_bytes("a.zip", &build_zip(&[link], b"", b"")), rule::LINK);
}

#[test]
fn decompression_bombs_are_stopped() {
    let zeros = vec![0u8; 100 << 20];
    let mut bomb = m("a.bin", &zeros);
    bomb.deflate = true;
    let z = build_zip(&[bomb], b"", b"");
    assert!(z.len() < 1 << 20);
    assert_rule(&scan_bytes("a.zip", &z), rule::BOMB);
    assert_rule(&scan_bytes("a.gz", &gzip(&zeros)), rule::BOMB);
}

#[test]
fn nested_archives_are_followed_to_a_depth_limit() {
    // gzip(zip(zip(evil))): found.
    let inner = build_zip(&[m("data.pkl", EVIL)], b"", b"");
    let outer = build_zip(&[m("inner.zip", &inner)], b"", b"");
    let r = scan_bytes("x.gz", &gzip(&outer));
    assert_rule(&r, pickle::rule::IMPORT_CRITICAL);
    assert!(
        r.findings[0].location.contains("inner.zip!data.pkl"),
        "{:#?}",
        r.findings
    );
    // Six levels: the depth limit fires.
    let mut z = build_zip(&[m("data.pkl", BENIGN)], b"", b"");
    for _ in 0..5 {
        z = build_zip(&[m("n.zip", &z)], b"", b"");
    }
    assert_rule(&scan_bytes("deep.zip", &z), rule::DEPTH);
}

#[test]
fn gzip_and_zlib_pickles() {
    assert_rule(&scan_bytes("x.gz", &gzip(EVIL)), pickle::rule::IMPORT_CRITICAL);
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(3));
    e.write_all(EVIL).unwrap();
    let z = e.finish().unwrap();
    let r = scan_bytes("x.joblib", &z);
    assert_eq!(r.format, Format::Zlib);
    assert_rule(&r, pickle::rule::IMPORT_CRITICAL);
}

#[test]
fn real_numpy_files() {
    assert_clean(&scan_bytes("arr.npy", include_bytes!("testdata/arr.npy")));
    assert_clean(&scan_bytes("rec.npy", include_bytes!("testdata/rec.npy")));
    assert_clean(&scan_bytes("arrs.npz", include_bytes!("testdata/arrs.npz")));
    assert_clean(&scan_bytes("arrs_c.npz", include_bytes!("testdata/arrs_c.npz")));
    // An object array of a str and a dict: a clean pickle after the header.
    assert_clean(&scan_bytes("obj.npy", include_bytes!("testdata/obj.npy")));
}

fn npy(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_owned();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn numpy_object_arrays_length_and_header() {
    let evil = npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", EVIL);
    assert_rule(&scan_bytes("w.npy", &evil), pickle::rule::IMPORT_CRITICAL);
    let short = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
        &[0; 12],
    );
    assert_rule(&scan_bytes("w.npy", &short), rule::NUMPY_LENGTH);
    let mut hidden = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
        &[0; 4],
    );
    hidden.extend_from_slice(EVIL);
    assert_rule(&scan_bytes("w.npy", &hidden), rule::NUMPY_LENGTH);
    for bad in [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1, }",
        "{'descr': '<f4', 'fortran_order': False, }",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } + 1",
        "__import__('os')",
    ] {
        assert_rule(&scan_bytes("w.npy", &npy(bad, &[0; 4])), rule::NUMPY_HEADER);
    }
    // Inside an npz, by content.
    let z = build_zip(&[m("a.npy", &evil)], b"", b"");
    assert_rule(&scan_bytes("w.npz", &z), pickle::rule::IMPORT_CRITICAL);
}

fn legacy(main: &[u8], raw: &[u8]) -> Vec<u8> {
    let mut out = torch::LEGACY_MAGIC.to_vec();
    out.extend_from_slice(b"\x80\x02M\xe9\x03.");
    out.extend_from_slice(b"\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq\x01M\xe9\x03u.");
    out.extend_from_slice(main);
    out.extend_from_slice(b"\x80\x02]q\x00X\x01\x00\x00\x000q\x01a.");
    out.extend_from_slice(raw);
    out
}

#[test]
fn legacy_torch_files() {
    // Raw storage bytes (numel, then data) follow the five pickles; they are
    // not opcodes and must not be parsed as such.
    let mut raw = 4u64.to_le_bytes().to_vec();
    raw.extend_from_slice(&[0xfe; 16]);
    let r = scan_bytes("old.bin", &legacy(pickle_fixture(), &raw));
    assert_eq!(r.format, Format::TorchLegacy);
    assert_clean(&r);
    assert_rule(
        &scan_bytes("old.bin", &legacy(EVIL, &raw)),
        pickle::rule::IMPORT_CRITICAL,
    );
    // Stopping after the magic: fail closed.
    assert_rule(&scan_bytes("old.bin", torch::LEGACY_MAGIC), rule::MALFORMED);
}

#[test]
fn real_joblib_files() {
    for (name, data) in [
        ("model.joblib", &include_bytes!("testdata/model.joblib")[..]),
        ("model.joblib.z", include_bytes!("testdata/model.joblib.z")),
        ("model.joblib.gz", include_bytes!("testdata/model.joblib.gz")),
    ] {
        assert_clean(&scan_bytes(name, data));
    }
}

#[test]
fn joblib_with_a_payload_after_the_arrays() {
    // The real dump minus its final STOP, then a malicious pickle tail.
    let real = include_bytes!("testdata/model.joblib");
    let mut evil = real[..real.len() - 1].to_vec();
    evil.extend_from_slice(b"cos\nsystem\n(S'id'\ntR.");
    assert_rule(&scan_bytes("m.joblib", &evil), pickle::rule::IMPORT_CRITICAL);
}

/// A ustar header block for [`tar`].
fn tar_entry(name: &str, typeflag: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn tar(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0; 1024]);
    out
}

#[test]
fn tar_archives() {
    let clean = tar(&[
        tar_entry("model/config.json", b'0', "", b"{}"),
        tar_entry("model/p.pkl", b'0', "", BENIGN),
    ]);
    let r = scan_bytes("m.tar", &clean);
    assert_eq!(r.format, Format::Tar);
    assert_clean(&r);
    assert_rule(
        &scan_bytes("m.tar", &tar(&[tar_entry("p.pkl", b'0', "", EVIL)])),
        pickle::rule::IMPORT_CRITICAL,
    );
    assert_rule(
        &scan_bytes("m.tar", &tar(&[tar_entry("../x", b'0', "", b"hi")])),
        rule::PATH,
    );
    assert_rule(
        &scan_bytes("m.tar", &tar(&[tar_entry("l", b'2', "/etc/passwd", b"")])),
        rule::LINK,
    );
    assert_rule(
        &scan_bytes("m.tar", &tar(&[tar_entry("l", b'1', "../../x", b"")])),
        rule::LINK,
    );
    // A config.json inside a tar is held to the HF rules.
    let auto = tar(&[tar_entry(
        "config.json",
        b'0',
        "",
        br#"{"auto_map": {"AutoModel": "m.Model"}}"#,
    )]);
    assert_rule(&scan_bytes("m.tar", &auto), crate::hf::rule::REMOTE_CODE);
    // A corrupted checksum.
    let mut bad = tar(&[tar_entry("p.pkl", b'0', "", BENIGN)]);
    bad[0] = b'q';
    assert_ne!(scan_bytes("m.tar", &bad).verdict, Verdict::Clean);
    // The pre-1.0 torch tar layout is refused (not analysed).
    let old = tar(&[
        tar_entry("pickle", b'0', "", BENIGN),
        tar_entry("storages", b'0', "", b"\x80\x02K\x00."),
    ]);
    assert_rule(&scan_bytes("old.tar", &old), crate::rule::FORMAT_NOT_ALLOWED);
}

#[test]
fn seven_zip_is_refused() {
    let r = scan_bytes("m.7z", b"7z\xbc\xaf\x27\x1c\x00\x04rest");
    assert_eq!(r.format, Format::SevenZip);
    assert_rule(&r, rule::SEVEN_ZIP);
}

#[test]
fn keras_zip_config_goes_through_the_keras_rules() {
    let dense = br#"{"module": "keras", "class_name": "Sequential", "config": {"layers": [
        {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2}}]}}"#;
    let lambda = br#"{"module": "keras", "class_name": "Sequential", "config": {"layers": [
        {"module": "keras.layers", "class_name": "Lambda", "config": {"function": "x"}}]}}"#;
    let keras = |config: &[u8]| {
        build_zip(
            &[
                m("metadata.json", br#"{"keras_version": "3.0"}"#),
                m("config.json", config),
            ],
            b"",
            b"",
        )
    };
    assert_clean(&scan_bytes("m.keras", &keras(dense)));
    let r = scan_bytes("m.keras", &keras(lambda));
    assert_rule(&r, "keras.lambda");
    assert!(r.findings[0].location.contains("config.json"), "{:?}", r.findings);
}

#[test]
fn safetensors_inside_an_archive_is_checked() {
    let good = b"\x02\x00\x00\x00\x00\x00\x00\x00{}";
    let bad = b"\x0a\x00\x00\x00\x00\x00\x00\x00{\"a\":1}   ";
    assert_clean(&scan_bytes(
        "a.zip",
        &build_zip(&[m("m.safetensors", good)], b"", b""),
    ));
    let r = scan_bytes("a.zip", &build_zip(&[m("m.safetensors", bad)], b"", b""));
    assert_eq!(r.verdict, Verdict::Unsafe, "{:#?}", r.findings);
}

#[test]
fn analyse_bytes_entry_point() {
    let mut out = Vec::new();
    analyse_bytes("x/data.pkl", EVIL, 0, &mut out);
    assert!(out.iter().any(|f| f.rule == pickle::rule::IMPORT_CRITICAL));
}

#[test]
fn a_2_gib_torch_zip_is_scanned_from_its_directory_only() {
    use std::io::{Seek, SeekFrom};
    // Written sparse: a data.pkl, then a 2 GiB - 1 storage whose bytes are
    // never written (nor read by the scanner), then the directory.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.pt");
    let small = build_zip(&[m("archive/data.pkl", pickle_fixture())], b"", b"");
    let cd_at = small.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    let storage_len: u32 = u32::MAX >> 1;
    let storage_off = cd_at as u32;
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&small[..cd_at]).unwrap();
    let name = b"archive/data/0";
    let mut local = b"PK\x03\x04\x14\x00\x00\x00\x00\x00".to_vec();
    local.extend_from_slice(&[0; 8]);
    local.extend_from_slice(&storage_len.to_le_bytes());
    local.extend_from_slice(&storage_len.to_le_bytes());
    local.extend_from_slice(&(name.len() as u16).to_le_bytes());
    local.extend_from_slice(&[0, 0]);
    local.extend_from_slice(name);
    f.write_all(&local).unwrap();
    let cd_offset = f.seek(SeekFrom::Current(i64::from(storage_len))).unwrap();
    let mut central = small[cd_at..].to_vec();
    let eocd = central.windows(4).position(|w| w == b"PK\x05\x06").unwrap();
    central.truncate(eocd);
    central.extend_from_slice(b"PK\x01\x02\x14\x03\x14\x00\x00\x00\x00\x00");
    central.extend_from_slice(&[0; 8]);
    central.extend_from_slice(&storage_len.to_le_bytes());
    central.extend_from_slice(&storage_len.to_le_bytes());
    central.extend_from_slice(&(name.len() as u16).to_le_bytes());
    central.extend_from_slice(&[0; 12]);
    central.extend_from_slice(&storage_off.to_le_bytes());
    central.extend_from_slice(name);
    let mut tail = central.clone();
    tail.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00\x02\x00\x02\x00");
    tail.extend_from_slice(&(central.len() as u32).to_le_bytes());
    tail.extend_from_slice(&(cd_offset as u32).to_le_bytes());
    tail.extend_from_slice(&[0, 0]);
    f.write_all(&tail).unwrap();
    drop(f);
    let start = std::time::Instant::now();
    let r = scan_file(&path, "big.pt");
    let took = start.elapsed();
    assert_clean(&r);
    assert!(took.as_millis() < 500, "took {took:?}");
}
