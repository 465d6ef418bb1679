//! Tar archives (v7, ustar, GNU long names, pax headers), including the
//! layout of PyTorch's oldest `torch.save` format (members `sys_info`,
//! `pickle`, `storages`, `tensors`).
//!
//! Headers are checksummed and bounds-checked; member names go through the
//! same zip-slip checks as zip members; links and device entries are
//! findings (extracting them redirects later writes); regular members are
//! analysed by content up to the nesting depth.

use std::io;

use super::zip::{check_name, member_path};
use super::{Ctx, MAX_ENTRIES, MAX_IN_MEMORY, Source, at_member, at_offset, nested, rule};
use crate::report::{Severity, quote};

const BLOCK: u64 = 512;
/// Longest GNU long name or pax record block read.
const MAX_META: u64 = 64 * 1024;

/// Whether a 512-byte block is a tar header: ustar magic, or (v7) a valid
/// checksum and a non-empty name.
pub fn looks_like_tar(head: &[u8]) -> bool {
    let Some(block) = head.get(..BLOCK as usize) else {
        return false;
    };
    if block.get(257..262) == Some(b"ustar") {
        return checksum_ok(block);
    }
    block.first().is_some_and(|b| *b != 0) && checksum_ok(block)
}

fn checksum_ok(block: &[u8]) -> bool {
    let Some(stored) = parse_octal(block.get(148..156).unwrap_or(&[])) else {
        return false;
    };
    let sum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(*b)
            }
        })
        .sum();
    sum == stored
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let t: Vec<u8> = field.iter().copied().filter(|b| *b != 0 && *b != b' ').collect();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&t).ok()?, 8).ok()
}

/// A size field: octal, or GNU base-256 when the high bit is set.
fn parse_size(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(b) if b & 0x80 != 0 => field.iter().skip(1).try_fold(u64::from(b & 0x7f), |acc, x| {
            acc.checked_mul(256).map(|v| v | u64::from(*x))
        }),
        _ => parse_octal(field),
    }
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or(&[])).into_owned()
}

/// Walks the headers and analyses each regular member.
pub fn scan(src: &dyn Source, archive: &str, depth: usize, ctx: &mut Ctx) -> io::Result<()> {
    let len = src.len();
    let mut off = 0u64;
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut names: Vec<String> = Vec::new();
    let mut entries = 0usize;
    loop {
        if off + BLOCK > len {
            if off < len {
                malformed(ctx, archive, "the archive ends inside a header", off);
            }
            break;
        }
        let block = src.read_at(off, BLOCK as usize)?;
        if block.iter().all(|b| *b == 0) {
            break;
        }
        entries += 1;
        if entries > MAX_ENTRIES {
            ctx.push(
                rule::TOO_LARGE,
                Severity::High,
                format!("more than {MAX_ENTRIES} tar entries"),
                at_member(archive),
            );
            break;
        }
        if !checksum_ok(&block) {
            malformed(ctx, archive, "a header checksum does not match", off);
            break;
        }
        let Some(mut size) = parse_size(block.get(124..136).unwrap_or(&[])) else {
            malformed(ctx, archive, "a header has an invalid size field", off);
            break;
        };
        if let Some(s) = pax_size.take() {
            size = s;
        }
        let typeflag = block.get(156).copied().unwrap_or(0);
        let data_start = off + BLOCK;
        let Some(next) = size
            .checked_add(BLOCK - 1)
            .map(|s| s / BLOCK * BLOCK)
            .and_then(|s| data_start.checked_add(s))
            .filter(|&n| data_start.checked_add(size).is_some_and(|end| end <= len) && n <= len)
        else {
            malformed(
                ctx,
                archive,
                &format!("a member declares {size} bytes past the end of the archive"),
                off,
            );
            break;
        };
        let mut name = cstr(block.get(..100).unwrap_or(&[]));
        if block.get(257..262) == Some(b"ustar") {
            let prefix = cstr(block.get(345..500).unwrap_or(&[]));
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        if let Some(n) = long_name.take() {
            name = n;
        }
        let link = long_link
            .take()
            .unwrap_or_else(|| cstr(block.get(157..257).unwrap_or(&[])));
        match typeflag {
            b'L' | b'K' | b'x' | b'g' => {
                if size > MAX_META {
                    malformed(ctx, archive, "a long-name or pax header is too large", off);
                    break;
                }
                let meta = src.read_at(data_start, size as usize)?;
                match typeflag {
                    b'L' => long_name = Some(cstr(&meta)),
                    b'K' => long_link = Some(cstr(&meta)),
                    b'x' => {
                        for (key, value) in pax_records(&meta) {
                            match key.as_str() {
                                "path" => long_name = Some(value),
                                "linkpath" => long_link = Some(value),
                                "size" => pax_size = value.parse().ok(),
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {
                let path = member_path(archive, &name);
                let at = at_member(&path);
                check_name(&name, 0, 0, &at, ctx);
                if names.contains(&name) {
                    ctx.push(
                        rule::DIFFERENTIAL,
                        Severity::High,
                        format!("{} appears twice: extraction keeps the last copy", quote(&name)),
                        at.clone(),
                    );
                } else if names.len() < 4096 {
                    names.push(name.clone());
                }
                match typeflag {
                    b'1' | b'2' => ctx.push(
                        rule::LINK,
                        Severity::High,
                        format!(
                            "the member is a {} link to {}; extracting it can redirect later writes \
                             outside the folder",
                            if typeflag == b'1' { "hard" } else { "symbolic" },
                            quote(&link)
                        ),
                        at,
                    ),
                    b'3' | b'4' | b'6' => ctx.push(
                        rule::LINK,
                        Severity::High,
                        "the member is a device or FIFO entry, never part of a model".into(),
                        at,
                    ),
                    b'5' => {}
                    _ => member(src, archive, &name, &path, data_start, size, depth, ctx)?,
                }
            }
        }
        off = next;
    }
    Ok(())
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
fn member(
    src: &dyn Source,
    archive: &str,
    name: &str,
    path: &str,
    start: u64,
    size: u64,
    depth: usize,
    ctx: &mut Ctx,
) -> io::Result<()> {
    // PyTorch's oldest format: `storages` and `tensors` interleave small
    // pickles with raw bytes whose sizes depend on the pickled storage
    // types; torch.load reads them, no pickle VM can walk them alone.
    if archive.is_empty() && (name == "storages" || name == "tensors") {
        ctx.push(
            crate::rule::FORMAT_NOT_ALLOWED,
            Severity::High,
            "a member of PyTorch's pre-1.0 tar format, which interleaves pickles with raw \
             storage bytes and is not analysed; re-save the model with a current torch and \
             convert it to safetensors"
                .into(),
            at_member(path),
        );
        return Ok(());
    }
    if size > MAX_IN_MEMORY {
        ctx.push(
            rule::TOO_LARGE,
            Severity::High,
            format!(
                "the member is {size} bytes, more than the {} MiB analysed in memory",
                MAX_IN_MEMORY >> 20
            ),
            at_member(path),
        );
        return Ok(());
    }
    let data = src.read_at(start, size as usize)?;
    nested::analyse_member(path, &data, depth, ctx);
    Ok(())
}

/// `"<len> key=value\n"` records.
fn pax_records(meta: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = meta;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|b| *b == b' ') else {
            break;
        };
        let Some(n) = std::str::from_utf8(rest.get(..sp).unwrap_or(&[]))
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        let Some(record) = rest.get(sp + 1..n) else { break };
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|b| *b == b'=') {
            let key = String::from_utf8_lossy(record.get(..eq).unwrap_or(&[])).into_owned();
            let value = String::from_utf8_lossy(record.get(eq + 1..).unwrap_or(&[])).into_owned();
            out.push((key, value));
        }
        rest = rest.get(n..).unwrap_or(&[]);
    }
    out
}

fn malformed(ctx: &mut Ctx, archive: &str, what: &str, offset: u64) {
    ctx.push(
        rule::MALFORMED,
        Severity::High,
        format!("the tar archive is malformed: {what}; it cannot be analysed, so it is refused"),
        at_offset(archive, offset),
    );
}
