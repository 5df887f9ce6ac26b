//! A minimal MQTT 3.1.1 client codec, sans I/O: functions that append
//! client packets to a buffer, and a parser that takes one server packet
//! off the front of a buffer.
//!
//! It covers what the comparison drivers use: CONNECT (clean session),
//! SUBSCRIBE, PUBLISH at QoS 0 or 1, PUBACK and PINGREQ; from the server
//! CONNACK, SUBACK, PUBLISH, PUBACK and PINGRESP (anything else is
//! returned as [`Packet::Other`]). Remaining lengths are bounded so a
//! misbehaving server cannot make the parser buffer without limit.

/// Largest packet accepted from the server (remaining length).
pub const MAX_PACKET: usize = 1 << 20;

/// Appends MQTT's variable-length "remaining length" (1 to 4 bytes).
pub fn encode_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

/// Decodes a remaining length at the front of `buf`: `Ok(None)` when more
/// bytes are needed, else the length and how many bytes encoded it.
pub fn decode_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, MqttError> {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        Err(MqttError::Malformed("remaining length over 4 bytes".into()))
    } else {
        Ok(None)
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    // Callers pass short topic names and client ids; longer ones would be
    // a bug in the driver, not input from the network.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s[..usize::from(len)]);
}

/// Appends a CONNECT with a clean session and no will, user or password.
pub fn encode_connect(out: &mut Vec<u8>, client_id: &str, keep_alive_secs: u16) {
    let mut body = Vec::with_capacity(12 + client_id.len());
    put_str(&mut body, b"MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&keep_alive_secs.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    out.push(0x10);
    encode_remaining_length(out, body.len());
    out.extend_from_slice(&body);
}

/// Appends a SUBSCRIBE for one topic filter at `qos`.
pub fn encode_subscribe(out: &mut Vec<u8>, packet_id: u16, topic: &str, qos: u8) {
    out.push(0x82);
    encode_remaining_length(out, 2 + 2 + topic.len() + 1);
    out.extend_from_slice(&packet_id.to_be_bytes());
    put_str(out, topic.as_bytes());
    out.push(qos & 0x03);
}

/// Appends a PUBLISH; `packet_id` is written only for QoS above 0.
pub fn encode_publish(out: &mut Vec<u8>, topic: &str, qos: u8, packet_id: u16, payload: &[u8]) {
    let qos = qos & 0x03;
    out.push(0x30 | (qos << 1));
    let id_len = if qos > 0 { 2 } else { 0 };
    encode_remaining_length(out, 2 + topic.len() + id_len + payload.len());
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a PUBACK.
pub fn encode_puback(out: &mut Vec<u8>, packet_id: u16) {
    out.extend_from_slice(&[0x40, 0x02]);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

pub const PINGREQ: [u8; 2] = [0xc0, 0x00];

/// One packet from the server, borrowing from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    ConnAck {
        session_present: bool,
        return_code: u8,
    },
    SubAck {
        packet_id: u16,
        return_codes: &'a [u8],
    },
    Publish {
        qos: u8,
        packet_id: Option<u16>,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PubAck {
        packet_id: u16,
    },
    PingResp,
    /// Any other packet type (the high nibble of its first byte).
    Other(u8),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    #[error("packet of {0} bytes is over the {MAX_PACKET} limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

fn short(what: &str) -> MqttError {
    MqttError::Malformed(format!("{what} too short"))
}

fn u16_at(body: &[u8], at: usize, what: &str) -> Result<u16, MqttError> {
    body.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| short(what))
}

/// Parses the packet at the front of `buf`: `Ok(None)` when more bytes are
/// needed, else the packet and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, MqttError> {
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let Some((len, len_bytes)) = decode_remaining_length(rest)? else {
        return Ok(None);
    };
    if len > MAX_PACKET {
        return Err(MqttError::TooLarge(len));
    }
    let start = 1 + len_bytes;
    let Some(body) = buf.get(start..start + len) else {
        return Ok(None);
    };
    let packet = match first >> 4 {
        2 => {
            let [flags, return_code] = body else {
                return Err(short("CONNACK"));
            };
            Packet::ConnAck {
                session_present: flags & 1 == 1,
                return_code: *return_code,
            }
        }
        3 => {
            let qos = (first >> 1) & 0x03;
            let topic_len = usize::from(u16_at(body, 0, "PUBLISH")?);
            let topic = body.get(2..2 + topic_len).ok_or_else(|| short("PUBLISH topic"))?;
            let mut at = 2 + topic_len;
            let packet_id = if qos > 0 {
                let id = u16_at(body, at, "PUBLISH packet id")?;
                at += 2;
                Some(id)
            } else {
                None
            };
            Packet::Publish {
                qos,
                packet_id,
                topic,
                payload: &body[at..],
            }
        }
        4 => Packet::PubAck {
            packet_id: u16_at(body, 0, "PUBACK")?,
        },
        9 => Packet::SubAck {
            packet_id: u16_at(body, 0, "SUBACK")?,
            return_codes: &body[2..],
        },
        13 => Packet::PingResp,
        other => Packet::Other(other),
    };
    Ok(Some((packet, start + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The remaining-length table of MQTT 3.1.1, section 2.2.3.
    #[test]
    fn remaining_lengths_match_the_spec_table() {
        let table: [(usize, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
        ];
        for (value, bytes) in table {
            let mut out = Vec::new();
            encode_remaining_length(&mut out, value);
            assert_eq!(out, bytes, "{value}");
            assert_eq!(decode_remaining_length(bytes), Ok(Some((value, bytes.len()))));
        }
        assert_eq!(decode_remaining_length(&[0x80, 0x80]), Ok(None));
        assert!(decode_remaining_length(&[0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }

    #[test]
    fn connect_matches_the_spec_layout() {
        // Section 3.1.2: protocol name 00 04 'M' 'Q' 'T' 'T', level 4,
        // flags (clean session 0x02), keep alive 10 s (00 0A), then the
        // client id as a length-prefixed string.
        let mut out = Vec::new();
        encode_connect(&mut out, "lg", 10);
        assert_eq!(
            out,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 2, b'l', b'g']
        );
    }

    #[test]
    fn subscribe_publish_and_acks_encode() {
        let mut out = Vec::new();
        encode_subscribe(&mut out, 10, "a/b", 1);
        // Section 3.8: fixed header 0x82, packet id, filter, requested QoS.
        assert_eq!(out, [0x82, 8, 0, 10, 0, 3, b'a', b'/', b'b', 1]);
        out.clear();
        encode_publish(&mut out, "a/b", 1, 10, b"hi");
        assert_eq!(out, [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']);
        out.clear();
        encode_publish(&mut out, "a/b", 0, 10, b"hi");
        assert_eq!(out, [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']);
        out.clear();
        encode_puback(&mut out, 0x1234);
        assert_eq!(out, [0x40, 0x02, 0x12, 0x34]);
        assert_eq!(PINGREQ, [0xc0, 0x00]);
    }

    #[test]
    fn server_packets_parse() {
        assert_eq!(
            parse(&[0x20, 0x02, 0x00, 0x00]).unwrap(),
            Some((
                Packet::ConnAck {
                    session_present: false,
                    return_code: 0
                },
                4
            ))
        );
        assert_eq!(
            parse(&[0x90, 0x03, 0x00, 0x0a, 0x01]).unwrap(),
            Some((
                Packet::SubAck {
                    packet_id: 10,
                    return_codes: &[1]
                },
                5
            ))
        );
        assert_eq!(
            parse(&[0x40, 0x02, 0x00, 0x07]).unwrap(),
            Some((Packet::PubAck { packet_id: 7 }, 4))
        );
        assert_eq!(parse(&[0xd0, 0x00]).unwrap(), Some((Packet::PingResp, 2)));
        let publish = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i', 0xd0];
        assert_eq!(
            parse(&publish).unwrap(),
            Some((
                Packet::Publish {
                    qos: 1,
                    packet_id: Some(10),
                    topic: b"a/b",
                    payload: b"hi"
                },
                11
            ))
        );
        for cut in 0..11 {
            assert_eq!(parse(&publish[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert!(parse(&[0x20, 0x01, 0x00]).is_err());
        assert!(parse(&[0x32, 0x03, 0x00, 0x09, b'a']).is_err());
        assert!(parse(&[0x40, 0x00]).is_err());
        assert_eq!(
            parse(&[0x30, 0xff, 0xff, 0x7f]),
            Err(MqttError::TooLarge(2_097_151))
        );
    }
}
