//! Sequences of client frames through `Session::admit` with a server's
//! phase changes; see `check_session` in `proto/fuzz/checks.rs`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_session(data);
});
