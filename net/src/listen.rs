//! Listening sockets shared by every shard.
//!
//! Each shard binds its own listener to the same address with
//! `SO_REUSEPORT` (glommio's `TcpListener::bind` always sets it), and the
//! kernel spreads incoming connections over them. A port of 0 would give
//! every shard a different port, so [`PortReservation`] first binds (without
//! listening) a `SO_REUSEPORT` socket to learn the concrete port, the shards
//! then bind to that port, and the reservation is dropped. `SO_REUSEPORT`
//! would also let the shards share a port with another process of the
//! same user (a second server on the same address, which would get half
//! the new clients), so a fixed port is first probed without it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// A bound, non-listening socket that holds a port for the shards to share.
pub struct PortReservation {
    socket: Socket,
    addr: SocketAddr,
}

impl PortReservation {
    /// Binds `addr` (port 0 picks a free port) with `SO_REUSEPORT`. A
    /// fixed port already listened on, by any process, is `AddrInUse`.
    pub fn bind(addr: SocketAddr) -> io::Result<PortReservation> {
        // A bind without SO_REUSEPORT would also catch another listener,
        // but the kernel refuses it too while the port's connections of a
        // server that just stopped linger (FIN_WAIT, TIME_WAIT), which
        // would make every restart fail: ask the kernel's socket table.
        if addr.port() != 0 && listened_on(addr) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another process already listens on {addr}"),
            ));
        }
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
        Ok(PortReservation { socket, addr })
    }

    /// The concrete address (with the chosen port) the shards should bind.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Releases the port to the shards' listeners.
    pub fn release(self) {
        drop(self.socket);
    }
}

/// Whether a TCP socket of this network namespace listens on `addr`'s
/// port at `addr`'s address, or either of the two is the wildcard, by
/// `/proc/net/tcp` and `/proc/net/tcp6` (a file that cannot be read
/// counts as no listener: the bind itself is then the only check).
fn listened_on(addr: SocketAddr) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .map(|text| text.lines().skip(1).any(|line| listener_matches(line, addr)))
            .unwrap_or(false)
    })
}

/// Whether one line of `/proc/net/tcp{,6}` is a listener that `addr`
/// would share a port with.
fn listener_matches(line: &str, addr: SocketAddr) -> bool {
    const LISTEN: &str = "0A";
    let mut fields = line.split_whitespace();
    let (Some(local), Some(state)) = (fields.nth(1), fields.nth(1)) else {
        return false;
    };
    let Some((ip_hex, port_hex)) = local.split_once(':') else {
        return false;
    };
    if state != LISTEN || u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
        return false;
    }
    let Some(ip) = proc_net_ip(ip_hex) else {
        return false;
    };
    let ours = match addr.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
    };
    ip.is_unspecified() || ours.is_unspecified() || ip == ours
}

/// An address as `/proc/net/tcp{,6}` writes it: 32-bit words in host
/// (little-endian) order, 8 hex digits each. A v4-mapped IPv6 address is
/// returned as its IPv4 address.
fn proc_net_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let digits = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(digits, 16).ok()?.to_le_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(octets);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_picks_a_port_others_can_share() {
        let r = PortReservation::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(r.addr().port(), 0);
        let again = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        again.set_reuse_port(true).unwrap();
        again.bind(&r.addr().into()).unwrap();
        again.listen(16).unwrap();
        r.release();
    }

    #[test]
    fn a_port_another_listener_shares_is_in_use() {
        let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        other.set_reuse_port(true).unwrap();
        other
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        other.listen(16).unwrap();
        let taken = other.local_addr().unwrap().as_socket().unwrap();
        let refused = PortReservation::bind(taken).err().map(|e| e.kind());
        assert_eq!(refused, Some(io::ErrorKind::AddrInUse));
        // Once it is gone, the port is free again.
        drop(other);
        PortReservation::bind(taken).unwrap().release();
    }

    #[test]
    fn proc_net_lines_are_read_as_the_kernel_writes_them() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1061 1";
        let wild = "   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1062 1";
        let connected =
            "   2: 0100007F:1F90 3000007F:8FE6 01 00000000:00000000 00:00000000 00000000     0        0 0 1";
        let v6_any = "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1";
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listener_matches(v4, at("127.0.0.1:8080")));
        assert!(listener_matches(v4, at("0.0.0.0:8080")));
        assert!(!listener_matches(v4, at("127.0.0.2:8080")));
        assert!(!listener_matches(v4, at("127.0.0.1:8081")));
        assert!(listener_matches(wild, at("127.0.0.2:8080")));
        assert!(!listener_matches(connected, at("127.0.0.1:8080")));
        assert!(listener_matches(v6_any, at("127.0.0.1:8080")));
        assert!(listener_matches(v6_any, at("[::1]:8080")));
        for junk in [
            "",
            "sl local",
            "0: zz:1F90 0 0A",
            "0: 0100007F 0 0A",
            "0: 0100007F:1F90 0 0A",
        ] {
            let _ = listener_matches(junk, at("127.0.0.1:8080"));
        }
        assert!(listener_matches("0: 0100007F:1F90 0 0A", at("127.0.0.1:8080")));
        assert_eq!(proc_net_ip("0100007F"), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(
            proc_net_ip("0000000000000000FFFF00000100007F"),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(
            proc_net_ip("00000000000000000000000001000000"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(proc_net_ip("xyz"), None);
    }
}
