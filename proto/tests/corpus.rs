//! Replays the fuzz corpus under plain `cargo test`, and explores a little
//! further with proptest on every run.
//!
//! The properties live in `proto/fuzz/checks.rs`, shared with the cargo-fuzz
//! targets so that there is one copy: every file under
//! `proto/tests/corpus/<target>/` (seeds plus what `scripts/fuzz` merged in:
//! inputs that reached new code, and any crash once fixed) must pass them.
//! To rewrite the hand-made seeds after changing the input format:
//! `cargo test -p tern-proto --test corpus -- --ignored write_seed_files`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

use proptest::collection::vec;
use proptest::prelude::*;

use checks::{check_frame_decoder, check_session, frame_decoder_seeds, session_seeds, Input};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

/// Runs `check` over every saved input of `target`; names each failure.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|entry| entry.expect("corpus entry").path()).collect();
    files.sort();
    let mut failed = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if std::panic::catch_unwind(|| check(&bytes)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{} input(s) fail: {failed:#?}", failed.len());
    files.len()
}

#[test]
fn frame_decoder_corpus_passes() {
    let n = replay("frame_decoder", |data| {
        check_frame_decoder(data);
    });
    assert!(
        n >= frame_decoder_seeds().len(),
        "only {n} inputs: corpus missing?"
    );
}

#[test]
fn session_corpus_passes() {
    let n = replay("session", |data| {
        check_session(data);
    });
    assert!(n >= session_seeds().len(), "only {n} inputs: corpus missing?");
}

/// The seeds reach what they are meant to, so the harness is not vacuous:
/// every request kind decodes from the stream, and sessions get past login.
#[test]
fn seeds_exercise_the_checks() {
    let every = checks::every_request().len() + 2;
    for (name, seed) in frame_decoder_seeds() {
        let decoded = check_frame_decoder(&seed);
        if name.starts_with("seed-every-request") {
            assert_eq!(decoded, every, "{name}");
        }
    }
    for (name, seed) in session_seeds() {
        let run = check_session(&seed);
        match name {
            "seed-happy-path" | "seed-failed-login-then-token" | "seed-handed-over" => {
                assert!(run.logged_in && !run.closed, "{name}: {run:?}");
                assert!(run.admitted >= checks::every_request().len(), "{name}: {run:?}");
            }
            _ => assert!(run.closed && run.admitted == 0, "{name}: {run:?}"),
        }
    }
}

#[test]
#[ignore = "rewrites the seed files in proto/tests/corpus"]
fn write_seed_files() {
    for (target, seeds) in [
        ("frame_decoder", frame_decoder_seeds()),
        ("session", session_seeds()),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, seed) in seeds {
            std::fs::write(dir.join(name), seed).expect("write seed");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frame_decoder_survives_random_bytes(data in vec(any::<u8>(), 0..2048)) {
        check_frame_decoder(&data);
    }

    /// Valid frames of every kind, cut at random: each one comes out whole.
    #[test]
    fn frame_decoder_reassembles_valid_streams(
        read_seed in any::<u8>(),
        hand_over in any::<bool>(),
        recipes in vec(vec(any::<u8>(), 0..48), 0..12),
    ) {
        let frames: Vec<_> = recipes
            .iter()
            .enumerate()
            .map(|(n, recipe)| tern_proto::ClientFrame {
                request_id: n as u64,
                body: Input::new(recipe).body(),
            })
            .collect();
        let stream = checks::encode_stream(&frames);
        // The largest limit (mode 4): frames over it are refused, as they must be.
        let fits = frames
            .iter()
            .take_while(|f| checks::encode_stream(std::slice::from_ref(f)).len() <= 8 + 64 * 1024)
            .count();
        let mode = if hand_over { 0x84 } else { 4 };
        let data = [&[mode, read_seed][..], &stream].concat();
        prop_assert_eq!(check_frame_decoder(&data), fits);
    }

    #[test]
    fn session_survives_random_programs(data in vec(any::<u8>(), 0..1024)) {
        check_session(&data);
    }
}
