//! Frame encode, validate+access, and cutting frames out of a byte stream:
//! the per-message CPU cost every connection pays on both sides of the
//! wire. Each result is per frame.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rkyv::util::AlignedVec;
use tern_bench::frames::{body_of, client_stream, cut_stream, message_push, send_direct, MAX_BODY};
use tern_proto::{decode_client, decode_server, encode_client, encode_server, FrameBuf};

/// Frames in the stream of the `framebuf` benches.
const STREAM_FRAMES: u64 = 1000;
/// Bytes a socket read hands over in the `framebuf` benches.
const SEGMENT: usize = 4096;

/// Encoding into a reused, cleared `AlignedVec`: what the client does per
/// send and the server per push (the buffer's capacity is kept, so this is
/// serialisation and header/padding, not allocation).
fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/encode");
    group.throughput(Throughput::Elements(1));
    let send = send_direct(1);
    let push = message_push(1);
    let mut out = AlignedVec::new();
    group.bench_function("client_send_direct_64B", |b| {
        b.iter(|| {
            out.clear();
            encode_client(black_box(&send), &mut out, MAX_BODY).map(|()| out.len())
        })
    });
    group.bench_function("server_message_push_64B", |b| {
        b.iter(|| {
            out.clear();
            encode_server(black_box(&push), &mut out, MAX_BODY).map(|()| out.len())
        })
    });
    group.finish();
}

/// bytecheck validation plus access to the archived frame in place: what
/// the server pays per received frame before acting on it (no copy, no
/// deserialisation).
fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/decode");
    group.throughput(Throughput::Elements(1));
    let mut client = AlignedVec::new();
    let mut server = AlignedVec::new();
    let encoded = encode_client(&send_direct(1), &mut client, MAX_BODY)
        .and_then(|()| encode_server(&message_push(1), &mut server, MAX_BODY));
    if let Err(e) = encoded {
        panic!("fixture frames do not encode: {e}");
    }
    group.bench_function("client_send_direct_64B", |b| {
        b.iter(|| decode_client(black_box(body_of(&client))).map(|f| f.request_id))
    });
    group.bench_function("server_message_push_64B", |b| {
        b.iter(|| decode_server(black_box(body_of(&server))).map(|f| f.request_id))
    });
    group.finish();
}

/// `FrameBuf` cutting 1000 pipelined SendDirect frames out of a stream that
/// arrives in 4 KiB segments, copying into its own (small) read slot as
/// `tern_net::frame_io::fill` reads into it: the receive-path overhead per
/// frame, without and with validation of each body.
fn framebuf(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/framebuf_4KiB_reads");
    group.throughput(Throughput::Elements(STREAM_FRAMES));
    let stream = match client_stream(STREAM_FRAMES) {
        Ok(stream) => stream,
        Err(e) => panic!("fixture stream does not encode: {e}"),
    };
    let mut buf = FrameBuf::new(MAX_BODY);
    group.bench_function("cut", |b| {
        b.iter(|| cut_stream(&mut buf, black_box(&stream), SEGMENT, false))
    });
    group.bench_function("cut_and_validate", |b| {
        b.iter(|| cut_stream(&mut buf, black_box(&stream), SEGMENT, true))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode, decode, framebuf
}
criterion_main!(benches);
