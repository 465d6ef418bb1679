//! PyTorch's legacy (pre-1.6) `torch.save` format: five pickles back to
//! back — the magic number 0x1950a86a20f9469cfc6c, the protocol version,
//! sys info, the object itself (storages as persistent ids), and the list
//! of storage keys — followed by raw storage bytes that torch reads with
//! `_set_from_file`, never unpickles. So exactly five pickles are walked and
//! the rest is left unread, as torch does. (PyTorch zips are in `zip.rs`;
//! the older tar layout is in `tar.rs`.)

use super::{Ctx, rule};
use crate::pickle::{Options, vm};
use crate::report::Severity;

/// `\x80\x02` LONG1 of the 10-byte magic number, STOP.
pub const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

/// Pickles before the raw storage data.
const LEGACY_PICKLES: usize = 5;

/// Whether a file starts like a legacy torch file.
pub fn is_legacy(head: &[u8]) -> bool {
    head.starts_with(LEGACY_MAGIC)
}

/// Walks the five leading pickles (when `data` is only the start of a big
/// file, a pickle cut off by its end is reported as truncated: fail closed).
pub fn scan_legacy(data: &[u8], member: &str, ctx: &mut Ctx) {
    let options = Options {
        max_pickles: Some(LEGACY_PICKLES),
        joblib: false,
    };
    let walk = vm::walk(data, member, options, &mut ctx.sink);
    if walk.complete && walk.pickles < LEGACY_PICKLES {
        ctx.push(
            rule::MALFORMED,
            Severity::High,
            format!(
                "a legacy PyTorch file holds {LEGACY_PICKLES} pickles before its storages but this \
                 one ends after {}",
                walk.pickles
            ),
            super::at_member(member),
        );
    }
}
