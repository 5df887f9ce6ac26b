//! The content filter on the send path (engine/src/filter.rs): what a
//! text message costs the sending connection's shard when ternd runs with
//! a word list. ASCII bodies are matched as they are; other UTF-8 bodies
//! are lowercased first (into a reused per-thread buffer) so that words
//! match in any script and case. Each result is per message, against a
//! list of 1,000 words.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern_engine::filter::{ContentFilter, FilterCache, FilterMode};

/// Words in the list: enough that the automaton is not trivially small.
const WORDS: usize = 1000;

fn list(dir: &std::path::Path, mode: FilterMode) -> ContentFilter {
    let mut words: Vec<String> = (0..WORDS).map(|n| format!("word{n}")).collect();
    words.push("darn".into());
    words.push("чёрт".into());
    let path = dir.join(format!("{}.txt", mode.name()));
    std::fs::write(&path, words.join("\n")).expect("write the word list");
    ContentFilter::open(&path, mode).expect("load the word list")
}

fn bodies() -> [(&'static str, Vec<u8>); 4] {
    let ascii = "hello there, how was the trip? see you at eight";
    let cyrillic = "привет, как прошла поездка? увидимся в восемь";
    [
        ("ascii_clean_64B", format!("{ascii:<64}").into_bytes()),
        (
            "ascii_match_64B",
            format!("{:<64}", "well DARN, the trip was long").into_bytes(),
        ),
        ("cyrillic_clean_88B", cyrillic.as_bytes().to_vec()),
        (
            "cyrillic_match_88B",
            "ну ЧЁРТ, поездка была долгой и трудной, увы".as_bytes().to_vec(),
        ),
    ]
}

fn filter(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in [FilterMode::Reject, FilterMode::Mask] {
        let filter = list(dir.path(), mode);
        let mut group = c.benchmark_group(format!("filter/{}", mode.name()));
        group.throughput(Throughput::Elements(1));
        let mut cache = FilterCache::default();
        for (name, body) in bodies() {
            let mut scratch = Vec::with_capacity(body.len());
            group.bench_function(name, |b| {
                b.iter(|| {
                    // The body is rewritten in mask mode: start from a copy
                    // in a reused buffer, as a connection does per message.
                    scratch.clear();
                    scratch.extend_from_slice(&body);
                    cache.apply(black_box(&filter), &mut scratch)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, filter);
criterion_main!(benches);
