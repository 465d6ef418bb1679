//! Fuzz target for the pickle VM: any byte string, walked as a pickle stream (plain, and as
//! legacy torch / joblib), must be judged without panicking, hanging or
//! allocating from an unchecked length.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    moat_scan::pickle::fuzz_pickle_vm(data);
});
