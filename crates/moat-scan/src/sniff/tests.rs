//! Tests for content sniffing: magic numbers, JSON versus text, ASCII
//! pickles that must not pass as text, and the streaming text check.

use std::io::Cursor;

use super::*;

#[test]
fn binary_magics() {
    assert_eq!(sniff_bytes(b"\x80\x02}q\x00."), Format::Pickle);
    assert_eq!(sniff_bytes(b"\x80\x05\x95\x10\x00"), Format::Pickle);
    assert_eq!(sniff_bytes(b"PK\x03\x04rest"), Format::Zip);
    assert_eq!(sniff_bytes(b"PK\x05\x06\0\0\0\0"), Format::Zip);
    assert_eq!(sniff_bytes(b"\x1f\x8b\x08\x00"), Format::Gzip);
    assert_eq!(sniff_bytes(b"GGUF\x03\0\0\0"), Format::Gguf);
    assert_eq!(sniff_bytes(b"\x93NUMPY\x01\x00v\x00"), Format::Numpy);
}

#[test]
fn safetensors_shape_is_recognised() {
    let file = crate::safetensors::tests::valid_file();
    assert_eq!(sniff_bytes(&file), Format::Safetensors);
    // Even when the declared length is wrong: it is validated, not ignored.
    let mut bad = 5_000_000u64.to_le_bytes().to_vec();
    bad.extend_from_slice(b"{}");
    assert_eq!(sniff_bytes(&bad), Format::Safetensors);
    // A header length whose first byte is 0x80 is not a pickle.
    let mut tricky = 0x0280u64.to_le_bytes().to_vec();
    tricky.push(b'{');
    assert_eq!(sniff_bytes(&tricky), Format::Safetensors);
}

#[test]
fn json_whose_ninth_byte_is_a_brace_stays_json() {
    let data = br#"{"cfg": {"a": 1}}"#;
    assert_eq!(data[8], b'{');
    assert_eq!(sniff_bytes(data), Format::Json);
}

#[test]
fn json_text_and_unknown() {
    assert_eq!(sniff_bytes(b"  {\"a\": [1, 2]}\n"), Format::Json);
    assert_eq!(sniff_bytes(b"[1, 2, 3]"), Format::Json);
    assert_eq!(sniff_bytes(b"{\"a\": "), Format::Text);
    assert_eq!(
        sniff_bytes("# Model card\n\nUnicode ok: é ü 日本".as_bytes()),
        Format::Text
    );
    assert_eq!(sniff_bytes(b""), Format::Text);
    assert_eq!(sniff_bytes(b"hello\0world"), Format::Unknown);
    assert_eq!(sniff_bytes(b"\xff\xfe\x00\x01"), Format::Unknown);
    assert_eq!(sniff_bytes(b"\x89HDF\r\n\x1a\n"), Format::Hdf5);
}

#[test]
fn hdf5_user_block_and_onnx_candidates() {
    let mut user_block = vec![0u8; 512];
    user_block.extend_from_slice(b"\x89HDF\r\n\x1a\n");
    assert_eq!(sniff_bytes(&user_block), Format::Hdf5);
    // ir_version 8, then producer_name: an ONNX candidate (the scan decides).
    assert_eq!(sniff_bytes(b"\x08\x08\x12\x07pytorch"), Format::Onnx);
    assert_eq!(sniff_bytes(b"\x08\x08hello"), Format::Text);
}

#[test]
fn ascii_pickles_are_not_text() {
    let cases: [&[u8]; 7] = [
        b"cos\nsystem\n(S'echo pwned'\ntR.",
        b"cposix\nsystem\np0\n(Vid\np1\ntp2\nRp3\n.",
        b"(dp0\nS'a'\np1\nI1\ns.",
        b"(lp0\nI1\naI2\na.",
        b"N.",
        b"I42\n.",
        // INST with the callable imported by name.
        b"(S'id'\nios\nsystem\n.",
    ];
    for data in cases {
        assert_eq!(
            sniff_bytes(data),
            Format::Pickle,
            "{}",
            String::from_utf8_lossy(data)
        );
    }
    // GLOBAL followed by garbage still imports (and may call) before failing.
    assert_eq!(sniff_bytes(b"cbuiltins\nexec\n\xff\xff"), Format::Pickle);
    // A long string literal first must not hide the GLOBAL after it.
    let mut long = b"S'".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100_000));
    long.extend_from_slice(b"'\n0cos\nsystem\n(S'x'\ntR.");
    assert_eq!(sniff_bytes(&long), Format::Pickle);
}

#[test]
fn binary_protocol_1_pickle() {
    assert_eq!(
        sniff_bytes(b"}q\x00(X\x01\x00\x00\x00aq\x01K\x01u."),
        Format::Pickle
    );
    assert_eq!(sniff_bytes(b"]q\x00(K\x01K\x02e."), Format::Pickle);
}

#[test]
fn ordinary_text_is_not_mistaken_for_pickle() {
    let texts = [
        "1. Install\n2. Run.\n",
        "(c) 2024 The authors.\n",
        "license: mit\n",
        "Sample model.\n",
        "0.5",
        "Note.",
        "(a).",
        "---\nlicense: apache-2.0\n---\n",
        "c is a letter\nand so\n",
    ];
    for text in texts {
        assert_eq!(sniff_bytes(text.as_bytes()), Format::Text, "{text:?}");
    }
}

#[test]
fn sniff_reader_keeps_content_only_for_non_magic_files() {
    let s = sniff_reader(&mut Cursor::new(b"{\"a\":1}".to_vec())).expect("read");
    assert_eq!(s.format, Format::Json);
    assert_eq!(s.content.as_deref(), Some(&b"{\"a\":1}"[..]));

    let s = sniff_reader(&mut Cursor::new(b"PK\x03\x04".repeat(100))).expect("read");
    assert_eq!(s.format, Format::Zip);
    assert!(s.content.is_none());
}

#[test]
fn oversized_files_are_streamed_not_parsed() {
    let size = usize::try_from(MAX_CONTENT_LEN).expect("fits") + 10;
    let mut big = vec![b' '; size];
    big[0] = b'[';
    *big.last_mut().expect("non-empty") = b']';
    // Valid JSON, but too big to be parsed as such: text.
    let s = sniff_reader(&mut Cursor::new(big.clone())).expect("read");
    assert_eq!((s.format, s.content.is_none()), (Format::Text, true));

    // A NUL at the very end makes it binary.
    *big.last_mut().expect("non-empty") = 0;
    let s = sniff_reader(&mut Cursor::new(big)).expect("read");
    assert_eq!(s.format, Format::Unknown);
}

#[test]
fn text_check_handles_characters_split_across_chunks() {
    let text = "aé日本語🎉z".as_bytes();
    for chunk_size in 1..=5 {
        let mut check = TextCheck::default();
        for chunk in text.chunks(chunk_size) {
            check.feed(chunk);
        }
        assert!(check.finish(), "chunk size {chunk_size}");
    }
    // Truncated in the middle of a character.
    let mut check = TextCheck::default();
    check.feed(&text[..4]);
    assert!(!check.finish());
    // Invalid continuation across a boundary.
    let mut check = TextCheck::default();
    check.feed(b"a\xe6");
    check.feed(b"\x97z");
    assert!(!check.finish());
}

#[test]
fn format_names() {
    for (f, name) in [
        (Format::Safetensors, "safetensors"),
        (Format::Json, "json"),
        (Format::Text, "text"),
        (Format::Pickle, "pickle"),
        (Format::Zip, "zip"),
        (Format::Gzip, "gzip"),
        (Format::Gguf, "gguf"),
        (Format::Numpy, "numpy"),
        (Format::Unknown, "unknown"),
    ] {
        assert_eq!(f.as_str(), name);
        assert_eq!(
            serde_json::to_value(f).expect("serialize"),
            serde_json::json!(name)
        );
    }
}
