//! Listening sockets shared by every shard.
//!
//! Each shard binds its own listener to the same address with
//! `SO_REUSEPORT` (glommio's `TcpListener::bind` always sets it), and the
//! kernel spreads incoming connections over them. A port of 0 would give
//! every shard a different port, so [`PortReservation`] first binds (without
//! listening) a `SO_REUSEPORT` socket to learn the concrete port, the shards
//! then bind to that port, and the reservation is dropped.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// A bound, non-listening socket that holds a port for the shards to share.
pub struct PortReservation {
    socket: Socket,
    addr: SocketAddr,
}

impl PortReservation {
    /// Binds `addr` (port 0 picks a free port) with `SO_REUSEPORT`.
    pub fn bind(addr: SocketAddr) -> io::Result<PortReservation> {
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
}
