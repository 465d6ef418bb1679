//! Streaming safetensors writer for the demo weights.
//!
//! The 1.5B preset is 3.6 GB in bf16 and 7 GB in f32, so nothing here holds a
//! file or a whole tensor in memory: values are drawn from a per-tensor
//! generator straight into small reusable byte buffers, on several threads,
//! and written in order through a `BufWriter`. The header is computed up front from the tensor list (every
//! size is known), with tensors and `data_offsets` in list order, so the same
//! seed gives byte-identical files. Sharding follows Hugging Face's
//! `max_shard_size="2GB"`: greedy, in order, at most 2·10⁹ data bytes a file.

use std::io::Write;
use std::sync::mpsc;

use serde_json::{Map, Value, json};

use super::WeightDtype;
use super::rng::Xoshiro256;
use super::spec::{Init, TensorSpec};

/// Hugging Face's "2GB" (decimal, as `transformers` parses it).
pub(crate) const MAX_SHARD_BYTES: u64 = 2_000_000_000;

/// Elements per chunk (at most 1 MiB of bytes). Each chunk has its own
/// generator stream, so changing this changes the weights of every seed.
const CHUNK_ELEMENTS: usize = 256 * 1024;
/// Chunks the generator may run ahead of the writer.
const QUEUE_CHUNKS: usize = 4;

impl WeightDtype {
    pub(crate) fn bytes_per_element(self) -> u64 {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::Bf16 => 2,
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "F32",
            WeightDtype::F16 => "F16",
            WeightDtype::Bf16 => "BF16",
        }
    }
}

pub(crate) fn tensor_bytes(spec: &TensorSpec, dtype: WeightDtype) -> u64 {
    spec.elements() * dtype.bytes_per_element()
}

/// Splits the tensors (by index, order kept) into shards of at most
/// `max_bytes` of data each; a tensor larger than that gets a shard of its own.
pub(crate) fn plan_shards(specs: &[TensorSpec], dtype: WeightDtype, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0u64;
    for (i, spec) in specs.iter().enumerate() {
        let bytes = tensor_bytes(spec, dtype);
        if !current.is_empty() && current_bytes + bytes > max_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(i);
        current_bytes += bytes;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The 8-byte length prefix plus the JSON header, padded with spaces to a
/// multiple of 8 so that the data that follows is aligned.
pub(crate) fn header(specs: &[&TensorSpec], dtype: WeightDtype) -> Result<Vec<u8>, serde_json::Error> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    for spec in specs {
        let end = offset + tensor_bytes(spec, dtype);
        map.insert(
            spec.name.clone(),
            json!({
                "dtype": dtype.safetensors_name(),
                "shape": spec.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(map))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes one safetensors file (header, then each tensor's data) to `out`,
/// drawing values on as many threads as the machine offers (up to 8).
pub(crate) fn write_safetensors<W: Write>(
    out: &mut W,
    specs: &[&TensorSpec],
    dtype: WeightDtype,
    seed: u64,
) -> std::io::Result<()> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    write_safetensors_with(out, specs, dtype, seed, workers)
}

/// One chunk of one tensor: the unit of generation.
struct Chunk<'a> {
    spec: &'a TensorSpec,
    index: u64,
    elements: usize,
}

/// [`write_safetensors`] with a given number of generator threads.
///
/// Each chunk has its own generator stream (seed, tensor name, chunk index),
/// so the bytes do not depend on the number of threads. Worker `w` draws
/// chunks `w, w + workers, …` into its own bounded queue, and this thread
/// takes them round-robin, which restores the order without a reorder
/// buffer; emptied buffers go back to their worker for reuse. A write error
/// drops the queues, which stops the workers.
pub(crate) fn write_safetensors_with<W: Write>(
    out: &mut W,
    specs: &[&TensorSpec],
    dtype: WeightDtype,
    seed: u64,
    workers: usize,
) -> std::io::Result<()> {
    let header = header(specs, dtype).map_err(std::io::Error::other)?;
    out.write_all(&header)?;
    let chunks: Vec<Chunk<'_>> = specs
        .iter()
        .flat_map(|&spec| {
            let total = spec.elements();
            (0..total.div_ceil(CHUNK_ELEMENTS as u64)).map(move |index| Chunk {
                spec,
                index,
                elements: (total - index * CHUNK_ELEMENTS as u64).min(CHUNK_ELEMENTS as u64) as usize,
            })
        })
        .collect();
    let workers = workers.clamp(1, chunks.len().max(1));
    std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(workers);
        for w in 0..workers {
            let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE_CHUNKS);
            let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
            let chunks = &chunks;
            scope.spawn(move || {
                for chunk in chunks.iter().skip(w).step_by(workers) {
                    let mut buf = empty_rx.try_recv().unwrap_or_default();
                    let mut rng = Xoshiro256::for_chunk(seed, &chunk.spec.name, chunk.index);
                    fill(&mut buf, &mut rng, chunk.spec.init, dtype, chunk.elements);
                    if full_tx.send(buf).is_err() {
                        return; // the writer failed and stopped listening
                    }
                }
            });
            queues.push((full_rx, empty_tx));
        }
        let mut result = Ok(());
        for i in 0..chunks.len() {
            let (full_rx, empty_tx) = &queues[i % workers];
            let Ok(buf) = full_rx.recv() else {
                result = Err(std::io::Error::other("a weight generator thread stopped early"));
                break;
            };
            if let Err(e) = out.write_all(&buf) {
                result = Err(e);
                break;
            }
            // The worker may already be done; then the buffer is just freed.
            let _ = empty_tx.send(buf);
        }
        // Unblocks workers waiting on a full queue before the scope joins them.
        drop(queues);
        result
    })
}

/// Every value of one tensor as f32: the same chunks and generator streams
/// as the safetensors writer, so a GGUF demo holds the same weights.
pub(crate) fn tensor_values(spec: &TensorSpec, seed: u64) -> Vec<f32> {
    let total = spec.elements() as usize;
    let mut out = Vec::with_capacity(total);
    for index in 0..total.div_ceil(CHUNK_ELEMENTS) {
        let n = (total - index * CHUNK_ELEMENTS).min(CHUNK_ELEMENTS);
        let mut rng = Xoshiro256::for_chunk(seed, &spec.name, index as u64);
        match spec.init {
            Init::Normal(std) => out.extend((0..n).map(|_| rng.normalish() * std)),
            Init::Ones => out.extend(std::iter::repeat_n(1.0, n)),
        }
    }
    out
}

/// Replaces `buf` with `n` little-endian values. One loop per (init, dtype)
/// pair keeps the inner loops free of branches.
fn fill(buf: &mut Vec<u8>, rng: &mut Xoshiro256, init: Init, dtype: WeightDtype, n: usize) {
    let width = dtype.bytes_per_element() as usize;
    buf.clear();
    buf.resize(n * width, 0);
    let slots = buf.chunks_exact_mut(width);
    match (init, dtype) {
        (Init::Normal(std), WeightDtype::F32) => {
            for slot in slots {
                slot.copy_from_slice(&(rng.normalish() * std).to_le_bytes());
            }
        }
        (Init::Normal(std), WeightDtype::Bf16) => {
            for slot in slots {
                slot.copy_from_slice(&f32_to_bf16(rng.normalish() * std).to_le_bytes());
            }
        }
        (Init::Normal(std), WeightDtype::F16) => {
            for slot in slots {
                slot.copy_from_slice(&f32_to_f16(rng.normalish() * std).to_le_bytes());
            }
        }
        (Init::Ones, WeightDtype::F32) => {
            for slot in slots {
                slot.copy_from_slice(&1.0f32.to_le_bytes());
            }
        }
        (Init::Ones, WeightDtype::Bf16) => {
            for slot in slots {
                slot.copy_from_slice(&f32_to_bf16(1.0).to_le_bytes());
            }
        }
        (Init::Ones, WeightDtype::F16) => {
            for slot in slots {
                slot.copy_from_slice(&f32_to_f16(1.0).to_le_bytes());
            }
        }
    }
}

/// f32 → bf16, rounding to nearest, ties to even, on the bit pattern.
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        // Keep it a (quiet) NaN: truncation alone could clear every mantissa bit.
        return ((bits >> 16) | 0x0040) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    // Cannot overflow: the largest finite magnitude 0x7F7F_FFFF plus 0x8000
    // stays below 0x8000_0000 (and likewise with the sign bit set).
    (bits.wrapping_add(round) >> 16) as u16
}

/// f32 → IEEE half, rounding to nearest, ties to even; overflow gives ±inf,
/// tiny values become subnormals or ±0.
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xFF) as i32;
    let man = bits & 0x007F_FFFF;
    if exp == 0xFF {
        let nan = if man != 0 { 0x0200 | (man >> 13) as u16 } else { 0 };
        return sign | 0x7C00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    if e <= 0 {
        if e < -10 {
            // Below half the smallest subnormal (2^-25): rounds to zero.
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32; // 14..=24
        let mut r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1; // may carry into the smallest normal, which is still correct
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1FFF;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1; // a carry may reach the exponent, up to inf: still correct
    }
    sign | r as u16
}
