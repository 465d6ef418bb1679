//! Fuzz target for the numpy header parser: any byte string, read as a .npy file
//! (header dict, object-array pickle, data length), must be judged without
//! panicking or allocating from an unchecked length.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    moat_scan::container::fuzz_npy(data);
});
