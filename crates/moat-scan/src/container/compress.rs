//! Gzip, zlib and raw deflate streams, inflated under bomb limits.
//!
//! A few kilobytes of deflate can expand to gigabytes, so output is counted
//! as it is produced and the stream is abandoned at the first limit: an
//! absolute size per stream ([`super::MAX_INFLATED`]), a total per top-level
//! file ([`super::MAX_INFLATED_TOTAL`]), and a ratio ([`super::MAX_RATIO`])
//! once the output is big enough for a ratio to mean something.

use std::io::Read;

use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

use super::{Ctx, MAX_INFLATED, MAX_INFLATED_TOTAL, MAX_RATIO, RATIO_FLOOR, at_member, rule};
use crate::report::Severity;

/// Which framing the compressed bytes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// RFC 1952; several members are concatenated as `gzip -d` and Python's
    /// gzip module read them.
    Gzip,
    /// RFC 1950 (joblib's default compressor).
    Zlib,
    /// RFC 1951 (zip members).
    Deflate,
}

/// Why inflating stopped early.
#[derive(Debug)]
pub enum Stop {
    /// A limit was reached; a finding was pushed.
    Limit,
    /// The compressed data is corrupt or truncated; a finding was pushed.
    Corrupt,
}

/// Inflates all of `data`, or stops at a limit with a finding.
pub fn inflate(kind: Kind, data: &[u8], member: &str, ctx: &mut Ctx) -> Result<Vec<u8>, Stop> {
    inflate_up_to(kind, data, u64::MAX, member, ctx)
}

/// Inflates at most `want` bytes (for sniffing a member's first bytes), or
/// everything when `want` is `u64::MAX`. Limits apply either way.
pub fn inflate_up_to(
    kind: Kind,
    data: &[u8],
    want: u64,
    member: &str,
    ctx: &mut Ctx,
) -> Result<Vec<u8>, Stop> {
    let mut reader: Box<dyn Read + '_> = match kind {
        Kind::Gzip => Box::new(MultiGzDecoder::new(data)),
        Kind::Zlib => Box::new(ZlibDecoder::new(data)),
        Kind::Deflate => Box::new(DeflateDecoder::new(data)),
    };
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let room = want.saturating_sub(out.len() as u64);
        if room == 0 {
            break;
        }
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if want != u64::MAX && !out.is_empty() {
                    // A prefix read of a member cut short: what we have is
                    // enough to sniff; the full read reports corruption.
                    break;
                }
                ctx.push(
                    rule::MALFORMED,
                    Severity::High,
                    format!(
                        "the {kind:?} stream is corrupt or truncated ({e}); it cannot be \
                         analysed, so it is refused"
                    )
                    .to_lowercase(),
                    at_member(member),
                );
                return Err(Stop::Corrupt);
            }
        };
        let n_taken = (n as u64).min(room) as usize;
        out.extend_from_slice(chunk.get(..n_taken).unwrap_or(&[]));
        ctx.inflated = ctx.inflated.saturating_add(n_taken as u64);
        let produced = out.len() as u64;
        let ratio_hit = produced > RATIO_FLOOR && produced / (data.len() as u64).max(1) > MAX_RATIO;
        if produced > MAX_INFLATED || ctx.inflated > MAX_INFLATED_TOTAL || ratio_hit {
            ctx.push(
                rule::BOMB,
                Severity::High,
                format!(
                    "decompressing {} bytes produced more than {produced} bytes (limits: {} MiB \
                     per stream, {} MiB per file, ratio {MAX_RATIO}:1 above {} MiB): a \
                     decompression bomb, or too large to analyse, so it is refused",
                    data.len(),
                    MAX_INFLATED >> 20,
                    MAX_INFLATED_TOTAL >> 20,
                    RATIO_FLOOR >> 20
                ),
                at_member(member),
            );
            return Err(Stop::Limit);
        }
    }
    Ok(out)
}

/// Whether `head` starts a zlib stream: CM = 8 (deflate), a window of at
/// most 32 KiB, no preset dictionary, a valid header check, and the first
/// bytes inflate without error. The trial inflate matters: `x^` (0x78 0x5e,
/// joblib's level-3 header) is also printable text.
pub fn looks_like_zlib(head: &[u8]) -> bool {
    let [cmf, flg, ..] = head else {
        return false;
    };
    if cmf & 0x0f != 8 || cmf >> 4 > 7 || flg & 0x20 != 0 {
        return false;
    }
    if (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 != 0 {
        return false;
    }
    let mut out = [0u8; 256];
    let mut d = flate2::Decompress::new(true);
    match d.decompress(head, &mut out, flate2::FlushDecompress::None) {
        Ok(_) => d.total_out() > 0 || head.len() < 16,
        Err(_) => false,
    }
}
