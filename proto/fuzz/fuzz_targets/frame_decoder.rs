//! Arbitrary bytes, read in input-chosen chunks, through `FrameBuf` and both
//! decoders; see `check_frame_decoder` in `proto/fuzz/checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_frame_decoder(data);
});
