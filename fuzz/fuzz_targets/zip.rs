//! Fuzz target for the zip reader: any byte string, read as a zip with its members
//! analysed (nested archives, pickles, npy), must be judged without panicking,
//! hanging or allocating from an unchecked length.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    moat_scan::container::fuzz_zip(data);
});
