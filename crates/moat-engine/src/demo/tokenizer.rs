//! A real byte-level BPE `tokenizer.json`, shaped like DeepSeek-R1-Distill-Qwen's.
//!
//! Layout of the vocabulary (exactly `vocab` ids, all used):
//! - `0..256`: the GPT-2 byte-level alphabet, in GPT-2's order, so any UTF-8
//!   text encodes and decodes losslessly;
//! - then one token per merge learned by a small deterministic BPE trainer on
//!   the embedded English corpus (`corpus.txt`), so English encodes compactly;
//! - then filler "words" (`Ġ` + letters) drawn from a fixed stream, so that a
//!   random model's output decodes to word-like text; they have no merges,
//!   which means encoding never produces them, and that is fine;
//! - last, the DeepSeek special tokens, also listed as `added_tokens`.
//!
//! The tokenizer does not depend on the weight seed: every demo model of a
//! preset shares token ids, which keeps engine tests simple.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value, json};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper};

use super::DemoError;
use super::rng::Xoshiro256;

/// The embedded training text for the merges.
const CORPUS: &str = include_str!("corpus.txt");

/// At most this many merges are learned (the corpus runs out of repeated
/// pairs well before that).
const MAX_MERGES: usize = 3000;

/// Fixed seed of the filler stream (the tokenizer ignores the weight seed).
const FILLER_SEED: u64 = 0x6D6F_6174_6465_6D6F; // "moatdemo"

/// Qwen2's pre-tokenizer split (digits one at a time).
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek's special tokens, in id order at the end of the vocabulary, with
/// their `special` flag. `<think>`/`</think>` are not special, so they survive
/// `decode(.., skip_special_tokens = true)` and the reasoning can be split off.
pub const SPECIAL_TOKENS: [(&str, bool); 8] = [
    ("<｜end▁of▁sentence｜>", true),
    ("<｜User｜>", true),
    ("<｜Assistant｜>", true),
    ("<｜begin▁of▁sentence｜>", true),
    ("<|EOT|>", true),
    ("<think>", false),
    ("</think>", false),
    ("<｜pad｜>", true),
];

pub(crate) const BOS: &str = "<｜begin▁of▁sentence｜>";
pub(crate) const EOS: &str = "<｜end▁of▁sentence｜>";
pub(crate) const PAD: &str = "<｜pad｜>";

/// Id of a special token in a vocabulary of `vocab` ids.
pub(crate) fn special_id(vocab: usize, content: &str) -> Option<u32> {
    let index = SPECIAL_TOKENS.iter().position(|(c, _)| *c == content)?;
    u32::try_from(vocab - SPECIAL_TOKENS.len() + index).ok()
}

/// GPT-2's `bytes_to_unicode`: the printable Latin-1 bytes stand for
/// themselves, the other 68 are moved to U+0100 and up. Returned in GPT-2's
/// order (printable first), which is also the id order of the first 256 tokens.
pub(crate) fn byte_alphabet() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    // 256..=323 are all valid scalar values, so nothing is replaced.
    for (b, code) in (0..=255u8).filter(|&b| !printable(b)).zip(256u32..) {
        out.push((b, char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)));
    }
    out
}

fn pre_tokenizer_json() -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": { "Regex": QWEN2_SPLIT_REGEX },
                "behavior": "Isolated",
                "invert": false
            },
            {
                "type": "ByteLevel",
                "add_prefix_space": false,
                "trim_offsets": false,
                "use_regex": false
            }
        ]
    })
}

fn tokenizer_error(e: impl std::fmt::Display) -> DemoError {
    DemoError::Tokenizer(e.to_string())
}

/// Splits the corpus exactly as the tokenizer will (the `tokenizers` crate's
/// own pre-tokenizer), giving byte-level words and their counts.
fn corpus_words() -> Result<BTreeMap<String, u64>, DemoError> {
    let pre: PreTokenizerWrapper = serde_json::from_value(pre_tokenizer_json()).map_err(tokenizer_error)?;
    let mut pretokenized = PreTokenizedString::from(CORPUS);
    pre.pre_tokenize(&mut pretokenized).map_err(tokenizer_error)?;
    let mut words = BTreeMap::new();
    for (word, _, _) in pretokenized.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *words.entry(word.to_owned()).or_insert(0u64) += 1;
    }
    Ok(words)
}

/// Vocabulary under construction: id → token and token → id.
struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Vocab {
    fn id_of(&mut self, token: String) -> u32 {
        if let Some(&id) = self.ids.get(&token) {
            return id;
        }
        let id = self.tokens.len() as u32;
        self.ids.insert(token.clone(), id);
        self.tokens.push(token);
        id
    }
}

/// Classic BPE training: repeatedly merge the most frequent adjacent pair.
/// Ties go to the pair whose (left, right) strings sort first, so the result
/// never depends on hash-map order. Stops at `max_merges` or when no pair
/// occurs twice. Returns the merges as token-string pairs.
fn train_merges(vocab: &mut Vocab, max_merges: usize) -> Result<Vec<(String, String)>, DemoError> {
    let alphabet: HashMap<char, u32> = byte_alphabet()
        .iter()
        .enumerate()
        .map(|(id, &(_, c))| (c, id as u32))
        .collect();
    let mut words: Vec<(Vec<u32>, u64)> = Vec::new();
    for (word, count) in corpus_words()? {
        let symbols = word
            .chars()
            .map(|c| alphabet.get(&c).copied())
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| DemoError::Tokenizer(format!("pre-tokenized word {word:?} is not byte-level")))?;
        words.push((symbols, count));
    }

    let mut merges = Vec::new();
    while merges.len() < max_merges {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (symbols, count) in &words {
            for w in symbols.windows(2) {
                *pairs.entry((w[0], w[1])).or_insert(0) += count;
            }
        }
        let tokens = &vocab.tokens;
        let best = pairs.into_iter().max_by(|(pa, ca), (pb, cb)| {
            ca.cmp(cb).then_with(|| {
                // Reversed: on equal counts the lexicographically smaller pair wins.
                (&tokens[pb.0 as usize], &tokens[pb.1 as usize])
                    .cmp(&(&tokens[pa.0 as usize], &tokens[pa.1 as usize]))
            })
        });
        let Some(((left, right), count)) = best else {
            break;
        };
        if count < 2 {
            break;
        }
        let (l, r) = (
            vocab.tokens[left as usize].clone(),
            vocab.tokens[right as usize].clone(),
        );
        let merged = vocab.id_of(format!("{l}{r}"));
        merges.push((l, r));
        for (symbols, _) in &mut words {
            if symbols.len() < 2 {
                continue;
            }
            let mut out = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(symbols[i]);
                    i += 1;
                }
            }
            *symbols = out;
        }
    }
    Ok(merges)
}

/// English vowel and consonant frequencies (per mille of all letters,
/// roughly); filler alternates between them so it reads like words.
const VOWELS: [(char, u32); 6] = [('e', 127), ('a', 82), ('o', 75), ('i', 70), ('u', 28), ('y', 20)];
const CONSONANTS: [(char, u32); 20] = [
    ('t', 91),
    ('n', 67),
    ('s', 63),
    ('h', 61),
    ('r', 60),
    ('d', 43),
    ('l', 40),
    ('c', 28),
    ('m', 24),
    ('w', 24),
    ('f', 22),
    ('g', 20),
    ('p', 19),
    ('b', 15),
    ('v', 10),
    ('k', 8),
    ('j', 2),
    ('x', 2),
    ('q', 1),
    ('z', 1),
];

fn weighted_letter(rng: &mut Xoshiro256, table: &[(char, u32)]) -> char {
    let total: u32 = table.iter().map(|&(_, w)| w).sum();
    let mut pick = rng.below(total);
    for &(c, w) in table {
        if pick < w {
            return c;
        }
        pick -= w;
    }
    'e'
}

/// Adds `count` new word-like tokens of 2–8 byte-level symbols: mostly
/// `Ġword` (a word after a space), some capitalised, some word pieces.
fn add_filler(vocab: &mut Vocab, count: usize) {
    let mut rng = Xoshiro256::for_stream(FILLER_SEED, "tokenizer.filler");
    let target = vocab.tokens.len() + count;
    while vocab.tokens.len() < target {
        let kind = rng.below(100);
        let mut token = String::new();
        let letters = if kind < 95 {
            token.push('Ġ');
            1 + rng.below(7)
        } else {
            2 + rng.below(7)
        };
        let mut vowel = rng.below(3) == 0;
        for i in 0..letters {
            let c = weighted_letter(&mut rng, if vowel { &VOWELS } else { &CONSONANTS });
            token.push(if i == 0 && (85..95).contains(&kind) {
                c.to_ascii_uppercase()
            } else {
                c
            });
            // Mostly alternate; sometimes two of a kind ("st", "ea").
            if rng.below(5) != 0 {
                vowel = !vowel;
            }
        }
        if !vocab.ids.contains_key(&token) {
            vocab.id_of(token);
        }
    }
}

/// The serialized `tokenizer.json` for a vocabulary of exactly `vocab` ids.
pub(crate) fn tokenizer_json(vocab_size: usize) -> Result<Vec<u8>, DemoError> {
    let alphabet = byte_alphabet();
    let specials = SPECIAL_TOKENS.len();
    if vocab_size < alphabet.len() + specials {
        return Err(DemoError::Tokenizer(format!(
            "vocabulary of {vocab_size} is smaller than the {} byte and special tokens",
            alphabet.len() + specials
        )));
    }
    let mut vocab = Vocab {
        tokens: Vec::with_capacity(vocab_size),
        ids: HashMap::with_capacity(vocab_size),
    };
    for &(_, c) in &alphabet {
        vocab.id_of(c.to_string());
    }
    let merges = train_merges(&mut vocab, MAX_MERGES.min(vocab_size - alphabet.len() - specials))?;
    // A merge can repeat an existing string, so fewer tokens than merges may
    // have been added; the filler makes up the difference either way.
    let filler = vocab_size - specials - vocab.tokens.len();
    add_filler(&mut vocab, filler);
    for (content, _) in SPECIAL_TOKENS {
        vocab.id_of(content.to_owned());
    }
    let unique: HashSet<&String> = vocab.tokens.iter().collect();
    if vocab.tokens.len() != vocab_size || unique.len() != vocab_size {
        return Err(DemoError::Tokenizer(format!(
            "built {} tokens ({} unique) for a vocabulary of {vocab_size}",
            vocab.tokens.len(),
            unique.len()
        )));
    }

    let added_tokens: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .map(|&(content, special)| {
            json!({
                "id": vocab.ids.get(content).copied(),
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": special,
            })
        })
        .collect();
    let bos_id = vocab.ids.get(BOS).copied();
    let mut vocab_map = Map::with_capacity(vocab_size);
    for (id, token) in vocab.tokens.iter().enumerate() {
        vocab_map.insert(token.clone(), json!(id));
    }
    let merges: Vec<Value> = merges
        .into_iter()
        .map(|(l, r)| Value::String(format!("{l} {r}")))
        .collect();

    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(),
        // Like DeepSeek's: `encode(.., add_special_tokens = true)` prepends BOS.
        // The chat template already starts with BOS, so rendered prompts must
        // be encoded with `add_special_tokens = false`.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                { "SpecialToken": { "id": BOS, "type_id": 0 } },
                { "Sequence": { "id": "A", "type_id": 0 } }
            ],
            "pair": [
                { "SpecialToken": { "id": BOS, "type_id": 0 } },
                { "Sequence": { "id": "A", "type_id": 0 } },
                { "SpecialToken": { "id": BOS, "type_id": 1 } },
                { "Sequence": { "id": "B", "type_id": 1 } }
            ],
            "special_tokens": {
                BOS: { "id": BOS, "ids": [bos_id], "tokens": [BOS] }
            }
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": false
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges,
        }
    });
    let mut bytes = serde_json::to_vec_pretty(&document).map_err(tokenizer_error)?;
    bytes.push(b'\n');
    Ok(bytes)
}
