//! Connections to the servers Tern is compared with (nats-server over
//! NATS, mosquitto over MQTT 3.1.1), on the same glommio executors and
//! with the same message bodies as the Tern driver.
//!
//! This module owns the I/O around the sans-I/O codecs in [`crate::nats`]
//! and [`crate::mqtt`]: dialing and the session handshake (NATS: read
//! `INFO`, send `CONNECT` + `PING`, wait for `PONG`; MQTT: `CONNECT`, wait
//! for `CONNACK`), subscribing (NATS: `SUB` + `PING`/`PONG`, so the
//! subscription is known to be in place; MQTT: `SUBSCRIBE` at QoS 1, wait
//! for `SUBACK`), publishing (MQTT at QoS 1, so the server acknowledges
//! every message as Tern does), and a read loop that hands each delivered
//! payload to the scenario and answers what the protocol requires
//! (`PONG` to a server `PING`, `PUBACK` to a QoS 1 delivery).

use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use tern_net::split::{split, ReadHalf, WriteHalf};

use crate::cli::Protocol;
use crate::wire::{dial, with_timeout, WireError};
use crate::{mqtt, nats};

/// Bytes buffered from the server at most; one operation must fit.
const READ_BUF: usize = 256 * 1024;
/// MQTT keep-alive announced in CONNECT; the driver pings at a third of it.
const MQTT_KEEP_ALIVE_SECS: u16 = 60;
/// The one subscription id / packet id a driver connection uses for SUB.
const SUB_ID: u16 = 1;

/// Bytes read from a server, parsed from the front.
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn new() -> ReadBuf {
        ReadBuf {
            data: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more; `Closed` at end of stream.
    async fn fill<R: futures_lite::AsyncRead + Unpin>(&mut self, reader: &mut R) -> Result<(), WireError> {
        if self.end == self.data.len() {
            if self.start == 0 {
                return Err(WireError::Protocol(format!(
                    "server operation larger than {READ_BUF} bytes"
                )));
            }
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = reader.read(&mut self.data[self.end..]).await?;
        if n == 0 {
            return Err(WireError::Closed);
        }
        self.end += n;
        Ok(())
    }
}

/// What the server said, protocol-neutral.
#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    /// A published message reached us; MQTT QoS 1 ones need a PUBACK.
    Delivery {
        payload: &'a [u8],
        puback: Option<u16>,
    },
    /// NATS server `PING`: answer `PONG`.
    Ping,
    /// NATS `PONG`, MQTT `PINGRESP`.
    Pong,
    ConnAck(u8),
    SubAck(Vec<u8>),
    /// MQTT `PUBACK` of our own publish.
    PubAck,
    ServerError(String),
    /// Nothing a driver acts on (`INFO`, `+OK`, other MQTT packets).
    Other,
}

fn next_event(proto: Protocol, buf: &[u8]) -> Result<Option<(Event<'_>, usize)>, WireError> {
    match proto {
        Protocol::Nats => {
            let Some((op, used)) = nats::parse(buf).map_err(|e| WireError::Protocol(e.to_string()))? else {
                return Ok(None);
            };
            let event = match op {
                nats::ServerOp::Msg { payload, .. } => Event::Delivery {
                    payload,
                    puback: None,
                },
                nats::ServerOp::Ping => Event::Ping,
                nats::ServerOp::Pong => Event::Pong,
                nats::ServerOp::Err(text) => Event::ServerError(String::from_utf8_lossy(text).into_owned()),
                nats::ServerOp::Info(_) | nats::ServerOp::Ok => Event::Other,
            };
            Ok(Some((event, used)))
        }
        Protocol::Mqtt => {
            let Some((packet, used)) = mqtt::parse(buf).map_err(|e| WireError::Protocol(e.to_string()))?
            else {
                return Ok(None);
            };
            let event = match packet {
                mqtt::Packet::Publish {
                    qos,
                    packet_id,
                    payload,
                    ..
                } => Event::Delivery {
                    payload,
                    puback: if qos == 1 { packet_id } else { None },
                },
                mqtt::Packet::ConnAck { return_code, .. } => Event::ConnAck(return_code),
                mqtt::Packet::SubAck { return_codes, .. } => Event::SubAck(return_codes.to_vec()),
                mqtt::Packet::PubAck { .. } => Event::PubAck,
                mqtt::Packet::PingResp => Event::Pong,
                mqtt::Packet::Other(_) => Event::Other,
            };
            Ok(Some((event, used)))
        }
        Protocol::Tern => Err(WireError::Protocol("the peer driver does not speak Tern".into())),
    }
}

/// A peer connection during setup: one exchange at a time.
pub struct PeerConn {
    proto: Protocol,
    stream: TcpStream,
    buf: ReadBuf,
}

impl PeerConn {
    /// Dials and completes the session handshake within `timeout`.
    pub async fn open(
        proto: Protocol,
        server: SocketAddr,
        source: Option<Ipv4Addr>,
        client_id: &str,
        timeout: Duration,
    ) -> Result<PeerConn, WireError> {
        with_timeout(timeout, async {
            let stream = dial(server, source)?;
            let mut conn = PeerConn {
                proto,
                stream,
                buf: ReadBuf::new(),
            };
            let mut out = Vec::new();
            match proto {
                Protocol::Nats => {
                    out.extend_from_slice(nats::CONNECT);
                    out.extend_from_slice(nats::PING);
                }
                _ => mqtt::encode_connect(&mut out, client_id, MQTT_KEEP_ALIVE_SECS),
            }
            conn.write(&out).await?;
            conn.wait_for(|e| match e {
                Event::Pong if proto == Protocol::Nats => Some(Ok(())),
                Event::ConnAck(0) => Some(Ok(())),
                Event::ConnAck(code) => Some(Err(WireError::Protocol(format!("CONNACK refused: {code}")))),
                _ => None,
            })
            .await?;
            Ok(conn)
        })
        .await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads until `done` returns an outcome; answers server pings.
    async fn wait_for(
        &mut self,
        done: impl Fn(&Event) -> Option<Result<(), WireError>>,
    ) -> Result<(), WireError> {
        loop {
            while let Some((event, used)) = next_event(self.proto, self.buf.pending())? {
                let outcome = match &event {
                    Event::ServerError(text) => {
                        Some(Err(WireError::Protocol(format!("server error: {text}"))))
                    }
                    e => done(e),
                };
                let ping = event == Event::Ping;
                self.buf.consume(used);
                if let Some(outcome) = outcome {
                    return outcome;
                }
                if ping {
                    self.write(nats::PONG).await?;
                }
            }
            self.buf.fill(&mut self.stream).await?;
        }
    }

    /// Subscribes to `subject` and waits until the server confirms it.
    pub async fn subscribe(&mut self, subject: &str) -> Result<(), WireError> {
        let mut out = Vec::new();
        let proto = self.proto;
        match proto {
            Protocol::Nats => {
                nats::encode_sub(&mut out, subject, u64::from(SUB_ID));
                out.extend_from_slice(nats::PING);
            }
            _ => mqtt::encode_subscribe(&mut out, SUB_ID, subject, 1),
        }
        self.write(&out).await?;
        self.wait_for(|e| match e {
            Event::Pong if proto == Protocol::Nats => Some(Ok(())),
            Event::SubAck(codes) if codes.iter().all(|&c| c <= 2) => Some(Ok(())),
            Event::SubAck(codes) => Some(Err(WireError::Protocol(format!("SUBACK refused: {codes:?}")))),
            _ => None,
        })
        .await
    }

    /// Splits into the running halves.
    pub fn into_running(self) -> (PeerReader, Rc<PeerWriter>) {
        let (read, write) = split(self.stream);
        (
            PeerReader {
                proto: self.proto,
                half: read,
                buf: self.buf,
            },
            Rc::new(PeerWriter {
                proto: self.proto,
                lock: Semaphore::new(1),
                half: RefCell::new(Some(write)),
                next_packet_id: Cell::new(1),
            }),
        )
    }
}

/// The read half of a running peer connection.
pub struct PeerReader {
    proto: Protocol,
    half: ReadHalf<TcpStream>,
    buf: ReadBuf,
}

/// The write half, shared by the tasks that send on one connection.
pub struct PeerWriter {
    proto: Protocol,
    lock: Semaphore,
    half: RefCell<Option<WriteHalf<TcpStream>>>,
    next_packet_id: Cell<u16>,
}

impl PeerWriter {
    /// Writes `bytes` whole; writers take turns.
    pub async fn write(&self, bytes: &[u8]) -> Result<(), WireError> {
        let _permit = self
            .lock
            .acquire_permit(1)
            .await
            .map_err(|e| WireError::Protocol(format!("writer lock: {e}")))?;
        let Some(mut half) = self.half.borrow_mut().take() else {
            return Err(WireError::Closed);
        };
        let result = async {
            half.write_all(bytes).await?;
            half.flush().await
        }
        .await;
        *self.half.borrow_mut() = Some(half);
        Ok(result?)
    }

    /// Publishes every payload to `subject` in one write (MQTT: QoS 1).
    pub async fn publish_batch(&self, subject: &str, payloads: &[Vec<u8>]) -> Result<(), WireError> {
        let mut out = Vec::with_capacity(payloads.iter().map(|p| p.len() + subject.len() + 16).sum());
        for payload in payloads {
            match self.proto {
                Protocol::Nats => nats::encode_pub(&mut out, subject, payload),
                _ => {
                    let id = self.next_packet_id.get();
                    // Packet id 0 is not allowed; wrap 65535 → 1.
                    self.next_packet_id.set(id.checked_add(1).unwrap_or(1));
                    mqtt::encode_publish(&mut out, subject, 1, id, payload);
                }
            }
        }
        self.write(&out).await
    }

    /// Keeps an otherwise idle connection alive (MQTT; NATS servers ping
    /// us instead, and the read loop answers). Ends on a failed write.
    pub async fn keep_alive(self: Rc<Self>) -> WireError {
        if self.proto != Protocol::Mqtt {
            return std::future::pending().await;
        }
        let interval = Duration::from_secs(u64::from(MQTT_KEEP_ALIVE_SECS) / 3);
        loop {
            glommio::timer::sleep(interval).await;
            if let Err(e) = self.write(&mqtt::PINGREQ).await {
                return e;
            }
        }
    }
}

/// Reads until the connection ends, handing every delivered payload to
/// `on_payload`, answering NATS `PING`s and acknowledging MQTT QoS 1
/// deliveries (one write per buffer's worth). Returns why it ended.
pub async fn read_deliveries(
    mut reader: PeerReader,
    writer: Rc<PeerWriter>,
    mut on_payload: impl FnMut(&[u8]),
) -> WireError {
    let mut replies = Vec::new();
    loop {
        loop {
            let (event, used) = match next_event(reader.proto, reader.buf.pending()) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(e) => return e,
            };
            match event {
                Event::Delivery { payload, puback } => {
                    on_payload(payload);
                    if let Some(id) = puback {
                        mqtt::encode_puback(&mut replies, id);
                    }
                }
                Event::Ping => replies.extend_from_slice(nats::PONG),
                Event::ServerError(text) => return WireError::Protocol(format!("server error: {text}")),
                _ => {}
            }
            reader.buf.consume(used);
        }
        if !replies.is_empty() {
            if let Err(e) = writer.write(&replies).await {
                return e;
            }
            replies.clear();
        }
        if let Err(e) = reader.buf.fill(&mut reader.half).await {
            return e;
        }
    }
}

/// The subject (NATS) or topic (MQTT) of stream `name` in run `run_id`.
pub fn subject(proto: Protocol, run_id: &str, name: &str) -> String {
    match proto {
        Protocol::Nats => format!("lg.{run_id}.{name}"),
        _ => format!("lg/{run_id}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_protocol_neutral() {
        let (e, used) = next_event(Protocol::Nats, b"MSG a 1 2\r\nhi\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (e, used),
            (
                Event::Delivery {
                    payload: b"hi",
                    puback: None
                },
                15
            )
        );
        let publish = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'];
        let (e, _) = next_event(Protocol::Mqtt, &publish).unwrap().unwrap();
        assert_eq!(
            e,
            Event::Delivery {
                payload: b"hi",
                puback: Some(10)
            }
        );
        assert_eq!(next_event(Protocol::Nats, b"PI").unwrap(), None);
        assert!(next_event(Protocol::Tern, b"").is_err());
        assert_eq!(subject(Protocol::Nats, "r1", "p3"), "lg.r1.p3");
        assert_eq!(subject(Protocol::Mqtt, "r1", "p3"), "lg/r1/p3");
    }
}
