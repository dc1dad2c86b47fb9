//! A netlink `sock_diag` socket: open it, send a request to the kernel, receive the kernel's replies.
//! Building requests and parsing replies is `sockdiag`'s; this is only the three system calls.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::netlink::{SocketAddrNetlink, SOCK_DIAG};
use rustix::net::sockopt::{set_socket_timeout, Timeout};
use rustix::net::{recvfrom, sendto, socket_with, AddressFamily, RecvFlags, SendFlags};
use rustix::net::{SocketFlags, SocketType};

/// The kernel's end of every netlink conversation: port 0.
const KERNEL: SocketAddrNetlink = SocketAddrNetlink::new(0, 0);

pub struct SockDiagSocket {
    fd: OwnedFd,
}

impl SockDiagSocket {
    /// A new `NETLINK_SOCK_DIAG` socket whose receives fail after `recv_timeout`.
    pub fn open(recv_timeout: Duration) -> io::Result<SockDiagSocket> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(SOCK_DIAG),
        )?;
        // Best effort: the timeout only guards against a kernel bug.
        let _ = set_socket_timeout(&fd, Timeout::Recv, Some(recv_timeout));
        Ok(SockDiagSocket { fd })
    }

    /// Sends one request to the kernel.
    pub fn send(&self, request: &[u8]) -> io::Result<()> {
        loop {
            match sendto(&self.fd, request, SendFlags::empty(), &KERNEL) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One datagram from the kernel; returns its full length, which exceeds `buf.len()` if it was cut
    /// (`MSG_TRUNC` changes only the length returned, never how much is written).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let (_, len, from) = match recvfrom(&self.fd, &mut *buf, RecvFlags::TRUNC) {
                Ok(r) => r,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            // Any process may send to our netlink port; only the kernel (port 0) speaks for the sockets.
            let from_kernel = match from {
                None => true,
                Some(addr) => SocketAddrNetlink::try_from(addr).is_ok_and(|a| a.pid() == 0),
            };
            if from_kernel {
                return Ok(len);
            }
        }
    }
}
