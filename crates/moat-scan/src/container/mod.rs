//! Containers that hold other formats: zip (PyTorch checkpoints, `.npz`,
//! `.keras`), tar, gzip and zlib streams, numpy `.npy`, PyTorch's legacy
//! stacked-pickle format, joblib dumps, and 7z (recognised, refused).
//!
//! Every container is opened the way its real loader opens it (a zip as
//! PyTorch's reader does: central directory, CRC and flags ignored) *and* the
//! places where loaders disagree are findings, because a disagreement is
//! where a payload hides from a scanner that reads the file one way while
//! the victim's loader reads it another. Members are routed by content to
//! the right analyser ([`nested`]), depth- and size-limited, and bytes that
//! no loader interprets (tensor storages, raw array data) are never read.

pub mod compress;
pub mod joblib;
pub mod nested;
pub mod numpy;
pub mod tar;
pub mod torch;
pub mod zip;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::pickle::Sink;
use crate::report::{Finding, Severity, quote};
use crate::sniff::Format;

pub use nested::analyse_bytes;

/// Stable rule ids.
pub mod rule {
    /// The container cannot be parsed (truncated, bad magic, bad checksum).
    pub const MALFORMED: &str = "archive.malformed";
    /// Loaders would read the container differently (zip differentials,
    /// prepended or trailing data, duplicate or overlapping members).
    pub const DIFFERENTIAL: &str = "archive.differential";
    pub const ENCRYPTED: &str = "archive.encrypted";
    /// Member names that escape the extraction folder (zip-slip).
    pub const PATH: &str = "archive.path";
    /// Symbolic links, hard links and device entries in an archive.
    pub const LINK: &str = "archive.link";
    /// Decompression bombs: absolute size or ratio limits.
    pub const BOMB: &str = "archive.bomb";
    /// Archives nested deeper than [`super::MAX_DEPTH`].
    pub const DEPTH: &str = "archive.depth";
    /// A compression method other than stored or deflate.
    pub const METHOD: &str = "archive.method";
    pub const SEVEN_ZIP: &str = "archive.7z-unsupported";
    /// A member too large to analyse within the limits.
    pub const TOO_LARGE: &str = "archive.too-large";
    pub const NUMPY_HEADER: &str = "numpy.header";
    pub const NUMPY_LENGTH: &str = "numpy.length";
}

/// Archives inside archives are followed this deep; deeper is a finding.
pub const MAX_DEPTH: usize = 3;
/// Most bytes one decompressed stream or member may produce.
pub const MAX_INFLATED: u64 = 1 << 30;
/// Most bytes decompressed in total for one top-level file.
pub const MAX_INFLATED_TOTAL: u64 = 2 << 30;
/// Above [`RATIO_FLOOR`] bytes of output, a compression ratio above this is a bomb.
pub const MAX_RATIO: u64 = 200;
pub const RATIO_FLOOR: u64 = 64 << 20;
/// Most bytes of a member or file read into memory to be analysed whole.
pub const MAX_IN_MEMORY: u64 = 512 << 20;
/// Most zip or tar entries.
pub const MAX_ENTRIES: usize = 200_000;

/// Random access to the bytes of a file or of a member held in memory, so a
/// multi-gigabyte checkpoint is read only where its directory points.
pub trait Source {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Exactly `len` bytes at `offset`, or an error.
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

/// Bytes already in memory (a decompressed or nested member).
pub struct Mem<'a>(pub &'a [u8]);

impl Source for Mem<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..start.checked_add(len)?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))
    }
}

/// A file read with positioned reads.
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// State shared by everything scanned for one top-level file.
#[derive(Debug, Default)]
pub struct Ctx {
    pub sink: Sink,
    /// Bytes decompressed so far (all streams and members).
    pub inflated: u64,
}

impl Ctx {
    pub fn new() -> Self {
        Ctx::default()
    }

    pub fn push(&mut self, rule: &'static str, severity: Severity, message: String, location: String) {
        self.sink.push(Finding::new(rule, severity, message, location));
    }
}

/// "member 'a/b'" for a location, or "" at the top level.
pub(crate) fn at_member(member: &str) -> String {
    if member.is_empty() {
        String::new()
    } else {
        format!("member {}", quote(member))
    }
}

/// `member 'a', offset 12` / `offset 12`.
pub(crate) fn at_offset(member: &str, offset: u64) -> String {
    if member.is_empty() {
        format!("offset {offset}")
    } else {
        format!("member {}, offset {offset}", quote(member))
    }
}

/// Scans a whole file of a container or pickle format. Only what a loader
/// interprets is read: a zip's directory and pickle members, a numpy header.
pub fn scan_path(path: &Path, format: Format) -> io::Result<Vec<Finding>> {
    let src = FileSource::open(path)?;
    let mut ctx = Ctx::new();
    match format {
        Format::Zip => zip::scan(&src, "", 0, &mut ctx)?,
        Format::Tar => tar::scan(&src, "", 0, &mut ctx)?,
        Format::Numpy => numpy::scan(&src, "", &mut ctx)?,
        Format::SevenZip => nested::refuse_7z("", &mut ctx),
        Format::Pickle | Format::TorchLegacy | Format::Gzip | Format::Zlib => {
            if src.len() > MAX_IN_MEMORY {
                return Ok(too_large(format, src.len(), &src, ctx));
            }
            let data = src.read_at(0, usize::try_from(src.len()).unwrap_or(usize::MAX))?;
            nested::dispatch(format, "", &data, 0, &mut ctx);
        }
        _ => nested::dispatch(format, "", &[], 0, &mut ctx),
    }
    Ok(ctx.sink.finish())
}

/// A file over [`MAX_IN_MEMORY`]: a legacy torch file is scanned over its
/// leading pickles (its storages follow them); anything else fails closed.
fn too_large(format: Format, len: u64, src: &FileSource, mut ctx: Ctx) -> Vec<Finding> {
    if format == Format::TorchLegacy
        && let Ok(window) = src.read_at(0, MAX_IN_MEMORY as usize)
    {
        torch::scan_legacy(&window, "", &mut ctx);
        return ctx.sink.finish();
    }
    ctx.push(
        rule::TOO_LARGE,
        Severity::High,
        format!(
            "the {format} file is {len} bytes, more than the {} MiB that are analysed in memory, \
             so it cannot be shown safe; convert the weights to safetensors",
            MAX_IN_MEMORY >> 20
        ),
        String::new(),
    );
    ctx.sink.finish()
}

/// Entry point for cargo-fuzz: any bytes taken as a zip (members analysed,
/// nested archives followed); must never panic or hang.
pub fn fuzz_zip(data: &[u8]) {
    let mut ctx = Ctx::new();
    let _ = zip::scan(&Mem(data), "", 0, &mut ctx);
    let _ = ctx.sink.finish();
}

/// Entry point for cargo-fuzz: any bytes taken as a `.npy` file, and sniffed
/// and dispatched as a member would be.
pub fn fuzz_npy(data: &[u8]) {
    let mut ctx = Ctx::new();
    let _ = numpy::scan(&Mem(data), "", &mut ctx);
    nested::analyse_member("m", data, 0, &mut ctx);
    let _ = ctx.sink.finish();
}

#[cfg(test)]
mod tests;
