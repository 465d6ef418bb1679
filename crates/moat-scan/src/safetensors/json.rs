//! A validating reader for the safetensors header JSON.
//!
//! `serde_json`'s maps keep the last of two equal keys, which is exactly the
//! ambiguity an attacker wants (two parsers, two different tensors). So the
//! header is deserialized with hand-written visitors that keep every entry in
//! order, and that never fail on a wrong type: they record what they saw
//! (`Kind`) and consume the rest, so one bad tensor entry does not hide the
//! next. Values we do not need are skipped with `IgnoredAny` instead of being
//! built into a tree, so memory stays proportional to what we keep.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The JSON type of a value we did not want, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Null,
    Boolean,
    Integer,
    NegativeInteger,
    Float,
    String,
    Array,
    Object,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Boolean => "a boolean",
            Kind::Integer => "an integer",
            Kind::NegativeInteger => "a negative integer",
            Kind::Float => "a non-integer number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

/// How a type wants each JSON kind handled. Anything not overridden becomes
/// `other(kind)` after the value has been consumed.
trait Classify: Sized {
    fn other(kind: Kind) -> Self;
    fn uint(_v: u64) -> Self {
        Self::other(Kind::Integer)
    }
    fn string(_s: &str) -> Self {
        Self::other(Kind::String)
    }
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::other(Kind::Array))
    }
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::other(Kind::Object))
    }
}

/// Adapter: `Classified<T>` deserializes any JSON value through `T`'s
/// [`Classify`] hooks.
struct Classified<T>(T);

struct ClassifyVisitor<T>(PhantomData<T>);

impl<'de, T: Classify> Visitor<'de> for ClassifyVisitor<T> {
    type Value = Classified<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Classified(T::other(Kind::Null)))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Classified(T::other(Kind::Null)))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<Self::Value, E> {
        Ok(Classified(T::other(Kind::Boolean)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Classified(T::uint(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        // serde_json only uses i64 for negative numbers (and `-0`).
        Ok(Classified(match u64::try_from(v) {
            Ok(v) => T::uint(v),
            Err(_) => T::other(Kind::NegativeInteger),
        }))
    }
    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Self::Value, E> {
        Ok(Classified(T::other(Kind::Float)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Classified(T::string(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        T::seq(seq).map(Classified)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::map(map).map(Classified)
    }
}

impl<'de, T: Classify> Deserialize<'de> for Classified<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ClassifyVisitor(PhantomData))
    }
}

/// The whole header: every top-level entry in file order, duplicates kept.
#[derive(Debug)]
pub(crate) enum Top {
    Object(Vec<(String, TopValue)>),
    Other(Kind),
}

#[derive(Debug)]
pub(crate) enum TopValue {
    Metadata(Metadata),
    Tensor(Entry),
}

impl Classify for Top {
    fn other(kind: Kind) -> Self {
        Top::Other(kind)
    }
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = if key == super::METADATA_KEY {
                TopValue::Metadata(map.next_value::<Classified<Metadata>>()?.0)
            } else {
                TopValue::Tensor(map.next_value::<Classified<Entry>>()?.0)
            };
            entries.push((key, value));
        }
        Ok(Top::Object(entries))
    }
}

/// `__metadata__`: hopefully an object of strings.
#[derive(Debug)]
pub(crate) enum Metadata {
    Object(Vec<(String, StrValue)>),
    Other(Kind),
}

impl Classify for Metadata {
    fn other(kind: Kind) -> Self {
        Metadata::Other(kind)
    }
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            entries.push((key, map.next_value::<Classified<StrValue>>()?.0));
        }
        Ok(Metadata::Object(entries))
    }
}

#[derive(Debug)]
pub(crate) enum StrValue {
    Str(String),
    Other(Kind),
}

impl Classify for StrValue {
    fn other(kind: Kind) -> Self {
        StrValue::Other(kind)
    }
    fn string(s: &str) -> Self {
        StrValue::Str(s.to_owned())
    }
}

/// One tensor entry: hopefully an object with `dtype`, `shape`, `data_offsets`.
#[derive(Debug)]
pub(crate) enum Entry {
    /// Every field in order; unknown fields are kept by name only.
    Object(Vec<(String, Option<Field>)>),
    Other(Kind),
}

impl Classify for Entry {
    fn other(kind: Kind) -> Self {
        Entry::Other(kind)
    }
    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut fields = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = match key.as_str() {
                "dtype" | "shape" | "data_offsets" => Some(map.next_value::<Classified<Field>>()?.0),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    None
                }
            };
            fields.push((key, value));
        }
        Ok(Entry::Object(fields))
    }
}

/// The value of a known tensor field.
#[derive(Debug)]
pub(crate) enum Field {
    Str(String),
    /// An array whose elements are all non-negative integers.
    Uints(Vec<u64>),
    /// An array with an element of the wrong kind at `index`.
    BadArray {
        index: usize,
        kind: Kind,
    },
    Other(Kind),
}

impl Classify for Field {
    fn other(kind: Kind) -> Self {
        Field::Other(kind)
    }
    fn string(s: &str) -> Self {
        Field::Str(s.to_owned())
    }
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut values = Vec::new();
        let mut bad = None;
        let mut index = 0usize;
        while let Some(Classified(element)) = seq.next_element::<Classified<UintValue>>()? {
            match element {
                UintValue::Uint(v) if bad.is_none() => values.push(v),
                UintValue::Uint(_) => {}
                UintValue::Other(kind) => {
                    if bad.is_none() {
                        bad = Some((index, kind));
                    }
                }
            }
            index += 1;
        }
        Ok(match bad {
            Some((index, kind)) => Field::BadArray { index, kind },
            None => Field::Uints(values),
        })
    }
}

enum UintValue {
    Uint(u64),
    Other(Kind),
}

impl Classify for UintValue {
    fn other(kind: Kind) -> Self {
        UintValue::Other(kind)
    }
    fn uint(v: u64) -> Self {
        UintValue::Uint(v)
    }
}

/// Parses header text (already checked to start with `{`) into [`Top`].
pub(crate) fn parse(text: &str) -> Result<Top, serde_json::Error> {
    serde_json::from_str::<Classified<Top>>(text).map(|c| c.0)
}
