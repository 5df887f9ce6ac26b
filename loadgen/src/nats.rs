//! A minimal NATS client codec (the plain-text protocol of nats-server),
//! sans I/O: functions that append client operations to a buffer, and a
//! parser that takes one server operation off the front of a buffer.
//!
//! It covers what the comparison drivers use and nothing more: `CONNECT`
//! (verbose and pedantic off, so the server sends no `+OK`), `PUB`, `SUB`,
//! `PING`/`PONG`; from the server `INFO`, `MSG`, `PING`, `PONG`, `+OK` and
//! `-ERR`. Control lines and payloads are bounded so a misbehaving server
//! cannot make the parser buffer without limit.

/// Longest control line accepted (nats-server's own default is 4 KiB).
pub const MAX_CONTROL_LINE: usize = 4096;
/// Largest payload accepted (nats-server's default max_payload is 1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The `CONNECT` a driver sends: no `+OK` acks, no subject checks.
pub const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n";
pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

/// Appends `PUB subject len\r\npayload\r\n`.
pub fn encode_pub(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Appends `SUB subject sid\r\n`.
pub fn encode_sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(sid.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One operation from the server, borrowing from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerOp<'a> {
    Info(&'a [u8]),
    Msg {
        subject: &'a [u8],
        sid: &'a [u8],
        reply_to: Option<&'a [u8]>,
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    Err(&'a [u8]),
}

/// What the server sent that this codec cannot accept.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NatsError {
    #[error("control line longer than {MAX_CONTROL_LINE} bytes")]
    LineTooLong,
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD} limit")]
    PayloadTooLarge(usize),
    #[error("malformed server operation: {0}")]
    Malformed(String),
}

fn malformed(line: &[u8]) -> NatsError {
    NatsError::Malformed(String::from_utf8_lossy(line).into_owned())
}

/// Parses the operation at the front of `buf`: `Ok(None)` when more bytes
/// are needed, else the operation and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(ServerOp<'_>, usize)>, NatsError> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > MAX_CONTROL_LINE {
            Err(NatsError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    if eol > MAX_CONTROL_LINE {
        return Err(NatsError::LineTooLong);
    }
    let line = &buf[..eol];
    let after_line = eol + 2;
    let (verb, rest) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], trim(&line[i + 1..])),
        None => (line, &line[line.len()..]),
    };
    let op = match verb.to_ascii_uppercase().as_slice() {
        b"PING" => ServerOp::Ping,
        b"PONG" => ServerOp::Pong,
        b"+OK" => ServerOp::Ok,
        b"-ERR" => ServerOp::Err(rest),
        b"INFO" => ServerOp::Info(rest),
        b"MSG" => {
            let args: Vec<&[u8]> = rest
                .split(|&b| b == b' ' || b == b'\t')
                .filter(|a| !a.is_empty())
                .collect();
            let (subject, sid, reply_to, len) = match args.as_slice() {
                [subject, sid, len] => (*subject, *sid, None, *len),
                [subject, sid, reply, len] => (*subject, *sid, Some(*reply), *len),
                _ => return Err(malformed(line)),
            };
            let len: usize = std::str::from_utf8(len)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| malformed(line))?;
            if len > MAX_PAYLOAD {
                return Err(NatsError::PayloadTooLarge(len));
            }
            let end = after_line + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(malformed(line));
            }
            let op = ServerOp::Msg {
                subject,
                sid,
                reply_to,
                payload: &buf[after_line..end],
            };
            return Ok(Some((op, end + 2)));
        }
        _ => return Err(malformed(line)),
    };
    Ok(Some((op, after_line)))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    // Byte vectors from the NATS client protocol documentation
    // (docs.nats.io, "Client Protocol").
    #[test]
    fn encodes_as_the_spec_shows() {
        let mut out = Vec::new();
        encode_pub(&mut out, "FOO", b"Hello NATS!");
        assert_eq!(out, b"PUB FOO 11\r\nHello NATS!\r\n");
        out.clear();
        encode_pub(&mut out, "NOTIFY", b"");
        assert_eq!(out, b"PUB NOTIFY 0\r\n\r\n");
        out.clear();
        encode_sub(&mut out, "FOO", 1);
        assert_eq!(out, b"SUB FOO 1\r\n");
        assert!(CONNECT.starts_with(b"CONNECT {") && CONNECT.ends_with(b"}\r\n"));
    }

    #[test]
    fn parses_messages_from_the_spec() {
        let buf = b"MSG FOO.BAR 9 11\r\nHello World\r\n";
        let (op, used) = parse(buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(
            op,
            ServerOp::Msg {
                subject: b"FOO.BAR",
                sid: b"9",
                reply_to: None,
                payload: b"Hello World"
            }
        );
        let buf = b"MSG FOO.BAR 9 GREETING.34 11\r\nHello World\r\nPING\r\n";
        let (op, used) = parse(buf).unwrap().unwrap();
        assert!(matches!(
            op,
            ServerOp::Msg {
                reply_to: Some(b"GREETING.34"),
                payload: b"Hello World",
                ..
            }
        ));
        assert_eq!(parse(&buf[used..]).unwrap(), Some((ServerOp::Ping, 6)));
    }

    #[test]
    fn parses_control_operations() {
        let info = b"INFO {\"server_id\":\"Zk0GQ3JBSrg3oyxCRRlE09\",\"version\":\"2.0.0\"}\r\n";
        match parse(info).unwrap() {
            Some((ServerOp::Info(json), used)) => {
                assert!(json.starts_with(b"{\"server_id\""));
                assert_eq!(used, info.len());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(b"PONG\r\n").unwrap(), Some((ServerOp::Pong, 6)));
        assert_eq!(parse(b"+OK\r\n").unwrap(), Some((ServerOp::Ok, 5)));
        assert_eq!(
            parse(b"-ERR 'Unknown Protocol Operation'\r\n").unwrap(),
            Some((ServerOp::Err(b"'Unknown Protocol Operation'"), 35))
        );
    }

    #[test]
    fn waits_for_whole_operations_and_rejects_garbage() {
        let buf = b"MSG FOO.BAR 9 11\r\nHello World\r\n";
        for cut in 0..buf.len() {
            assert_eq!(parse(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse(b"MSG FOO 1 x\r\n").is_err());
        assert!(parse(b"MSG FOO\r\n").is_err());
        assert!(parse(b"MSG FOO 1 3\r\nabcXY").is_err());
        assert!(parse(b"BOGUS\r\n").is_err());
        assert_eq!(
            parse(format!("MSG A 1 {}\r\n", MAX_PAYLOAD + 1).as_bytes()),
            Err(NatsError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        assert_eq!(parse(&[b'x'; MAX_CONTROL_LINE + 1]), Err(NatsError::LineTooLong));
    }
}
