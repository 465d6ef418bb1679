//! A zip reader written for disagreement, not convenience.
//!
//! It reads an archive the way PyTorch's reader (miniz) does: the end of
//! central directory record (ZIP64 when flagged), then the central
//! directory, CRCs and general-purpose flags ignored, member data located
//! through each local header. Everything on which Python's `zipfile`, miniz
//! and other tools disagree is a finding (CVE-2025-1944/1945/10156 were
//! payloads that one reader saw and another did not): local vs central name
//! or method, encrypted members, bytes before the first member or after the
//! directory, duplicate names, overlapping members, data past the end of the
//! file. Names that escape an extraction folder and symlink entries are
//! findings too. Members are then routed by content ([`super::nested`]);
//! PyTorch storage members (`<root>/data/<n>`) are raw tensor bytes that no
//! loader unpickles, so they are not read at all.

use std::collections::HashSet;
use std::io;

use super::compress::{self, Kind};
use super::{Ctx, MAX_ENTRIES, MAX_IN_MEMORY, Source, at_member, at_offset, nested, rule};
use crate::report::{Severity, quote};

const EOCD_SIG: &[u8; 4] = b"PK\x05\x06";
const EOCD64_LOCATOR_SIG: &[u8; 4] = b"PK\x06\x07";
const EOCD64_SIG: &[u8; 4] = b"PK\x06\x06";
const CENTRAL_SIG: &[u8; 4] = b"PK\x01\x02";
const LOCAL_SIG: &[u8; 4] = b"PK\x03\x04";
const EOCD_LEN: u64 = 22;
const LOCAL_LEN: u64 = 30;
const CENTRAL_LEN: usize = 46;
/// How many leading bytes of a member are inflated to sniff its format.
const SNIFF_LEN: u64 = 4096;

/// One member, as the central directory and its local header describe it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub flags: u16,
    pub method: u16,
    pub compressed: u64,
    pub uncompressed: u64,
    pub local_offset: u64,
    pub made_by: u16,
    pub external_attrs: u32,
    /// Where the member's data starts (after its local header).
    pub data_start: u64,
}

/// Little-endian field reader over a header held in memory.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u16(&self, at: usize) -> u16 {
        self.0
            .get(at..at + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, at: usize) -> u32 {
        self.0
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: usize) -> u64 {
        self.0.get(at..at + 8).map_or(0, |b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    }
}

/// Parses the directory, reports differentials, then analyses the members.
pub fn scan(src: &dyn Source, member: &str, depth: usize, ctx: &mut Ctx) -> io::Result<()> {
    let Some(entries) = read_directory(src, member, ctx)? else {
        return Ok(());
    };
    scan_members(src, &entries, member, depth, ctx);
    Ok(())
}

/// The end of central directory: (entries, directory offset, directory size,
/// EOCD offset). `None` (with a finding) when there is none.
fn find_eocd(src: &dyn Source, member: &str, ctx: &mut Ctx) -> io::Result<Option<(u64, u64, u64, u64)>> {
    let len = src.len();
    if len < EOCD_LEN {
        malformed(
            ctx,
            member,
            "the zip is shorter than its end-of-directory record",
            0,
        );
        return Ok(None);
    }
    let tail_len = len.min(EOCD_LEN + 65_535);
    let tail = src.read_at(len - tail_len, tail_len as usize)?;
    // The last signature wins, as in miniz and Python's zipfile.
    let Some(pos) = tail
        .windows(4)
        .rposition(|w| w == EOCD_SIG)
        .filter(|&p| p as u64 + EOCD_LEN <= tail_len)
    else {
        malformed(ctx, member, "no end-of-central-directory record was found", len);
        return Ok(None);
    };
    let eocd_at = len - tail_len + pos as u64;
    let f = Fields(tail.get(pos..).unwrap_or(&[]));
    let comment_len = u64::from(f.u16(20));
    let record_end = eocd_at + EOCD_LEN + comment_len;
    if record_end != len {
        differential(
            ctx,
            member,
            format!(
                "the end-of-directory record and its comment end at byte {record_end} but the \
                 file has {len} bytes: readers disagree on where the archive ends"
            ),
            eocd_at,
        );
    }
    if f.u16(4) != 0 || f.u16(6) != 0 {
        malformed(ctx, member, "multi-disk (split) zips are not supported", eocd_at);
        return Ok(None);
    }
    let mut entries = u64::from(f.u16(10));
    let mut cd_size = u64::from(f.u32(12));
    let mut cd_offset = u64::from(f.u32(16));
    if entries == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        // ZIP64: the locator sits just before the EOCD record.
        let loc = eocd_at
            .checked_sub(20)
            .and_then(|at| src.read_at(at, 20).ok())
            .filter(|b| b.starts_with(EOCD64_LOCATOR_SIG));
        let Some(loc) = loc else {
            malformed(ctx, member, "ZIP64 values without a ZIP64 locator", eocd_at);
            return Ok(None);
        };
        let at = Fields(&loc).u64(8);
        let rec = src.read_at(at, 56).ok().filter(|b| b.starts_with(EOCD64_SIG));
        let Some(rec) = rec else {
            malformed(ctx, member, "the ZIP64 end-of-directory record is missing", at);
            return Ok(None);
        };
        let f = Fields(&rec);
        entries = f.u64(32);
        cd_size = f.u64(40);
        cd_offset = f.u64(48);
    }
    Ok(Some((entries, cd_offset, cd_size, eocd_at)))
}

/// Reads and checks the central directory and every local header.
pub fn read_directory(src: &dyn Source, member: &str, ctx: &mut Ctx) -> io::Result<Option<Vec<Entry>>> {
    let Some((count, cd_offset, cd_size, eocd_at)) = find_eocd(src, member, ctx)? else {
        return Ok(None);
    };
    if count > MAX_ENTRIES as u64 {
        ctx.push(
            rule::TOO_LARGE,
            Severity::High,
            format!("the zip declares {count} members; the limit is {MAX_ENTRIES}"),
            at_member(member),
        );
        return Ok(None);
    }
    let cd_end = cd_offset.checked_add(cd_size).filter(|&e| e <= eocd_at);
    let Some(cd_end) = cd_end else {
        malformed(
            ctx,
            member,
            &format!("the central directory ({cd_size} bytes at {cd_offset}) lies outside the file"),
            eocd_at,
        );
        return Ok(None);
    };
    if cd_end != eocd_at && !zip64_between(src, cd_end, eocd_at) {
        differential(
            ctx,
            member,
            format!(
                "{} bytes lie between the central directory and its end record (a second \
                 directory or hidden data)",
                eocd_at - cd_end
            ),
            cd_end,
        );
    }
    let cd = src.read_at(cd_offset, cd_size as usize)?;
    let mut entries = Vec::new();
    let mut pos = 0usize;
    for i in 0..count {
        let Some(head) = cd
            .get(pos..pos + CENTRAL_LEN)
            .filter(|h| h.starts_with(CENTRAL_SIG))
        else {
            malformed(
                ctx,
                member,
                &format!("central directory entry {i} is missing or truncated"),
                cd_offset + pos as u64,
            );
            return Ok(None);
        };
        let f = Fields(head);
        let name_len = usize::from(f.u16(28));
        let extra_len = usize::from(f.u16(30));
        let comment_len = usize::from(f.u16(32));
        let name_at = pos + CENTRAL_LEN;
        let (Some(raw_name), Some(extra)) = (
            cd.get(name_at..name_at + name_len),
            cd.get(name_at + name_len..name_at + name_len + extra_len),
        ) else {
            malformed(
                ctx,
                member,
                &format!("central directory entry {i} is truncated"),
                cd_offset + pos as u64,
            );
            return Ok(None);
        };
        let mut entry = Entry {
            name: String::from_utf8_lossy(raw_name).into_owned(),
            flags: f.u16(8),
            method: f.u16(10),
            compressed: u64::from(f.u32(20)),
            uncompressed: u64::from(f.u32(24)),
            local_offset: u64::from(f.u32(42)),
            made_by: f.u16(4),
            external_attrs: f.u32(38),
            data_start: 0,
        };
        apply_zip64_extra(&mut entry, extra);
        pos = name_at + name_len + extra_len + comment_len;
        entries.push(entry);
    }
    if pos as u64 != cd_size {
        differential(
            ctx,
            member,
            format!(
                "the central directory has {} unaccounted bytes after its entries",
                cd_size.saturating_sub(pos as u64)
            ),
            cd_offset + pos as u64,
        );
    }
    check_entries(src, &mut entries, cd_offset, member, ctx)?;
    Ok(Some(entries))
}

fn zip64_between(src: &dyn Source, cd_end: u64, eocd_at: u64) -> bool {
    // A ZIP64 record (56 bytes) and locator (20 bytes) legitimately sit there.
    eocd_at - cd_end == 76 && src.read_at(cd_end, 4).is_ok_and(|b| b == EOCD64_SIG)
}

/// ZIP64 extended information (tag 1): the 0xffffffff fields, in order.
fn apply_zip64_extra(entry: &mut Entry, extra: &[u8]) {
    let mut at = 0usize;
    while let Some(head) = extra.get(at..at + 4) {
        let f = Fields(head);
        let (tag, size) = (f.u16(0), usize::from(f.u16(2)));
        let body = extra.get(at + 4..at + 4 + size).unwrap_or(&[]);
        if tag == 1 {
            let b = Fields(body);
            let mut off = 0;
            for field in [
                &mut entry.uncompressed,
                &mut entry.compressed,
                &mut entry.local_offset,
            ] {
                if *field == 0xffff_ffff && off + 8 <= body.len() {
                    *field = b.u64(off);
                    off += 8;
                }
            }
        }
        at += 4 + size;
    }
}

/// Local headers, ranges, names, flags: every per-member check.
fn check_entries(
    src: &dyn Source,
    entries: &mut [Entry],
    cd_offset: u64,
    member: &str,
    ctx: &mut Ctx,
) -> io::Result<()> {
    let mut names = HashSet::new();
    let mut ranges = Vec::new();
    for e in entries.iter_mut() {
        let at = at_member_in(member, &e.name);
        if !names.insert(e.name.clone()) {
            differential(
                ctx,
                member,
                format!(
                    "{} appears twice: readers differ on which copy they use",
                    quote(&e.name)
                ),
                e.local_offset,
            );
        }
        check_name(&e.name, e.made_by, e.external_attrs, &at, ctx);
        if e.flags & 1 != 0 {
            ctx.push(
                rule::ENCRYPTED,
                Severity::High,
                "the member is encrypted: PyTorch's reader ignores the flag and reads \
                 ciphertext while other tools refuse it, and its content cannot be scanned"
                    .into(),
                at.clone(),
            );
        }
        let local = if e
            .local_offset
            .checked_add(LOCAL_LEN)
            .is_some_and(|end| end <= cd_offset)
        {
            src.read_at(e.local_offset, LOCAL_LEN as usize).ok()
        } else {
            None
        };
        let Some(local) = local.filter(|h| h.starts_with(LOCAL_SIG)) else {
            ctx.push(
                rule::MALFORMED,
                Severity::High,
                format!(
                    "the local header is not at offset {} where the directory points",
                    e.local_offset
                ),
                at,
            );
            e.data_start = u64::MAX;
            continue;
        };
        let f = Fields(&local);
        let (name_len, extra_len) = (u64::from(f.u16(26)), u64::from(f.u16(28)));
        let local_name = src
            .read_at(e.local_offset + LOCAL_LEN, name_len as usize)
            .unwrap_or_default();
        if local_name != e.name.as_bytes() && String::from_utf8_lossy(&local_name) != e.name {
            differential(
                ctx,
                member,
                format!(
                    "the local header names it {} but the central directory {}: tools that read \
                     local headers see a different file than PyTorch",
                    quote(&String::from_utf8_lossy(&local_name)),
                    quote(&e.name)
                ),
                e.local_offset,
            );
        }
        if f.u16(8) != e.method {
            differential(
                ctx,
                member,
                format!(
                    "{}: the local header says compression method {} but the central directory {}",
                    quote(&e.name),
                    f.u16(8),
                    e.method
                ),
                e.local_offset,
            );
        }
        e.data_start = e.local_offset + LOCAL_LEN + name_len + extra_len;
        let end = e.data_start.checked_add(e.compressed);
        match end {
            Some(end) if end <= cd_offset => ranges.push((e.local_offset, end, e.name.clone())),
            _ => {
                ctx.push(
                    rule::MALFORMED,
                    Severity::High,
                    format!(
                        "the member's {} compressed bytes at offset {} run past the central \
                         directory or the end of the file",
                        e.compressed, e.data_start
                    ),
                    at,
                );
                e.data_start = u64::MAX;
            }
        }
    }
    ranges.sort();
    if let Some(&(first, _, _)) = ranges.first()
        && first > 0
    {
        differential(
            ctx,
            member,
            format!("{first} bytes precede the first member (prepended data, a polyglot file)"),
            0,
        );
    }
    for pair in ranges.windows(2) {
        if let [(_, end_a, name_a), (start_b, _, name_b)] = pair
            && start_b < end_a
        {
            differential(
                ctx,
                member,
                format!("members {} and {} overlap", quote(name_a), quote(name_b)),
                *start_b,
            );
        }
    }
    Ok(())
}

/// Zip-slip and link checks shared with tar.
pub(crate) fn check_name(name: &str, made_by: u16, external_attrs: u32, at: &str, ctx: &mut Ctx) {
    if let Some(why) = unsafe_path(name) {
        ctx.push(
            rule::PATH,
            Severity::High,
            format!(
                "the member name {} {why}; extracting it could overwrite files outside the folder",
                quote(name)
            ),
            at.to_owned(),
        );
    }
    // Unix host (3) or any host with Unix mode bits in the high half.
    let mode = external_attrs >> 16;
    if (made_by >> 8 == 3 || mode != 0) && mode & 0o170000 == 0o120000 {
        ctx.push(
            rule::LINK,
            Severity::High,
            "the member is a symbolic link; extracting it can redirect later writes outside the folder"
                .into(),
            at.to_owned(),
        );
    }
}

/// Why a member name is unsafe to extract, if it is.
pub(crate) fn unsafe_path(name: &str) -> Option<&'static str> {
    if name.starts_with('/') {
        return Some("is an absolute path");
    }
    if name.contains('\\') {
        return Some("contains a backslash (a path separator on Windows)");
    }
    let b = name.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return Some("starts with a drive letter");
    }
    if name.split('/').any(|seg| seg == "..") {
        return Some("contains '..'");
    }
    if name.contains('\0') {
        return Some("contains a NUL byte");
    }
    None
}

fn at_member_in(archive: &str, name: &str) -> String {
    if archive.is_empty() {
        format!("member {}", quote(name))
    } else {
        format!("member {} in {}", quote(name), quote(archive))
    }
}

/// The path used for a member in locations of nested findings.
pub(crate) fn member_path(archive: &str, name: &str) -> String {
    if archive.is_empty() {
        name.to_owned()
    } else {
        format!("{archive}!{name}")
    }
}

/// The top folder of a PyTorch zip if it has `<root>/data.pkl`.
fn torch_root(entries: &[Entry]) -> Option<String> {
    entries.iter().find_map(|e| {
        e.name
            .strip_suffix("/data.pkl")
            .filter(|r| !r.contains('/'))
            .map(str::to_owned)
    })
}

fn is_storage(name: &str, root: &Option<String>) -> bool {
    let Some(root) = root else { return false };
    name.strip_prefix(root.as_str())
        .and_then(|r| r.strip_prefix("/data/"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn scan_members(src: &dyn Source, entries: &[Entry], archive: &str, depth: usize, ctx: &mut Ctx) {
    let root = torch_root(entries);
    let keras =
        entries.iter().any(|e| e.name == "config.json") && entries.iter().any(|e| e.name == "metadata.json");
    for e in entries {
        if e.data_start == u64::MAX || e.name.ends_with('/') || is_storage(&e.name, &root) {
            continue;
        }
        let path = member_path(archive, &e.name);
        ctx.sink
            .extend(crate::hf::check_name(&e.name).into_iter().map(|mut f| {
                f.location = at_member(&path);
                f
            }));
        if e.flags & 1 != 0 {
            continue;
        }
        if e.method != 0 && e.method != 8 {
            ctx.push(
                rule::METHOD,
                Severity::High,
                format!(
                    "compression method {} is not analysed (only stored and deflate are), so \
                     the member cannot be shown safe",
                    e.method
                ),
                at_member(&path),
            );
            continue;
        }
        let Some(head) = read_member(src, e, SNIFF_LEN, &path, ctx) else {
            continue;
        };
        let complete = e.uncompressed <= SNIFF_LEN && (head.len() as u64) == e.uncompressed;
        if let Some(format) = crate::sniff::sniff_magic(&head)
            && nested::partial_ok(format)
        {
            nested::analyse_partial(format, &path, &head, e.uncompressed, depth, ctx, &mut |want| {
                read_member(src, e, want, &path, &mut Ctx::new())
            });
            continue;
        }
        // A member that declares a bomb's ratio is refused from the
        // directory alone, without inflating it (a member that lies about
        // its size is still stopped by the streaming limits).
        if e.method != 0
            && e.uncompressed > super::RATIO_FLOOR
            && e.uncompressed / e.compressed.max(1) > super::MAX_RATIO
        {
            ctx.push(
                rule::BOMB,
                Severity::High,
                format!(
                    "the member declares {} bytes from {} compressed (ratio above {}:1): a \
                     decompression bomb, so it is refused without inflating it",
                    e.uncompressed,
                    e.compressed,
                    super::MAX_RATIO
                ),
                at_member(&path),
            );
            continue;
        }
        if !complete && e.uncompressed > MAX_IN_MEMORY {
            ctx.push(
                rule::TOO_LARGE,
                Severity::High,
                format!(
                    "the member is {} bytes, more than the {} MiB analysed in memory, and not a \
                     format checked from its header; it cannot be shown safe",
                    e.uncompressed,
                    MAX_IN_MEMORY >> 20
                ),
                at_member(&path),
            );
            continue;
        }
        let data = if complete {
            Some(head)
        } else {
            read_member(src, e, u64::MAX, &path, ctx)
        };
        let Some(data) = data else { continue };
        if keras && e.name == "config.json" {
            nested::keras_config(&data, &path, ctx);
        }
        nested::analyse_member(&path, &data, depth, ctx);
    }
}

/// Up to `want` bytes of a member's uncompressed data (all with `u64::MAX`).
fn read_member(src: &dyn Source, e: &Entry, want: u64, path: &str, ctx: &mut Ctx) -> Option<Vec<u8>> {
    let io_fail = |ctx: &mut Ctx, err: io::Error| {
        ctx.push(
            rule::MALFORMED,
            Severity::High,
            format!("the member's data cannot be read: {err}"),
            at_member(path),
        );
    };
    if e.method == 0 {
        let n = e.compressed.min(want);
        if n > MAX_IN_MEMORY {
            ctx.push(
                rule::TOO_LARGE,
                Severity::High,
                format!(
                    "the member is {n} bytes, more than the {} MiB analysed in memory",
                    MAX_IN_MEMORY >> 20
                ),
                at_member(path),
            );
            return None;
        }
        return match src.read_at(e.data_start, n as usize) {
            Ok(d) => Some(d),
            Err(err) => {
                io_fail(ctx, err);
                None
            }
        };
    }
    // Deflate: for a prefix, a bounded slice of input yields enough output
    // (stored deflate blocks cost 5 bytes per 64 KiB).
    let input_len = if want == u64::MAX {
        e.compressed
    } else {
        e.compressed.min(want.saturating_mul(2).saturating_add(1024))
    };
    if input_len > MAX_IN_MEMORY {
        ctx.push(
            rule::TOO_LARGE,
            Severity::High,
            format!(
                "the member is {input_len} compressed bytes, more than the {} MiB analysed",
                MAX_IN_MEMORY >> 20
            ),
            at_member(path),
        );
        return None;
    }
    let input = match src.read_at(e.data_start, input_len as usize) {
        Ok(d) => d,
        Err(err) => {
            io_fail(ctx, err);
            return None;
        }
    };
    compress::inflate_up_to(Kind::Deflate, &input, want, path, ctx).ok()
}

fn malformed(ctx: &mut Ctx, member: &str, what: &str, offset: u64) {
    ctx.push(
        rule::MALFORMED,
        Severity::High,
        format!("the zip archive is malformed: {what}; it cannot be analysed, so it is refused"),
        at_offset(member, offset),
    );
}

fn differential(ctx: &mut Ctx, member: &str, what: String, offset: u64) {
    ctx.push(
        rule::DIFFERENTIAL,
        Severity::High,
        format!(
            "zip readers disagree on this archive: {what}; a payload can hide from a scanner \
             that reads it one way while the loader reads it another, so it is refused"
        ),
        at_offset(member, offset),
    );
}
