//! Hand-built pickles for every technique the VM claims to catch, and real
//! pickles (written by CPython 3.11 / numpy 2.4, bytes pasted below) that it
//! must pass.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use super::*;
use crate::report::Severity;

mod real {
    //! Generated with CPython's pickle: TORCH_DATA_PKL mimics torch.save's
    //! data.pkl (OrderedDict state dict with `_metadata`, tensors rebuilt by
    //! torch._utils._rebuild_tensor_v2 from persistent-id storages).
    pub(super) const TORCH_DATA_PKL: &[u8] = b"\x80\x02ccollections\x0aOrderedDict\x0aq\x00)Rq\x01(X\x0c\x00\x00\x00layer.weightq\x02ctorch._utils\x0a_rebuild_tensor_v2\x0aq\x03((X\x07\x00\x00\x00storageq\x04ctorch\x0aFloatStorage\x0aq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x10tq\x08QK\x00K\x10\x85q\x09K\x01\x85q\x0a\x89h\x00)Rq\x0btq\x0cRq\x0dX\x0a\x00\x00\x00layer.biasq\x0eh\x03((h\x04h\x05X\x01\x00\x00\x001q\x0fh\x07K\x04tq\x10QK\x00K\x04\x85q\x11h\x0a\x89h\x00)Rq\x12tq\x13Rq\x14u}q\x15X\x09\x00\x00\x00_metadataq\x16h\x00)Rq\x17(X\x00\x00\x00\x00q\x18}q\x19X\x07\x00\x00\x00versionq\x1aK\x01sX\x05\x00\x00\x00layerq\x1b}q\x1ch\x1aK\x01susb.";
    pub(super) const NUMPY_P2: &[u8] = b"\x80\x02cnumpy._core.multiarray\x0a_reconstruct\x0aq\x00cnumpy\x0andarray\x0aq\x01K\x00\x85q\x02c_codecs\x0aencode\x0aq\x03X\x01\x00\x00\x00bq\x04X\x06\x00\x00\x00latin1q\x05\x86q\x06Rq\x07\x87q\x08Rq\x09(K\x01K\x02K\x03\x86q\x0acnumpy\x0adtype\x0aq\x0bX\x02\x00\x00\x00f4q\x0c\x89\x88\x87q\x0dRq\x0e(K\x03X\x01\x00\x00\x00<q\x0fNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x10b\x89h\x03X\x1b\x00\x00\x00\x00\x00\x00\x00\x00\x00\xc2\x80?\x00\x00\x00@\x00\x00@@\x00\x00\xc2\x80@\x00\x00\xc2\xa0@q\x11h\x05\x86q\x12Rq\x13tq\x14b.";
    pub(super) const NUMPY_P4: &[u8] = b"\x80\x04\x95\xcd\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01w\x94\x8c\x16numpy._core.multiarray\x94\x8c\x0c_reconstruct\x94\x93\x94\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94(K\x01K\x02K\x03\x86\x94h\x05\x8c\x05dtype\x94\x93\x94\x8c\x02f4\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b\x89C\x18\x00\x00\x00\x00\x00\x00\x80?\x00\x00\x00@\x00\x00@@\x00\x00\x80@\x00\x00\xa0@\x94t\x94b\x8c\x05names\x94]\x94(\x8c\x01a\x94\x8c\x01b\x94e\x8c\x03ids\x94\x8f\x94(K\x01K\x02\x90u.";
    pub(super) const NUMPY_P5: &[u8] = b"\x80\x05\x95\x8e\x00\x00\x00\x00\x00\x00\x00\x8c\x13numpy._core.numeric\x94\x8c\x0b_frombuffer\x94\x93\x94(\x96\x18\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80?\x00\x00\x00@\x00\x00@@\x00\x00\x80@\x00\x00\xa0@\x94\x8c\x05numpy\x94\x8c\x05dtype\x94\x93\x94\x8c\x02f4\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94bK\x02K\x03\x86\x94\x8c\x01C\x94t\x94R\x94.";
    pub(super) const ORDERED_DICT_P4: &[u8] = b"\x80\x04\x95S\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94(\x8c\x01a\x94G?\xf8\x00\x00\x00\x00\x00\x00\x8c\x01b\x94]\x94(K\x01K\x02K\x03\x8c\x01x\x94\x86\x94e\x8c\x01c\x94C\x02\x00\x01\x94\x8c\x01d\x94Nu.";
    pub(super) const PLAIN_P0: &[u8] = b"(dp0\x0aVlr\x0ap1\x0aF0.1\x0asVsteps\x0ap2\x0a(lp3\x0aI1\x0aaI2\x0aaI3\x0aasVname\x0ap4\x0aVrun's \"x\"\x0ap5\x0asVbig\x0ap6\x0aL1180591620717411303424L\x0as.";
    pub(super) const PLAIN_P1: &[u8] = b"}q\x00(X\x02\x00\x00\x00lrq\x01G?\xb9\x99\x99\x99\x99\x99\x9aX\x05\x00\x00\x00stepsq\x02]q\x03(K\x01K\x02K\x03eX\x01\x00\x00\x00sq\x04c__builtin__\x0afrozenset\x0aq\x05(]q\x06K\x01atq\x07Rq\x08u.";
}

fn rules(findings: &[Finding]) -> Vec<&str> {
    findings.iter().map(|f| f.rule.as_str()).collect()
}

fn worst(findings: &[Finding]) -> Option<Severity> {
    findings.iter().map(|f| f.severity).max()
}

#[track_caller]
fn assert_critical(data: &[u8], rule: &str) -> Vec<Finding> {
    let findings = scan(data, "");
    assert!(
        findings
            .iter()
            .any(|f| f.rule == rule && f.severity == Severity::Critical),
        "expected critical {rule}, got {findings:#?}"
    );
    findings
}

#[track_caller]
fn assert_clean(data: &[u8]) {
    let findings = scan(data, "");
    assert!(findings.is_empty(), "expected no findings, got {findings:#?}");
}

#[test]
fn real_benign_pickles_pass() {
    for data in [
        real::TORCH_DATA_PKL,
        real::NUMPY_P2,
        real::NUMPY_P4,
        real::NUMPY_P5,
        real::ORDERED_DICT_P4,
        real::PLAIN_P0,
        real::PLAIN_P1,
    ] {
        assert_clean(data);
    }
}

#[test]
fn torch_data_pkl_counts_persistent_ids() {
    let mut sink = Sink::new();
    let walk = vm::walk(real::TORCH_DATA_PKL, "", Options::default(), &mut sink);
    assert_eq!(walk.pickles, 1);
    assert!(walk.complete);
    assert_eq!(walk.persistent_ids, 2);
    assert_eq!(walk.end, real::TORCH_DATA_PKL.len());
}

#[test]
fn os_system_via_global_protocol_0() {
    let f = assert_critical(b"cos\nsystem\n(S'id'\ntR.", rule::IMPORT_CRITICAL);
    assert!(f[0].message.contains("'os.system'"), "{}", f[0].message);
    assert_eq!(f[0].location, "opcode 1 (GLOBAL) at offset 0");
    assert!(rules(&f).contains(&rule::CALL_UNSAFE));
}

#[test]
fn posix_and_nt_and_py2_builtin_names() {
    assert_critical(b"cposix\nsystem\n(S'id'\ntR.", rule::IMPORT_CRITICAL);
    assert_critical(b"cnt\nsystem\n(S'id'\ntR.", rule::IMPORT_CRITICAL);
    assert_critical(b"c__builtin__\neval\n(S'1'\ntR.", rule::IMPORT_CRITICAL);
}

#[test]
fn stack_global_with_operands_from_memo() {
    // 'os' and 'system' are memoised, popped, and fetched back with BINGET.
    let data = b"\x80\x04\x8c\x02os\x940\x8c\x06system\x940h\x00h\x01\x93\x8c\x02id\x85R.";
    let f = assert_critical(data, rule::IMPORT_CRITICAL);
    assert!(f[0].location.contains("STACK_GLOBAL"), "{}", f[0].location);
}

#[test]
fn stack_global_with_binstring_and_binunicode8_operands() {
    assert_critical(b"\x80\x04U\x02osU\x06system\x93.", rule::IMPORT_CRITICAL);
    assert_critical(
        b"\x80\x04T\x0a\x00\x00\x00subprocess\x8d\x05\x00\x00\x00\x00\x00\x00\x00Popen\x93.",
        rule::IMPORT_CRITICAL,
    );
    // Protocol 0 UNICODE with a \u escape spelling "os".
    assert_critical(b"\x80\x04V\\u006fs\nVsystem\n\x93.", rule::IMPORT_CRITICAL);
    // STRING with an escape: 'o\x73' is "os".
    assert_critical(b"S'o\\x73'\nS'system'\n\x93.", rule::IMPORT_CRITICAL);
}

#[test]
fn stack_global_with_computed_operand_is_dynamic() {
    let f = assert_critical(b"\x80\x04\x8c\x02os)\x93.", rule::IMPORT_DYNAMIC);
    assert!(f[0].message.contains("a tuple"), "{}", f[0].message);
    // A name that is the result of a call.
    assert_critical(
        b"\x80\x04\x8c\x02osccollections\nOrderedDict\n)R\x93.",
        rule::IMPORT_DYNAMIC,
    );
}

#[test]
fn inst_obj_newobj_newobj_ex() {
    assert_critical(b"(S'id'\nios\nsystem\n.", rule::IMPORT_CRITICAL);
    let f = assert_critical(b"(cos\nsystem\nS'id'\no.", rule::CALL_UNSAFE);
    assert!(rules(&f).contains(&rule::IMPORT_CRITICAL));
    assert_critical(b"\x80\x02csubprocess\nPopen\n)\x81.", rule::CALL_UNSAFE);
    assert_critical(
        b"\x80\x04\x8c\x0asubprocess\x8c\x05Popen\x93)}\x92.",
        rule::CALL_UNSAFE,
    );
}

#[test]
fn build_on_a_non_allowlisted_object_is_setstate() {
    let f = scan(b"\x80\x02cmymodule\nThing\n)\x81}b.", "");
    let r = rules(&f);
    assert!(r.contains(&rule::IMPORT_UNSAFE), "{f:#?}");
    assert!(
        f.iter()
            .any(|x| x.rule == rule::CALL_UNSAFE && x.location.contains("BUILD")),
        "{f:#?}"
    );
    // Not known to be code execution: high, not critical.
    assert_eq!(worst(&f), Some(Severity::High));
    // BUILD on a class object itself (monkey-patching) is critical.
    assert_critical(b"\x80\x02ccollections\nOrderedDict\n}b.", rule::CALL_UNSAFE);
}

#[test]
fn ext_codes_cannot_be_resolved() {
    assert_critical(b"\x80\x02\x82\x01)R.", rule::EXT);
    assert_critical(b"\x80\x02\x83\x01\x02)R.", rule::EXT);
    assert_critical(b"\x80\x02\x84\x01\x02\x03\x04)R.", rule::EXT);
}

#[test]
fn dotted_names_are_judged_by_their_full_path() {
    let f = assert_critical(
        b"\x80\x04\x8c\x07pathlib\x8c\x09os.system\x93\x8c\x02id\x85R.",
        rule::IMPORT_CRITICAL,
    );
    assert!(f[0].message.contains("pathlib.os.system"), "{}", f[0].message);
    // An allowlisted class, walked to its globals.
    assert_critical(
        b"\x80\x04\x8c\x0bcollections\x8c\x20OrderedDict.__init__.__globals__\x93.",
        rule::IMPORT_CRITICAL,
    );
    // A harmless-looking module reaching `sys` as an attribute.
    assert_critical(b"cmylib.helpers\nsys.modules\n.", rule::IMPORT_CRITICAL);
}

#[test]
fn getattr_chains_are_critical_calls_of_computed_values() {
    let f = assert_critical(
        b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR(tR.",
        rule::CALL_UNSAFE,
    );
    assert!(rules(&f).contains(&rule::IMPORT_CRITICAL));
    assert!(
        f.iter().any(|x| x.message.contains("computed while loading")),
        "{f:#?}"
    );
}

#[test]
fn known_bypasses_of_deny_lists() {
    // CVE-2025-1716: pip.main installs and runs a package.
    assert_critical(b"cpip\nmain\n((S'install'\nS'evil'\nltR.", rule::IMPORT_CRITICAL);
    // pkgutil.resolve_name reaches any global by name.
    assert_critical(
        b"cpkgutil\nresolve_name\n(S'os:system'\ntR(S'id'\ntR.",
        rule::IMPORT_CRITICAL,
    );
    assert_critical(b"crunpy\n_run_code\n(S'import os'\n}tR.", rule::IMPORT_CRITICAL);
    assert_critical(
        b"coperator\nmethodcaller\n(S'system'\nS'id'\ntR.",
        rule::IMPORT_CRITICAL,
    );
    assert_critical(
        b"cfunctools\npartial\n(cos\nsystem\nS'id'\ntR.",
        rule::IMPORT_CRITICAL,
    );
    assert_critical(b"ctorch._C\n_jit_pass\n.", rule::IMPORT_CRITICAL);
    assert_critical(b"ctorch.hub\nload\n.", rule::IMPORT_CRITICAL);
    assert_critical(b"cimportlib\nimport_module\n(S'os'\ntR.", rule::IMPORT_CRITICAL);
    assert_critical(b"cctypes\nCDLL\n.", rule::IMPORT_CRITICAL);
    assert_critical(b"cwebbrowser\nopen\n.", rule::IMPORT_CRITICAL);
}

#[test]
fn unknown_classes_are_high_not_critical() {
    let f = scan(b"\x80\x02csklearn.linear_model\nLogisticRegression\n)\x81.", "");
    assert!(rules(&f).contains(&rule::IMPORT_UNSAFE), "{f:#?}");
    assert_eq!(worst(&f), Some(Severity::High));
}

#[test]
fn nullifai_payload_before_a_broken_stream_is_still_critical() {
    let f = assert_critical(
        b"\x80\x02cos\nsystem\n(S'id'\ntR\xff\xff\x00garbage",
        rule::IMPORT_CRITICAL,
    );
    let bad = f.iter().find(|x| x.rule == rule::MALFORMED).unwrap();
    assert_eq!(bad.severity, Severity::High);
    assert!(bad.location.contains("offset 22"), "{}", bad.location);
}

#[test]
fn second_pickle_in_the_stream_is_scanned() {
    let mut data = b"\x80\x02}q\x00.".to_vec();
    data.extend_from_slice(b"cos\nsystem\n(S'id'\ntR.");
    let f = assert_critical(&data, rule::IMPORT_CRITICAL);
    assert!(f[0].location.contains("offset 6"), "{}", f[0].location);
}

#[test]
fn truncation_and_malformed_streams_fail_closed() {
    for data in [
        &b"\x80\x02h\x05."[..],                            // memo read before written
        b"\x80\x04\x95\xff\xff\x00\x00\x00\x00\x00\x00}.", // FRAME beyond the input
        b"\x80\x04X\xff\xff\xff\xff\x00",                  // string longer than input
        b"\x80\x02}",                                      // no STOP
        b"\x80\x09}.",                                     // protocol 9
        b"\x80\x02R.",                                     // stack underflow
        b"\x80\x02}\xfe.",                                 // unknown opcode
        b"\x80\x02e.",                                     // APPENDS without MARK
        b"",                                               // empty
        b"\x80\x02}.\x00",                                 // trailing garbage
    ] {
        let f = scan(data, "");
        assert!(rules(&f).contains(&rule::MALFORMED), "{data:?}: {f:#?}");
    }
}

#[test]
fn limits_give_findings_not_exhaustion() {
    // 200k nested MARKs.
    let deep = vec![b'('; 200_000];
    assert!(rules(&scan(&deep, "")).contains(&rule::LIMIT));
    // A LONG4 of 1 MiB.
    let mut long = b"\x80\x02\x8b\x00\x00\x10\x00".to_vec();
    long.resize(long.len() + (1 << 20), 1);
    long.push(b'.');
    assert!(rules(&scan(&long, "")).contains(&rule::LIMIT));
    // A stack of 2M values.
    let mut wide = b"\x80\x02".to_vec();
    wide.extend(std::iter::repeat_n(b'N', 2_000_000));
    assert!(rules(&scan(&wide, "")).contains(&rule::LIMIT));
}

#[test]
fn expansion_bombs_cost_nothing() {
    // A list appended to itself a million times through the memo: Python
    // shares references, and so do we; a materialising scanner would explode.
    let mut data = b"\x80\x02]q\x00".to_vec();
    for _ in 0..1000 {
        data.push(b'(');
        data.extend(std::iter::repeat_n(*b"h\x00", 1000).flatten());
        data.push(b'e');
    }
    data.push(b'.');
    let start = std::time::Instant::now();
    assert_clean(&data);
    assert!(start.elapsed().as_secs() < 5);
}

#[test]
fn copyreg_reconstructor_needs_allowlisted_arguments() {
    // copyreg._reconstructor(OrderedDict, object, None): allowed.
    assert_clean(b"ccopy_reg\n_reconstructor\n(ccollections\nOrderedDict\nc__builtin__\nobject\nNtR.");
    // A computed class: critical.
    assert_critical(
        b"ccopyreg\n_reconstructor\n(ccollections\nOrderedDict\n)Rcbuiltins\nobject\nNtR.",
        rule::CALL_UNSAFE,
    );
}

#[test]
fn container_methods_on_foreign_objects_are_calls() {
    // APPEND on an object of a non-allowlisted class calls its append().
    let f = scan(b"\x80\x02cmymodule\nBag\n)\x81K\x01a.", "");
    assert!(
        f.iter()
            .any(|x| x.rule == rule::CALL_UNSAFE && x.message.contains("append")),
        "{f:#?}"
    );
    // SETITEMS on an OrderedDict (allowlisted) is fine.
    assert_clean(b"\x80\x02ccollections\nOrderedDict\n)R(K\x01K\x02u.");
}

#[test]
fn each_import_is_reported_once_and_rules_are_capped() {
    let f = scan(b"\x80\x02cos\nsystem\n0cos\nsystem\n0cos\nsystem\n.", "");
    assert_eq!(
        rules(&f).iter().filter(|r| **r == rule::IMPORT_CRITICAL).count(),
        1
    );
    let mut data = b"\x80\x02".to_vec();
    for i in 0..100 {
        data.extend_from_slice(format!("cmod{i}\nName\n0").as_bytes());
    }
    data.extend_from_slice(b"N.");
    let f = scan(&data, "");
    assert_eq!(f.len(), MAX_PER_RULE + 1, "{f:#?}");
    assert!(f.last().unwrap().message.starts_with("80 more findings"));
}

#[test]
fn member_names_appear_in_locations() {
    let f = scan(b"cos\nsystem\n.", "archive/data.pkl");
    assert_eq!(
        f[0].location,
        "member 'archive/data.pkl', opcode 1 (GLOBAL) at offset 0"
    );
}

#[test]
fn stacked_pickles_stop_at_max_pickles() {
    let mut data = b"\x80\x02K\x01.\x80\x02K\x02.".to_vec();
    data.extend_from_slice(b"\xff\xfe raw storage bytes");
    let mut sink = Sink::new();
    let walk = vm::walk(
        &data,
        "",
        Options {
            max_pickles: Some(2),
            joblib: false,
        },
        &mut sink,
    );
    assert!(walk.complete);
    assert_eq!(walk.end, 10);
    assert!(sink.finish().is_empty());
}

#[test]
fn descr_itemsizes() {
    use vm::{DtypeSize, descr_itemsize};
    assert_eq!(descr_itemsize("<f4"), Some(DtypeSize::Bytes(4)));
    assert_eq!(descr_itemsize("|b1"), Some(DtypeSize::Bytes(1)));
    assert_eq!(descr_itemsize("<U3"), Some(DtypeSize::Bytes(12)));
    assert_eq!(descr_itemsize("|O"), Some(DtypeSize::Object));
    assert_eq!(descr_itemsize("f8"), Some(DtypeSize::Bytes(8)));
    assert_eq!(descr_itemsize("{weird}"), None);
}

#[test]
fn policy_allowlist_is_exact() {
    use policy::{Class, classify};
    assert_eq!(classify("torch._utils", "_rebuild_tensor_v2"), Class::Allowed);
    assert_eq!(classify("torch", "_utils._rebuild_tensor_v2"), Class::Allowed);
    assert_eq!(classify("__builtin__", "set"), Class::Allowed);
    assert_eq!(classify("builtins", "getattr"), Class::Critical);
    assert_eq!(classify("torch", "FloatStorage.__new__"), Class::Critical);
    assert_eq!(classify("numpy", "load"), Class::Critical);
    assert_eq!(classify("mypkg", "Model"), Class::Unsafe);
    assert_eq!(classify("__main__", "Net"), Class::Unsafe);
}
