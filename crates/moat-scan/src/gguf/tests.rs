//! GGUF parser tests: a builder writes real-shaped files, then each rule is
//! broken one at a time.

use super::*;

/// A value for the builder.
pub(crate) enum V {
    U32(u32),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    Bool(u8),
    Raw(u32, Vec<u8>),
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

/// Writes a GGUF v3 file the way llama.cpp's writer does.
pub(crate) struct Builder {
    pub version: u32,
    pub kvs: Vec<(String, V)>,
    /// (name, dims, type, offset override)
    pub tensors: Vec<(String, Vec<u64>, u32, Option<u64>)>,
    pub alignment: u64,
    pub trailing: Vec<u8>,
    pub truncate: u64,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
            trailing: Vec::new(),
            truncate: 0,
        }
    }
}

impl Builder {
    pub(crate) fn kv(mut self, key: &str, v: V) -> Self {
        self.kvs.push((key.to_owned(), v));
        self
    }

    pub(crate) fn tensor(mut self, name: &str, dims: &[u64], t: u32) -> Self {
        self.tensors.push((name.to_owned(), dims.to_vec(), t, None));
        self
    }

    pub(crate) fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k.as_bytes());
            match v {
                V::U32(x) => {
                    out.extend_from_slice(&T_U32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                V::Str(s) => {
                    out.extend_from_slice(&T_STRING.to_le_bytes());
                    put_str(&mut out, s.as_bytes());
                }
                V::StrArray(items) => {
                    out.extend_from_slice(&T_ARRAY.to_le_bytes());
                    out.extend_from_slice(&T_STRING.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut out, s.as_bytes());
                    }
                }
                V::F32Array(items) => {
                    out.extend_from_slice(&T_ARRAY.to_le_bytes());
                    out.extend_from_slice(&T_F32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for x in items {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
                V::Bool(b) => {
                    out.extend_from_slice(&T_BOOL.to_le_bytes());
                    out.push(*b);
                }
                V::Raw(t, bytes) => {
                    out.extend_from_slice(&t.to_le_bytes());
                    out.extend_from_slice(bytes);
                }
            }
        }
        let mut offset = 0u64;
        let mut sizes = Vec::new();
        for (name, dims, t, over) in &self.tensors {
            put_str(&mut out, name.as_bytes());
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.to_le_bytes());
            let size = ggml_type(*t)
                .map(|g| {
                    (dims.iter().fold(1u64, |a, d| a.wrapping_mul(*d)) / g.block_size)
                        .wrapping_mul(g.type_size)
                })
                .unwrap_or(4);
            out.extend_from_slice(&over.unwrap_or(offset).to_le_bytes());
            sizes.push(size);
            offset = align(offset.wrapping_add(size), self.alignment).unwrap_or(0);
        }
        if !self.tensors.is_empty() {
            let start = align(out.len() as u64, self.alignment).unwrap();
            out.resize(start as usize, 0);
            for size in sizes {
                let end = align(out.len() as u64 + size.min(1 << 20), self.alignment).unwrap();
                out.resize(end as usize, 0x11);
            }
        }
        out.extend_from_slice(&self.trailing);
        out.truncate(out.len() - self.truncate as usize);
        out
    }
}

pub(crate) const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// A small llama-shaped model: general metadata, a vocabulary, a chat
/// template, quantised and float tensors.
pub(crate) fn benign() -> Builder {
    Builder::default()
        .kv("general.architecture", V::Str("llama".into()))
        .kv("general.alignment", V::U32(32))
        .kv("llama.context_length", V::U32(4096))
        .kv(
            "tokenizer.ggml.tokens",
            V::StrArray(vec!["<s>".into(), "a".into(), "b".into()]),
        )
        .kv("tokenizer.ggml.scores", V::F32Array(vec![0.0, -1.0, -2.0]))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(1))
        .kv("tokenizer.chat_template", V::Str(LLAMA3_TEMPLATE.into()))
        .tensor("token_embd.weight", &[256, 3], 12)
        .tensor("blk.0.attn_q.weight", &[64, 64], 8)
        .tensor("output_norm.weight", &[7], 0)
        .tensor("rope_freqs", &[3], 30)
}

fn run(data: &[u8]) -> (Option<Header>, Vec<Finding>) {
    check(io::Cursor::new(data)).unwrap()
}

fn rules(data: &[u8]) -> Vec<String> {
    run(data).1.into_iter().map(|f| f.rule).collect()
}

#[test]
fn benign_file_passes_and_is_understood() {
    let (header, findings) = run(&benign().build());
    assert_eq!(findings, vec![]);
    let header = header.unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(header.tensors.len(), 4);
    assert_eq!(header.tensors[0].size, 144 * 3);
    assert_eq!(header.tensors[1].size, 64 * 2 * 34);
    assert_eq!(header.templates.len(), 1);
    assert_eq!(header.data_start % 32, 0);
}

#[test]
fn version_2_and_no_tensors_pass() {
    let mut b = benign();
    b.version = 2;
    assert_eq!(rules(&b.build()), Vec::<String>::new());
    let b = Builder::default().kv("general.architecture", V::Str("llama".into()));
    assert_eq!(rules(&b.build()), Vec::<String>::new());
}

#[test]
fn custom_alignment_is_honoured() {
    let mut b = benign();
    b.kvs[1].1 = V::U32(64);
    b.alignment = 64;
    assert_eq!(rules(&b.build()), Vec::<String>::new());
}

#[test]
fn big_endian_and_v1_are_refused() {
    for (version, needle) in [
        (3u32.swap_bytes(), "big-endian"),
        (1, "version 1"),
        (7, "unknown"),
    ] {
        let mut b = benign();
        b.version = version;
        let (_, f) = run(&b.build());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].rule, rule::VERSION);
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(f[0].message.contains(needle), "{}", f[0].message);
        assert_eq!(f[0].location, "offset 4");
    }
}

#[test]
fn counts_over_the_caps_are_refused_before_reading() {
    let mut data = benign().build();
    data[8..16].copy_from_slice(&(MAX_TENSORS + 1).to_le_bytes());
    assert_eq!(rules(&data), vec![rule::LIMIT]);
    let mut data = benign().build();
    data[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(rules(&data), vec![rule::LIMIT]);
}

#[test]
fn huge_string_and_array_lengths_are_refused() {
    let b = Builder::default().kv("a", V::Raw(T_STRING, (MAX_STRING_LEN + 1).to_le_bytes().to_vec()));
    assert_eq!(rules(&b.build()), vec![rule::LIMIT]);
    // Within the cap but beyond the file: truncated, nothing allocated.
    let b = Builder::default().kv("a", V::Raw(T_STRING, 1000u64.to_le_bytes().to_vec()));
    let (_, f) = run(&b.build());
    assert_eq!(f[0].rule, rule::TRUNCATED);
    assert!(f[0].location.starts_with("offset "), "{}", f[0].location);
    let mut raw = T_U8.to_le_bytes().to_vec();
    raw.extend_from_slice(&(MAX_ARRAY_LEN + 1).to_le_bytes());
    let b = Builder::default().kv("a", V::Raw(T_ARRAY, raw));
    assert_eq!(rules(&b.build()), vec![rule::LIMIT]);
}

#[test]
fn nested_arrays_unknown_types_and_bad_bools_are_refused() {
    let mut raw = T_ARRAY.to_le_bytes().to_vec();
    raw.extend_from_slice(&1u64.to_le_bytes());
    let b = Builder::default().kv("a", V::Raw(T_ARRAY, raw));
    assert_eq!(rules(&b.build()), vec![rule::KV]);
    let b = Builder::default().kv("a", V::Raw(13, vec![0; 8]));
    assert_eq!(rules(&b.build()), vec![rule::KV]);
    let b = Builder::default().kv("a", V::Bool(2));
    assert_eq!(rules(&b.build()), vec![rule::KV]);
}

#[test]
fn duplicate_keys_and_tensors_are_refused() {
    let b = benign().kv("general.architecture", V::Str("gpt2".into()));
    assert_eq!(rules(&b.build()), vec![rule::DUPLICATE]);
    let b = benign().tensor("rope_freqs", &[3], 0);
    assert_eq!(rules(&b.build()), vec![rule::DUPLICATE]);
}

#[test]
fn bad_alignment_is_refused() {
    for bad in [0u32, 3, 48, 1 << 30] {
        let mut b = benign();
        b.kvs[1].1 = V::U32(bad);
        assert_eq!(rules(&b.build()), vec![rule::ALIGNMENT], "{bad}");
    }
    let mut b = benign();
    b.kvs[1].1 = V::Str("32".into());
    assert_eq!(rules(&b.build()), vec![rule::ALIGNMENT]);
}

#[test]
fn bad_dims_and_types_are_refused() {
    let cases: [(&[u64], u32, &str); 6] = [
        (&[], 0, rule::DIMS),
        (&[1, 1, 1, 1, 1], 0, rule::DIMS),
        (&[0, 4], 0, rule::DIMS),
        (&[u64::MAX, 4], 0, rule::DIMS),
        (&[1 << 32, 1 << 32], 0, rule::DIMS),
        (&[4], 4, rule::TYPE),
    ];
    for (dims, t, rule) in cases {
        let b = benign().tensor("x", dims, t);
        assert_eq!(rules(&b.build()), vec![rule], "{dims:?} {t}");
    }
    // Q4_0 rows must be whole blocks of 32.
    let b = benign().tensor("x", &[33, 2], 2);
    assert_eq!(rules(&b.build()), vec![rule::DIMS]);
    // A name longer than GGML_MAX_NAME.
    let b = benign().tensor(&"n".repeat(64), &[4], 0);
    assert_eq!(rules(&b.build()), vec![rule::LIMIT]);
}

#[test]
fn misaligned_overlapping_or_gapped_offsets_are_refused() {
    let mut b = benign();
    b.tensors[1].3 = Some(8);
    assert_eq!(rules(&b.build()), vec![rule::ALIGNMENT]);
    let mut b = benign();
    b.tensors[1].3 = Some(0); // overlaps tensor 0
    assert_eq!(rules(&b.build()), vec![rule::OFFSETS]);
    let mut b = benign();
    b.tensors[1].3 = Some(1024); // a gap
    assert_eq!(rules(&b.build()), vec![rule::OFFSETS]);
}

#[test]
fn tensor_data_past_the_end_is_refused() {
    let mut b = benign();
    b.truncate = 30;
    let (_, f) = run(&b.build());
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].rule, rule::FILE_LENGTH);
    assert!(f[0].message.contains("rope_freqs"), "{}", f[0].message);
}

#[test]
fn trailing_data_is_refused_but_end_padding_is_not() {
    let mut b = benign();
    b.trailing = b"PK\x05\x06".to_vec();
    let (_, f) = run(&b.build());
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].rule, rule::TRAILING);
    // A writer that does not pad after the last tensor is fine.
    let mut b = benign();
    b.truncate = 32 - 6; // rope_freqs is 6 bytes, padded to 32
    assert_eq!(rules(&b.build()), Vec::<String>::new());
}

#[test]
fn truncation_anywhere_in_the_header_is_a_finding_not_a_panic() {
    let data = benign().build();
    let (header, _) = run(&data);
    let data_start = header.unwrap().data_start as usize;
    for cut in 0..data_start {
        let (h, f) = run(&data[..cut]);
        assert!(h.is_none() || !f.is_empty(), "cut at {cut}");
        assert!(f.iter().all(|f| f.severity == Severity::Critical), "cut at {cut}");
    }
}

#[test]
fn malicious_chat_template_is_reported_with_its_key() {
    let payload = "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('id').read() }}";
    let b = benign().kv("tokenizer.chat_template.tool_use", V::Str(payload.into()));
    let (_, f) = run(&b.build());
    assert!(!f.is_empty());
    assert!(f.iter().all(|f| f.rule.starts_with("template.")), "{f:?}");
    assert!(
        f[0].location.contains("'tokenizer.chat_template.tool_use'"),
        "{}",
        f[0].location
    );
    let b = benign().kv("tokenizer.chat_template.x", V::U32(1));
    assert_eq!(rules(&b.build()), vec![rule::KV]);
}

#[test]
fn cost_does_not_depend_on_tensor_bytes() {
    // A reader that fails any read past the header proves only the header
    // is read, however large the declared data is.
    struct HeaderOnly {
        data: Vec<u8>,
        virtual_len: u64,
        pos: u64,
    }
    impl Read for HeaderOnly {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let start = self.pos as usize;
            if start >= self.data.len() {
                return Err(io::Error::other("read past the header"));
            }
            let n = buf.len().min(self.data.len() - start);
            buf[..n].copy_from_slice(&self.data[start..start + n]);
            self.pos += n as u64;
            Ok(n)
        }
    }
    impl Seek for HeaderOnly {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.pos = match to {
                SeekFrom::Start(x) => x,
                SeekFrom::End(x) => (self.virtual_len as i64 + x) as u64,
                SeekFrom::Current(x) => (self.pos as i64 + x) as u64,
            };
            Ok(self.pos)
        }
    }
    // 4096 x 65536 F32 = 1 GiB of declared data.
    let b = Builder::default()
        .kv("general.architecture", V::Str("llama".into()))
        .tensor("big", &[4096, 65536], 0);
    let mut data = b.build();
    let (header, _) = run(&data);
    let header = header.unwrap();
    data.truncate(header.data_start as usize);
    let reader = HeaderOnly {
        virtual_len: header.data_start + 4096 * 65536 * 4,
        data,
        pos: 0,
    };
    let (_, findings) = check(reader).unwrap();
    assert_eq!(findings, vec![]);
}

#[test]
fn fuzz_entry_point_survives_garbage() {
    fuzz_gguf(b"");
    fuzz_gguf(b"GGUF");
    fuzz_gguf(b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff");
    let mut data = benign().build();
    for i in (0..data.len()).step_by(7) {
        data[i] ^= 0xa5;
        fuzz_gguf(&data);
    }
}
