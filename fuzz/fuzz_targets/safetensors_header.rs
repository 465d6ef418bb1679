//! Fuzz target for the strict safetensors header parser: any byte string,
//! taken as a whole file, must be judged without panicking, overflowing or
//! allocating from an unchecked length.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    moat_scan::safetensors::fuzz(data);
});
