//! Cross-shard hand-off: 64-byte messages from a producer executor pinned
//! to CPU 0 to a consumer executor pinned to CPU 1, timed end to end (from
//! the order to the consumer's receipt of the last message), one message
//! per send and 64 per send. glommio's `shared_channel` is what the engine
//! uses between shards; crossbeam's `ArrayQueue` and the disruptor run in
//! the same shape for the record, with polling consumers because neither
//! can wake a sleeping executor: their numbers are what a shard would buy
//! by spinning its core, which a shard-per-core server cannot afford when
//! idle. Each result is per message.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern_bench::queue::{HandOff, Queue, Shape};

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue/handoff_64B");
    group.throughput(Throughput::Elements(1));
    for shape in Shape::ALL {
        for queue in Queue::ALL {
            // One pair of executors per variant, started before and stopped
            // after its measurement, so no other variant's threads compete.
            let mut pair = match HandOff::start(queue, shape) {
                Ok(pair) => pair,
                Err(e) => panic!("{}/{}: {e}", queue.name(), shape.name()),
            };
            let id = format!("{}/{}", queue.name(), shape.name());
            group.bench_function(&id, |b| {
                b.iter_custom(|messages| match pair.run(messages) {
                    Ok(elapsed) => elapsed,
                    Err(e) => panic!("{id}: {e}"),
                })
            });
            if let Err(e) = pair.stop() {
                panic!("{id}: {e}");
            }
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = handoff
}
criterion_main!(benches);
