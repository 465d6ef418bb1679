//! Reading a GGUF file that the scanner already passed: its metadata and
//! where each tensor's bytes are.
//!
//! The scanner's strict check (`moat-scan`'s `gguf`) runs at pull time; this
//! reader runs at load time on bytes that were re-verified against the lock,
//! and still trusts nothing: every length and offset is checked against the
//! bytes that exist before it is used, arithmetic is checked, and an error
//! names the byte offset. (candle's reader panicked on `general.alignment =
//! 0`; here that is an error like any other.)

use std::collections::HashMap;
use std::ops::Range;

/// Caps, as the scanner's (a header beyond them was already refused there).
const MAX_TENSORS: u64 = 1 << 17;
const MAX_KVS: u64 = 1 << 16;
const MAX_STRING_LEN: u64 = 16 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_ALIGNMENT: u64 = 1 << 20;

/// A metadata value. Integers keep their sign; floats widen to f64.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(x) => Some(x),
            Value::Int(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(x) => Some(x),
            Value::Uint(x) => Some(x as f64),
            Value::Int(x) => Some(x as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor: ggml type id, dims (`dims[0]` varies fastest: a matrix is
/// `[cols, rows]`), and its bytes' range in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub ggml_type: u32,
    pub dims: Vec<u64>,
    pub range: Range<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Gguf {
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, Tensor>,
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

/// Bytes per block and elements per block for the tensor types the engine
/// can compute with; other types are refused by name at load.
fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    crate::cpu::quant::QType::from_ggml(ggml_type).map(|t| (t.block_elems() as u64, t.block_bytes() as u64))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Res<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Res<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "offset {}: {what} needs {n} bytes but only {} remain",
                    self.pos,
                    self.buf.len() - self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Res<String> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > MAX_STRING_LEN {
            return Err(format!(
                "offset {at}: {what} is {n} bytes; the limit is {MAX_STRING_LEN}"
            ));
        }
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("offset {at}: {what} is not UTF-8"))
    }

    fn value(&mut self, t: u32, key: &str, depth: u8) -> Res<Value> {
        Ok(match t {
            0 => Value::Uint(u64::from(self.arr::<1>(key)?[0])),
            1 => Value::Int(i64::from(self.arr::<1>(key)?[0] as i8)),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.arr(key)?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.arr(key)?))),
            4 => Value::Uint(u64::from(self.u32(key)?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.arr(key)?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.arr(key)?))),
            7 => Value::Bool(self.arr::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 if depth == 0 => {
                let at = self.pos;
                let et = self.u32(key)?;
                let n = self.u64(key)?;
                if n > MAX_ARRAY_LEN {
                    return Err(format!(
                        "offset {at}: array {key} has {n} elements; the limit is {MAX_ARRAY_LEN}"
                    ));
                }
                // Each element takes at least one byte: a count beyond the
                // bytes left cannot be honest, and must not size an allocation.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(format!(
                        "offset {at}: array {key} of {n} elements overruns the file"
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Uint(self.u64(key)?),
            11 => Value::Int(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::Float(f64::from_le_bytes(self.arr(key)?)),
            _ => {
                return Err(format!(
                    "offset {}: {key}: unknown or nested value type {t}",
                    self.pos
                ));
            }
        })
    }
}

/// Parse the header of a GGUF file held in `buf` and check that every
/// tensor's bytes lie inside it.
pub fn parse(buf: &[u8]) -> Result<Gguf, String> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(4, "magic")? != b"GGUF" {
        return Err("offset 0: not a GGUF file (magic is not \"GGUF\")".into());
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "offset 4: GGUF version {version} is not supported (2 or 3)"
        ));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    if n_tensors > MAX_TENSORS || n_kv > MAX_KVS {
        return Err(format!(
            "offset 8: {n_tensors} tensors / {n_kv} metadata entries exceed the limits ({MAX_TENSORS} / {MAX_KVS})"
        ));
    }
    let mut g = Gguf::default();
    for _ in 0..n_kv {
        let at = r.pos;
        let key = r.string("metadata key")?;
        let t = r.u32(&key)?;
        let v = r.value(t, &key, 0)?;
        if g.metadata.insert(key.clone(), v).is_some() {
            return Err(format!("offset {at}: metadata key {key:?} appears twice"));
        }
    }
    let alignment = match g.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            _ => {
                return Err(format!(
                    "general.alignment is {v:?}; it must be a power of two between 1 and {MAX_ALIGNMENT}"
                ));
            }
        },
    };
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let at = r.pos;
        let name = r.string("tensor name")?;
        let nd = r.u32(&name)?;
        if nd == 0 || nd > MAX_DIMS {
            return Err(format!(
                "offset {at}: tensor {name:?} has {nd} dimensions (1 to {MAX_DIMS})"
            ));
        }
        let mut dims = Vec::new();
        for _ in 0..nd {
            let d = r.u64(&name)?;
            if d == 0 || i64::try_from(d).is_err() {
                return Err(format!("offset {at}: tensor {name:?} has a dimension of {d}"));
            }
            dims.push(d);
        }
        let t = r.u32(&name)?;
        let offset = r.u64(&name)?;
        infos.push((at, name, dims, t, offset));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    for (at, name, dims, t, offset) in infos {
        let Some((per_block, block_bytes)) = block_layout(t) else {
            return Err(format!(
                "tensor {name:?}: ggml type {t} is not one the engine computes with \
                 (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K)"
            ));
        };
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("offset {at}: tensor {name:?}: element count overflows"))?;
        if !dims[0].is_multiple_of(per_block) {
            return Err(format!(
                "tensor {name:?}: its first dimension {} is not a multiple of the block size {per_block}",
                dims[0]
            ));
        }
        let size = elems / per_block * block_bytes;
        if !offset.is_multiple_of(alignment) {
            return Err(format!(
                "offset {at}: tensor {name:?}: data offset {offset} is not aligned to {alignment}"
            ));
        }
        let range = data_start
            .checked_add(offset)
            .and_then(|s| Some(s..s.checked_add(size)?))
            .filter(|r| r.end <= buf.len() as u64)
            .ok_or_else(|| {
                format!(
                    "tensor {name:?}: its {size} bytes at data offset {offset} lie beyond the end of the file ({} bytes)",
                    buf.len()
                )
            })?;
        let tensor = Tensor {
            ggml_type: t,
            dims,
            range: range.start as usize..range.end as usize,
        };
        if g.tensors.insert(name.clone(), tensor).is_some() {
            return Err(format!("offset {at}: tensor {name:?} appears twice"));
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// A minimal writer for the tests: metadata of u32/string values and F32 tensors.
    pub(crate) fn write(
        meta: &[(&str, Value)],
        tensors: &[(&str, Vec<u64>, Vec<f32>)],
        align: u64,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        for (k, v) in meta {
            s(&mut b, k);
            match v {
                Value::Uint(x) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend((*x as u32).to_le_bytes());
                }
                Value::Str(x) => {
                    b.extend(8u32.to_le_bytes());
                    s(&mut b, x);
                }
                Value::Float(x) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend((*x as f32).to_le_bytes());
                }
                _ => unreachable!("test writer"),
            }
        }
        let mut off = 0u64;
        for (name, dims, data) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(0u32.to_le_bytes());
            b.extend(off.to_le_bytes());
            off += (data.len() as u64 * 4).div_ceil(align) * align;
        }
        while !(b.len() as u64).is_multiple_of(align) {
            b.push(0);
        }
        for (_, _, data) in tensors {
            for x in data {
                b.extend(x.to_le_bytes());
            }
            while !(b.len() as u64).is_multiple_of(align) {
                b.push(0);
            }
        }
        b
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let f = write(
            &[
                ("general.architecture", Value::Str("qwen2".into())),
                ("n", Value::Uint(7)),
            ],
            &[("a", vec![2, 3], vec![1.0; 6]), ("b", vec![4], vec![2.0; 4])],
            32,
        );
        let g = parse(&f).unwrap();
        assert_eq!(g.get("general.architecture").unwrap().as_str(), Some("qwen2"));
        assert_eq!(g.get("n").unwrap().as_u64(), Some(7));
        let b = &g.tensors["b"];
        assert_eq!(b.dims, vec![4]);
        assert_eq!(&f[b.range.clone()], 2.0f32.to_le_bytes().repeat(4).as_slice());
    }

    #[test]
    fn alignment_zero_is_an_error_not_a_panic() {
        let f = write(
            &[("general.alignment", Value::Uint(0))],
            &[("a", vec![4], vec![1.0; 4])],
            32,
        );
        let e = parse(&f).unwrap_err();
        assert!(e.contains("general.alignment"), "{e}");
    }

    #[test]
    fn tensor_past_the_end_is_named() {
        let mut f = write(&[], &[("w", vec![8], vec![1.0; 8])], 32);
        f.truncate(f.len() - 4);
        let e = parse(&f).unwrap_err();
        assert!(e.contains("\"w\"") && e.contains("beyond the end"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let f = write(
            &[("general.architecture", Value::Str("llama".into()))],
            &[("w", vec![8], vec![1.0; 8])],
            32,
        );
        for n in 0..f.len() - 32 {
            assert!(parse(&f[..n]).is_err(), "prefix of {n} bytes parsed");
        }
    }

    #[test]
    fn huge_array_count_is_refused_before_allocating() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.push(b'k');
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((1u64 << 23).to_le_bytes());
        let e = parse(&b).unwrap_err();
        assert!(e.contains("overruns"), "{e}");
    }
}
