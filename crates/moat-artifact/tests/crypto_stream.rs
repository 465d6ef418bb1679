//! The encrypted-object format as a caller sees it: round trips of every
//! size class, and every kind of damage (flipped byte, truncation, reordered
//! or swapped chunks, appended bytes, a swapped key block) refused with the
//! chunk named by index and byte offset.

// Test fixtures: a failed setup step must abort the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use moat_artifact::crypto::{
    self, ChunkFault, CryptoError, Header, Keyring, KeyringFile, NewKek, StreamOptions,
};

/// 4 KiB chunks keep the tests fast while still spanning many chunks.
const EXP: u8 = 12;
const CHUNK: usize = 1 << EXP;
const TAG: usize = 16;

fn keyring(t: &tempfile::TempDir) -> Keyring {
    let file = KeyringFile::new(t.path().join("keyring.json"));
    file.rotate(NewKek::Local).unwrap();
    file.load().unwrap()
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 131 % 251) as u8).collect()
}

fn opts(threads: usize) -> StreamOptions {
    StreamOptions {
        chunk_exp: EXP,
        threads,
    }
}

fn encrypt(k: &Keyring, plain: &[u8], threads: usize) -> Vec<u8> {
    let mut out = Vec::new();
    crypto::encrypt_stream(k, plain, &mut out, &opts(threads)).unwrap();
    out
}

fn decrypt(k: &Keyring, sealed: &[u8], threads: usize) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::new();
    crypto::decrypt_stream(k, sealed, &mut out, &opts(threads)).map(|_| out)
}

fn header_len(sealed: &[u8]) -> usize {
    Header::read_from(&mut &sealed[..]).unwrap().len()
}

/// Byte range of chunk `i` in an encrypted object.
fn chunk_range(sealed: &[u8], i: usize) -> std::ops::Range<usize> {
    let start = header_len(sealed) + i * (CHUNK + TAG);
    start..(start + CHUNK + TAG).min(sealed.len())
}

fn expect_chunk(r: Result<Vec<u8>, CryptoError>, index: u64, fault: ChunkFault) -> CryptoError {
    let e = r.expect_err("damaged object decrypted");
    let (i, _, f) = e.chunk().unwrap_or_else(|| panic!("not a chunk error: {e}"));
    assert_eq!((i, f), (index, fault), "{e}");
    e
}

#[test]
fn round_trips_of_every_size_class() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    for n in [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        3 * CHUNK,
        3 * CHUNK + 17,
        16 * CHUNK,
    ] {
        let plain = data(n);
        for threads in [1, 2, 5] {
            let sealed = encrypt(&k, &plain, threads);
            let chunks = n.div_ceil(CHUNK).max(1);
            assert_eq!(sealed.len(), header_len(&sealed) + n + chunks * TAG, "size {n}");
            for dthreads in [1, 3] {
                assert_eq!(decrypt(&k, &sealed, dthreads).unwrap(), plain, "size {n}");
            }
        }
    }
}

#[test]
fn seal_and_open_small_objects() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    for plain in [&b""[..], b"{\"keys\":[]}", &data(100_000)] {
        let sealed = crypto::seal(&k, plain).unwrap();
        assert_eq!(crypto::open(&k, &sealed).unwrap(), plain);
        assert!(
            !sealed.windows(11).any(|w| w == b"{\"keys\":[]}"),
            "plaintext visible in the sealed object"
        );
    }
    // Two seals of the same plaintext differ (fresh data key and nonce).
    assert_ne!(crypto::seal(&k, b"x").unwrap(), crypto::seal(&k, b"x").unwrap());
}

#[test]
fn summary_counts() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let plain = data(2 * CHUNK + 5);
    let mut sealed = Vec::new();
    let s = crypto::encrypt_stream(&k, &plain[..], &mut sealed, &opts(2)).unwrap();
    assert_eq!(
        (s.plaintext_bytes, s.chunks, s.kek_version),
        (plain.len() as u64, 3, 1)
    );
    let mut out = Vec::new();
    let d = crypto::decrypt_stream(&k, &sealed[..], &mut out, &opts(2)).unwrap();
    assert_eq!(d, s);
}

#[test]
fn a_flipped_byte_names_the_chunk_and_its_offset() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let plain = data(6 * CHUNK + 100);
    let sealed = encrypt(&k, &plain, 2);
    for (chunk, at) in [(0, 0), (2, 17), (4, CHUNK + TAG - 1), (6, 3)] {
        let mut bad = sealed.clone();
        let r = chunk_range(&sealed, chunk);
        bad[r.start + at] ^= 0x01;
        for threads in [1, 4] {
            let e = expect_chunk(decrypt(&k, &bad, threads), chunk as u64, ChunkFault::Corrupted);
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("chunk {chunk} at byte offset {}", r.start)),
                "{msg}"
            );
        }
    }
}

#[test]
fn the_first_bad_chunk_is_reported_whatever_the_thread_count() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let sealed = encrypt(&k, &data(40 * CHUNK), 4);
    let mut bad = sealed.clone();
    for chunk in [37, 10, 9, 22] {
        bad[chunk_range(&sealed, chunk).start + 5] ^= 0x10;
    }
    for threads in [1, 2, 3, 8] {
        expect_chunk(decrypt(&k, &bad, threads), 9, ChunkFault::Corrupted);
    }
}

#[test]
fn truncation_is_detected() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let plain = data(4 * CHUNK);
    let sealed = encrypt(&k, &plain, 1);
    // Whole chunks dropped from the end: the new last chunk is not final.
    for keep in 1..4 {
        let cut = chunk_range(&sealed, keep).start;
        expect_chunk(
            decrypt(&k, &sealed[..cut], 2),
            keep as u64 - 1,
            ChunkFault::Truncated,
        );
    }
    // Nothing after the header.
    let h = header_len(&sealed);
    expect_chunk(decrypt(&k, &sealed[..h], 1), 0, ChunkFault::Truncated);
    // Cut inside a chunk, and inside a tag.
    expect_chunk(decrypt(&k, &sealed[..h + 100], 1), 0, ChunkFault::Corrupted);
    expect_chunk(decrypt(&k, &sealed[..h + 5], 1), 0, ChunkFault::Incomplete);
    // Cut inside the header.
    let e = decrypt(&k, &sealed[..h - 1], 1).unwrap_err();
    assert!(matches!(e, CryptoError::Format(_)), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn appended_bytes_are_detected() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    // A full final chunk followed by more data.
    let mut sealed = encrypt(&k, &data(2 * CHUNK), 1);
    sealed.extend_from_slice(b"more");
    expect_chunk(decrypt(&k, &sealed, 1), 1, ChunkFault::TrailingData);
    // A duplicated final chunk.
    let sealed = encrypt(&k, &data(2 * CHUNK), 1);
    let mut dup = sealed.clone();
    dup.extend_from_slice(&sealed[chunk_range(&sealed, 1)]);
    expect_chunk(decrypt(&k, &dup, 2), 1, ChunkFault::TrailingData);
}

#[test]
fn reordered_and_swapped_chunks_are_detected() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let plain = data(5 * CHUNK + 9);
    let sealed = encrypt(&k, &plain, 1);
    // Swap chunks 1 and 3.
    let mut bad = sealed.clone();
    let (r1, r3) = (chunk_range(&sealed, 1), chunk_range(&sealed, 3));
    bad[r1.clone()].copy_from_slice(&sealed[r3.clone()]);
    bad[r3].copy_from_slice(&sealed[r1.clone()]);
    expect_chunk(decrypt(&k, &bad, 3), 1, ChunkFault::Corrupted);
    // Chunk 2 of another object (same keyring, same plaintext) pasted in.
    let other = encrypt(&k, &plain, 1);
    let mut bad = sealed.clone();
    let r2 = chunk_range(&sealed, 2);
    bad[r2.clone()].copy_from_slice(&other[r2]);
    expect_chunk(decrypt(&k, &bad, 1), 2, ChunkFault::Corrupted);
}

#[test]
fn a_key_block_from_another_object_is_refused_before_any_chunk() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let a = encrypt(&k, &data(CHUNK), 1);
    let b = encrypt(&k, &data(CHUNK), 1);
    // Same length key blocks (local wraps): paste b's key block into a.
    let mut bad = a.clone();
    let h = header_len(&a);
    bad[48..h].copy_from_slice(&b[48..h]);
    let e = decrypt(&k, &bad, 1).unwrap_err();
    assert!(matches!(e, CryptoError::KeyCheck), "{e}");
    // A corrupted wrapped key: the unwrap fails and names the KEK version.
    let mut bad = a.clone();
    bad[h - 3] ^= 0x80;
    let e = decrypt(&k, &bad, 1).unwrap_err();
    assert!(matches!(e, CryptoError::Unwrap { version: 1, .. }), "{e}");
    assert!(e.to_string().contains("KEK version 1"), "{e}");
}

#[test]
fn headers_are_validated() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let sealed = encrypt(&k, b"hello", 1);
    let expect = |bytes: &[u8], needle: &str| {
        let e = decrypt(&k, bytes, 1).unwrap_err();
        assert!(matches!(e, CryptoError::Format(_)), "{e}");
        assert!(e.to_string().contains(needle), "{e}: wanted {needle:?}");
    };
    expect(b"", "truncated");
    expect(
        b"PK\x03\x04 not ours at all, but long enough for a header ..............",
        "bad magic",
    );
    for (at, value, needle) in [
        (7, 2, "format version 2"),
        (8, 30, "chunk size exponent 30"),
        (52, 9, "wrap scheme 9"),
    ] {
        let mut bad = sealed.clone();
        bad[at] = value;
        expect(&bad, needle);
    }
    let mut bad = sealed.clone();
    bad[48..52].copy_from_slice(&[0, 0, 0, 0]);
    expect(&bad, "KEK version 0");
    let mut bad = sealed.clone();
    bad[53..55].copy_from_slice(&[0x40, 0x00]);
    expect(&bad, "wrapped key length 16384");
    // A KEK version the keyring does not have.
    let mut bad = sealed.clone();
    bad[48..52].copy_from_slice(&7u32.to_be_bytes());
    let e = decrypt(&k, &bad, 1).unwrap_err();
    assert!(matches!(e, CryptoError::UnknownKek(7)), "{e}");
}

#[test]
fn chunk_size_is_bounded() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    for exp in [11, 25] {
        let e = crypto::encrypt_stream(
            &k,
            &b"x"[..],
            Vec::new(),
            &StreamOptions {
                chunk_exp: exp,
                threads: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("chunk size exponent"), "{e}");
    }
    let sealed = crypto::seal(&k, b"x").unwrap();
    let h = Header::read_from(&mut &sealed[..]).unwrap();
    assert_eq!(h.chunk_size(), 1 << crypto::DEFAULT_CHUNK_EXP);
}

#[test]
fn files_are_written_atomically_and_only_when_authentic() {
    let t = tempfile::tempdir().unwrap();
    let k = keyring(&t);
    let src = t.path().join("model.safetensors");
    let enc = t.path().join("model.safetensors.enc");
    let out = t.path().join("plain");
    let plain = data(3 * (1 << 20) + 5);
    std::fs::write(&src, &plain).unwrap();
    crypto::encrypt_file(&k, &src, &enc, &StreamOptions::default()).unwrap();
    crypto::decrypt_file(&k, &enc, &out, &StreamOptions::default()).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), plain);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Damage the last chunk: no output file, the error names file and chunk.
    let mut bad = std::fs::read(&enc).unwrap();
    let n = bad.len();
    bad[n - 20] ^= 0xff;
    std::fs::write(&enc, &bad).unwrap();
    let out2 = t.path().join("plain2");
    let e = crypto::decrypt_file(&k, &enc, &out2, &StreamOptions::default()).unwrap_err();
    assert_eq!(
        e.chunk().map(|(i, _, f)| (i, f)),
        Some((3, ChunkFault::Corrupted)),
        "{e}"
    );
    assert!(e.to_string().contains("model.safetensors.enc"), "{e}");
    assert!(!out2.exists());
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
