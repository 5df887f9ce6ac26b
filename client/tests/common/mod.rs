//! A scripted fake server on a real TCP socket, shared by the test files.
//!
//! `fake_server` starts a thread that accepts one connection and plays a
//! script against it, speaking frames through `tern_proto`'s own encoder and
//! decoder; joining the thread at the end surfaces the script's assertion failures.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use rkyv::rancor::BoxedError;
use rkyv::util::AlignedVec;
use tern_client::{
    ChatMessage, Client, ClientBody, ClientFrame, ClientOptions, Content, ConvId, ServerBody, ServerFrame,
};
use tern_proto::{decode_client, encode_server, FrameBuf, PROTOCOL_VERSION};

pub const IDLE_MS: u32 = 30_000;

/// The server side of one connection.
pub struct Peer {
    pub stream: TcpStream,
    rx: FrameBuf,
}

impl Peer {
    /// The next client frame; panics on EOF or after 5 s.
    pub fn recv(&mut self) -> ClientFrame {
        self.try_recv().expect("client closed the connection")
    }

    pub fn try_recv(&mut self) -> Option<ClientFrame> {
        loop {
            if let Some(body) = self.rx.next_body().unwrap() {
                let archived = decode_client(body).unwrap();
                return Some(rkyv::deserialize::<ClientFrame, BoxedError>(archived).unwrap());
            }
            let slot = self.rx.read_slot().unwrap();
            let n = self.stream.read(slot).unwrap();
            if n == 0 {
                return None;
            }
            self.rx.commit(n);
        }
    }

    pub fn send(&mut self, request_id: u64, body: ServerBody) {
        let mut out = AlignedVec::new();
        encode_server(&ServerFrame { request_id, body }, &mut out, 1 << 20).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    pub fn push(&mut self, body: ServerBody) {
        self.send(0, body);
    }

    /// Answers the handshake, checking what the client sent; returns the client's name.
    pub fn hello(&mut self, max_frame_bytes: u32) -> String {
        let frame = self.recv();
        assert_eq!(frame.request_id, 1, "Hello must be request 1");
        let client_name = match frame.body {
            ClientBody::Hello { version, client_name } => {
                assert_eq!(version, PROTOCOL_VERSION);
                client_name
            }
            other => panic!("first frame was {other:?}"),
        };
        self.send(
            1,
            ServerBody::HelloOk {
                version: PROTOCOL_VERSION,
                max_frame_bytes,
                idle_timeout_ms: IDLE_MS,
            },
        );
        client_name
    }

    /// Blocks until the client hangs up, so the client decides when the socket closes.
    pub fn wait_closed(&mut self) {
        while self.try_recv().is_some() {}
    }
}

pub fn opts(timeout: Duration) -> ClientOptions {
    ClientOptions {
        timeout,
        client_name: "fake-test".into(),
        ..ClientOptions::default()
    }
}

pub fn fake_server(script: impl FnOnce(Peer) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        script(Peer {
            stream,
            rx: FrameBuf::new(1 << 20),
        });
    });
    (addr, handle)
}

/// Connects with a 2 s request timeout to a fake server that runs `script` after the handshake.
pub fn connected(script: impl FnOnce(Peer) + Send + 'static) -> (Client, JoinHandle<()>) {
    let (addr, handle) = fake_server(move |mut peer| {
        assert_eq!(peer.hello(64 * 1024), "fake-test");
        script(peer);
    });
    let client = Client::connect(addr, opts(Duration::from_secs(2))).unwrap();
    (client, handle)
}

pub fn message(from: u64, text: &str) -> ServerBody {
    ServerBody::Message(ChatMessage {
        conv: ConvId::direct(from, 1),
        seq: 7,
        from,
        client_msg_id: 99,
        timestamp_ms: 1234,
        content: Content::text(text),
    })
}
