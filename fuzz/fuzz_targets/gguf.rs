//! Fuzz target for the GGUF header parser (and the chat template check it
//! runs on `tokenizer.chat_template*`): any byte string, taken as a whole
//! file, must be judged without panicking, overflowing, hanging or
//! allocating from an unchecked length.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    moat_scan::gguf::fuzz_gguf(data);
});
