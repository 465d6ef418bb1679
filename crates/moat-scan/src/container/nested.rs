//! Routes bytes found inside a container (or a whole small file) to the
//! analyser for their format, judged by content, never by member name.
//!
//! Archives inside archives recurse with `depth + 1` up to
//! [`super::MAX_DEPTH`]; deeper nesting is itself a finding (an archive
//! nested that deep exists to exhaust scanners).

use super::compress::{self, Kind};
use super::{Ctx, MAX_DEPTH, Mem, at_member, numpy, rule, tar, torch, zip};
use crate::pickle::{Options, Sink, vm};
use crate::report::{Finding, Severity};
use crate::sniff::Format;

/// Analyses `data` (the content of `member_name`) and appends findings to
/// `out`, capped per rule.
pub fn analyse_bytes(member_name: &str, data: &[u8], depth: usize, out: &mut Vec<Finding>) {
    let mut ctx = Ctx {
        sink: Sink::new(),
        inflated: 0,
    };
    analyse_member(member_name, data, depth, &mut ctx);
    out.extend(ctx.sink.finish());
}

/// Sniffs a member's whole content and dispatches it.
pub(crate) fn analyse_member(member: &str, data: &[u8], depth: usize, ctx: &mut Ctx) {
    let format = crate::sniff::sniff_bytes(data);
    dispatch(format, member, data, depth, ctx);
}

/// Formats judged from a member's first bytes, without reading it whole.
pub(crate) fn partial_ok(format: Format) -> bool {
    matches!(format, Format::Numpy | Format::Safetensors | Format::SevenZip)
}

/// Header-only analysis of a member of `total` bytes whose first bytes are
/// `head`; `read(n)` reads its first `n` bytes (`u64::MAX`: all).
pub(crate) fn analyse_partial(
    format: Format,
    member: &str,
    head: &[u8],
    total: u64,
    depth: usize,
    ctx: &mut Ctx,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) {
    match format {
        Format::Numpy => numpy::check(member, head, total, ctx, read),
        Format::Safetensors => {
            let want = head
                .first_chunk::<8>()
                .map(|b| u64::from_le_bytes(*b))
                .filter(|&n| n <= crate::safetensors::MAX_HEADER_LEN)
                .map_or(8, |n| n + 8);
            let prefix = if want as usize <= head.len() {
                Some(head.to_vec())
            } else {
                read(want)
            };
            safetensors_findings(member, prefix.as_deref().unwrap_or(head), total, ctx);
        }
        _ => dispatch(format, member, head, depth, ctx),
    }
}

/// Dispatches content of a known format.
pub(crate) fn dispatch(format: Format, member: &str, data: &[u8], depth: usize, ctx: &mut Ctx) {
    let archive = matches!(format, Format::Zip | Format::Tar | Format::Gzip | Format::Zlib);
    if archive && depth > MAX_DEPTH {
        ctx.push(
            rule::DEPTH,
            Severity::High,
            format!(
                "archives are nested more than {MAX_DEPTH} deep; nesting that deep exists to \
                 exhaust scanners, so the innermost content is refused unscanned"
            ),
            at_member(member),
        );
        return;
    }
    match format {
        Format::Pickle => {
            // joblib: NumpyArrayWrapper BUILDs are followed by raw bytes.
            let options = Options {
                max_pickles: None,
                joblib: true,
            };
            vm::walk(data, member, options, &mut ctx.sink);
        }
        Format::TorchLegacy => torch::scan_legacy(data, member, ctx),
        Format::Zip => {
            if let Err(e) = zip::scan(&Mem(data), member, depth + 1, ctx) {
                io_failure(member, &e, ctx);
            }
        }
        Format::Tar => {
            if let Err(e) = tar::scan(&Mem(data), member, depth + 1, ctx) {
                io_failure(member, &e, ctx);
            }
        }
        Format::Gzip | Format::Zlib => {
            let kind = if format == Format::Gzip {
                Kind::Gzip
            } else {
                Kind::Zlib
            };
            if let Ok(inner) = compress::inflate(kind, data, member, ctx) {
                analyse_member(member, &inner, depth + 1, ctx);
            }
        }
        Format::Numpy => numpy::check(member, data, data.len() as u64, ctx, &mut |_| Some(data.to_vec())),
        Format::Safetensors => safetensors_findings(member, data, data.len() as u64, ctx),
        Format::SevenZip => refuse_7z(member, ctx),
        Format::Json | Format::Text => {
            // The same text rules as a top-level file: leaked secrets, HF
            // config rules (remote code, chat templates), template files.
            let name = member.rsplit('!').next().unwrap_or(member);
            let name = name.rsplit('/').next().unwrap_or(name);
            let mut found = crate::secrets::scan_text(data);
            if crate::hf::is_config_file(name) {
                found.extend(crate::hf::check_config(name, Some(data)));
            }
            if crate::hf::is_template_file(name) {
                found.extend(crate::hf::check_template_file(Some(data)));
            }
            extend_at(member, found, ctx);
        }
        Format::Gguf => match crate::gguf::check(std::io::Cursor::new(data)) {
            Ok((_, found)) => extend_at(member, found, ctx),
            Err(e) => io_failure(member, &e, ctx),
        },
        Format::Hdf5 => match crate::keras::check_hdf5(std::io::Cursor::new(data)) {
            Ok(found) => extend_at(member, found, ctx),
            Err(e) => io_failure(member, &e, ctx),
        },
        // No folder context inside an archive: external data cannot be
        // resolved, so any external reference is judged by its location only.
        Format::Onnx => match crate::onnx::check(std::io::Cursor::new(data), None) {
            Ok(found) => extend_at(member, found, ctx),
            Err(e) => unknown_binary(member, &format!(" (not a well-formed ONNX model: {e})"), ctx),
        },
        Format::Unknown => unknown_binary(member, "", ctx),
    }
}

fn unknown_binary(member: &str, detail: &str, ctx: &mut Ctx) {
    ctx.push(
        crate::rule::FORMAT_NOT_ALLOWED,
        Severity::High,
        format!(
            "unrecognised binary data inside an archive{detail} cannot be shown safe; ship \
             safetensors weights instead"
        ),
        at_member(member),
    );
}

fn extend_at(member: &str, found: Vec<Finding>, ctx: &mut Ctx) {
    ctx.sink.extend(found.into_iter().map(|mut f| {
        f.location = join(&at_member(member), &f.location);
        f
    }));
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}, {b}"),
    }
}

fn safetensors_findings(member: &str, prefix: &[u8], total: u64, ctx: &mut Ctx) {
    if let Err(violations) = crate::safetensors::check_header(prefix, total) {
        for v in violations {
            ctx.push(
                v.rule,
                Severity::Critical,
                v.message,
                join(&at_member(member), &v.location),
            );
        }
    }
}

fn io_failure(member: &str, e: &std::io::Error, ctx: &mut Ctx) {
    ctx.push(
        rule::MALFORMED,
        Severity::High,
        format!("the archive cannot be read: {e}"),
        at_member(member),
    );
}

/// 7z archives are recognised but not unpacked.
pub(crate) fn refuse_7z(member: &str, ctx: &mut Ctx) {
    ctx.push(
        rule::SEVEN_ZIP,
        Severity::High,
        "7z archive: moat does not unpack 7z (LZMA, BCJ filters, encryption), so its content \
         cannot be scanned; ship the files unpacked or as safetensors"
            .into(),
        at_member(member),
    );
}

/// A `.keras` zip's `config.json`: Lambda layers and module references
/// ([`crate::keras`]).
pub(crate) fn keras_config(json: &[u8], member: &str, ctx: &mut Ctx) {
    extend_at(member, crate::keras::check_config(json), ctx);
}
