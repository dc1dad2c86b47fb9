//! The netlink `sock_diag` conversation: one dump request per socket kind, replies read until
//! `NLMSG_DONE`.
//!
//! Requests are built and replies parsed as plain bytes rather than through `#[repr(C)]` structs: the
//! layouts are fixed by the kernel's ABI (`linux/inet_diag.h`, `linux/unix_diag.h`), and reading fields at
//! known offsets with bounds checks means no reply, however short or odd, can make us read past a buffer
//! or panic. The system calls themselves are in `sys::netlink`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{Kind, ListenSocket, SockDiagError};

/// `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The kernel's TCP_LISTEN state, which unix sockets borrow for theirs.
const TCP_LISTEN: u8 = 10;
const NLMSG_HDRLEN: usize = 16;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const UNIX_DIAG_REQ_LEN: usize = 24;
const UNIX_DIAG_MSG_LEN: usize = 16;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_RQLEN: u16 = 4;
/// The top two bits of an attribute's type are flags (nested, byte order), not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Dumps arrive in messages of at most 32 KiB (the kernel's cap for one dump skb); twice that leaves
/// room, and `MSG_TRUNC` tells us if it ever were not enough.
const RECV_BUF: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Family::V4 => "TCP (IPv4)",
            Family::V6 => "TCP (IPv6)",
        }
    }
}

const UNIX_WHAT: &str = "unix";

pub(crate) struct DiagSocket {
    sock: crate::sys::netlink::SockDiagSocket,
}

impl DiagSocket {
    pub(crate) fn open() -> Result<DiagSocket, SockDiagError> {
        // The kernel always answers a dump; a timeout only guards `--watch` against a kernel bug hanging
        // it forever.
        let sock = crate::sys::netlink::SockDiagSocket::open(std::time::Duration::from_secs(10))
            .map_err(SockDiagError::Open)?;
        Ok(DiagSocket { sock })
    }

    pub(crate) fn dump_tcp(
        &self,
        family: Family,
        seq: u32,
    ) -> Result<Vec<ListenSocket>, SockDiagError> {
        let what = family.what();
        let mut found = Vec::new();
        self.dump(&inet_request(family, seq), seq, what, |payload| {
            if let Some(s) = parse_inet(payload, what)? {
                found.push(s);
            }
            Ok(())
        })?;
        Ok(found)
    }

    pub(crate) fn dump_unix(&self, seq: u32) -> Result<Vec<ListenSocket>, SockDiagError> {
        let mut found = Vec::new();
        self.dump(&unix_request(seq), seq, UNIX_WHAT, |payload| {
            if let Some(s) = parse_unix(payload, UNIX_WHAT)? {
                found.push(s);
            }
            Ok(())
        })?;
        Ok(found)
    }

    fn dump(
        &self,
        request: &[u8],
        seq: u32,
        what: &'static str,
        mut each: impl FnMut(&[u8]) -> Result<(), SockDiagError>,
    ) -> Result<(), SockDiagError> {
        self.send(request)
            .map_err(|source| SockDiagError::Send { what, source })?;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self
                .recv(&mut buf)
                .map_err(|source| SockDiagError::Recv { what, source })?;
            let Some(datagram) = buf.get(..n) else {
                return Err(malformed(
                    what,
                    format!("a reply of {n} bytes does not fit in {RECV_BUF}"),
                ));
            };
            if parse_datagram(datagram, seq, what, &mut each)? {
                return Ok(());
            }
        }
    }

    fn send(&self, request: &[u8]) -> io::Result<()> {
        self.sock.send(request)
    }

    /// One datagram from the kernel; returns its full length, which exceeds `buf.len()` if it was cut.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
}

fn malformed(what: &'static str, detail: impl Into<String>) -> SockDiagError {
    SockDiagError::Malformed {
        what,
        detail: detail.into(),
    }
}

fn nlmsg_header(payload_len: usize, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + payload_len;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    // Port 0: let the kernel fill in ours.
    m.extend_from_slice(&0u32.to_ne_bytes());
    m
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for every TCP socket of `family` in state LISTEN.
pub(crate) fn inet_request(family: Family, seq: u32) -> Vec<u8> {
    let mut m = nlmsg_header(INET_DIAG_REQ_V2_LEN, seq);
    m.push(family.af());
    m.push(libc::IPPROTO_TCP as u8);
    // idiag_ext: no extensions; the queue lengths are in the fixed part of the reply.
    m.push(0);
    m.push(0);
    m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // inet_diag_sockid: all zeroes, no filter on addresses, interface or cookie.
    m.resize(NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN, 0);
    m
}

/// `nlmsghdr` + `unix_diag_req` asking for every unix socket in state LISTEN, with name and queue lengths.
/// The socket's inode needs no flag: it is in the fixed part of every reply.
pub(crate) fn unix_request(seq: u32) -> Vec<u8> {
    let mut m = nlmsg_header(UNIX_DIAG_REQ_LEN, seq);
    m.push(libc::AF_UNIX as u8);
    m.push(0);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // udiag_ino 0: every socket, not one.
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN).to_ne_bytes());
    m.resize(NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN, 0);
    m
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// Hands the payload of each `SOCK_DIAG_BY_FAMILY` message of our dump to `each`; returns whether the
/// dump is done.
pub(crate) fn parse_datagram(
    mut rest: &[u8],
    seq: u32,
    what: &'static str,
    each: &mut impl FnMut(&[u8]) -> Result<(), SockDiagError>,
) -> Result<bool, SockDiagError> {
    while !rest.is_empty() {
        let (Some(len), Some(kind), Some(msg_seq)) =
            (u32_at(rest, 0), u16_at(rest, 4), u32_at(rest, 8))
        else {
            return Err(malformed(
                what,
                format!("{} stray bytes after the last message", rest.len()),
            ));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed(
                what,
                format!("a message claims {len} bytes where {} remain", rest.len()),
            ));
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        // A late answer to an earlier request on the same socket is not part of this dump.
        if msg_seq != seq {
            continue;
        }
        match i32::from(kind) {
            libc::NLMSG_DONE => {
                // The dump's own result: negative if it ended in an error rather than at the end.
                return match u32_at(payload, 0).map(|v| v as i32) {
                    Some(err) if err < 0 => Err(SockDiagError::Refused {
                        what,
                        source: io::Error::from_raw_os_error(-err),
                    }),
                    _ => Ok(true),
                };
            }
            libc::NLMSG_ERROR => {
                let err = u32_at(payload, 0).map(|v| v as i32).ok_or_else(|| {
                    malformed(what, "an error message too short to hold its error")
                })?;
                // Error 0 is an acknowledgement, which a dump does not end with; a real error does.
                if err != 0 {
                    return Err(SockDiagError::Refused {
                        what,
                        source: io::Error::from_raw_os_error(err.saturating_neg()),
                    });
                }
            }
            libc::NLMSG_OVERRUN => return Err(malformed(what, "the kernel reports lost data")),
            _ if kind == SOCK_DIAG_BY_FAMILY => each(payload)?,
            _ => {}
        }
    }
    Ok(false)
}

/// An `inet_diag_msg` of a listening socket: for a listener, `idiag_rqueue` is the accept queue and
/// `idiag_wqueue` the backlog (not bytes, as they are for a connection).
pub(crate) fn parse_inet(
    msg: &[u8],
    what: &'static str,
) -> Result<Option<ListenSocket>, SockDiagError> {
    if msg.len() < INET_DIAG_MSG_LEN {
        return Err(malformed(
            what,
            format!(
                "a socket message of {} bytes, shorter than inet_diag_msg",
                msg.len()
            ),
        ));
    }
    let (family, state) = (msg[0], msg[1]);
    if state != TCP_LISTEN {
        return Ok(None);
    }
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let short = || malformed(what, "inet_diag_msg cut short");
    let ifindex = u32_at(msg, 40).ok_or_else(short)?;
    let queued = u32_at(msg, 56).ok_or_else(short)?;
    let backlog = u32_at(msg, 60).ok_or_else(short)?;
    let inode = u32_at(msg, 68).ok_or_else(short)?;
    let src = &msg[8..24];
    let (kind, local) = if family == libc::AF_INET as u8 {
        let ip = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        (Kind::Tcp, SocketAddr::V4(SocketAddrV4::new(ip, port)))
    } else if family == libc::AF_INET6 as u8 {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(src);
        let ip = Ipv6Addr::from(octets);
        // Only a link-local address means nothing without its interface; elsewhere the index is noise.
        let scope = if ip.is_unicast_link_local() {
            ifindex
        } else {
            0
        };
        (
            Kind::Tcp6,
            SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)),
        )
    } else {
        return Ok(None);
    };
    Ok(Some(ListenSocket {
        kind,
        local: local.to_string(),
        queued,
        backlog,
        inode: u64::from(inode),
        pid: None,
        process: None,
    }))
}

/// A `unix_diag_msg` with its attributes. Only stream sockets: a listening seqpacket socket has a queue
/// too, but nothing anteroom or the servers it stands for would listen on.
pub(crate) fn parse_unix(
    msg: &[u8],
    what: &'static str,
) -> Result<Option<ListenSocket>, SockDiagError> {
    if msg.len() < UNIX_DIAG_MSG_LEN {
        return Err(malformed(
            what,
            format!(
                "a socket message of {} bytes, shorter than unix_diag_msg",
                msg.len()
            ),
        ));
    }
    let (sock_type, state) = (msg[1], msg[2]);
    if i32::from(sock_type) != libc::SOCK_STREAM || state != TCP_LISTEN {
        return Ok(None);
    }
    let inode = u32_at(msg, 4).ok_or_else(|| malformed(what, "unix_diag_msg cut short"))?;
    let mut name: Option<&[u8]> = None;
    let mut rqlen: Option<(u32, u32)> = None;
    let mut attrs = &msg[UNIX_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0).unwrap_or(0));
        let kind = u16_at(attrs, 2).unwrap_or(0) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return Err(malformed(
                what,
                format!(
                    "an attribute claims {len} bytes where {} remain",
                    attrs.len()
                ),
            ));
        }
        let data = &attrs[4..len];
        match kind {
            UNIX_DIAG_NAME => name = Some(data),
            UNIX_DIAG_RQLEN => {
                let (Some(q), Some(b)) = (u32_at(data, 0), u32_at(data, 4)) else {
                    return Err(malformed(what, "UNIX_DIAG_RQLEN shorter than two counts"));
                };
                rqlen = Some((q, b));
            }
            _ => {}
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    let Some((queued, backlog)) = rqlen else {
        return Err(malformed(
            what,
            format!("no UNIX_DIAG_RQLEN for socket {inode}"),
        ));
    };
    Ok(Some(ListenSocket {
        kind: Kind::Unix,
        local: unix_name(name.unwrap_or(&[])),
        queued,
        backlog,
        inode: u64::from(inode),
        pid: None,
        process: None,
    }))
}

/// A path as bound, or `@name` for an abstract name (whose NULs, like ss, we show as `@`). The kernel
/// may count a path's terminating NUL in its length, so a path ends at its first NUL.
pub(crate) fn unix_name(raw: &[u8]) -> String {
    match raw.split_first() {
        None => String::new(),
        Some((0, abstract_name)) => {
            let shown: Vec<u8> = abstract_name
                .iter()
                .map(|&b| if b == 0 { b'@' } else { b })
                .collect();
            format!("@{}", String::from_utf8_lossy(&shown))
        }
        Some(_) => {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "test";

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&(libc::NLM_F_MULTI as u16).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

    fn inet_msg(
        family: u8,
        state: u8,
        port: u16,
        src: &[u8],
        rq: u32,
        wq: u32,
        ino: u32,
    ) -> Vec<u8> {
        let mut m = vec![0u8; INET_DIAG_MSG_LEN];
        m[0] = family;
        m[1] = state;
        m[4..6].copy_from_slice(&port.to_be_bytes());
        m[8..8 + src.len()].copy_from_slice(src);
        m[40..44].copy_from_slice(&3u32.to_ne_bytes());
        m[56..60].copy_from_slice(&rq.to_ne_bytes());
        m[60..64].copy_from_slice(&wq.to_ne_bytes());
        m[68..72].copy_from_slice(&ino.to_ne_bytes());
        m
    }

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(align4(a.len()), 0);
        a
    }

    fn unix_msg(sock_type: u8, state: u8, ino: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![libc::AF_UNIX as u8, sock_type, state, 0];
        m.extend_from_slice(&ino.to_ne_bytes());
        m.extend_from_slice(&[0u8; 8]);
        for a in attrs {
            m.extend_from_slice(a);
        }
        m
    }

    fn rqlen(q: u32, b: u32) -> Vec<u8> {
        let mut d = q.to_ne_bytes().to_vec();
        d.extend_from_slice(&b.to_ne_bytes());
        attr(UNIX_DIAG_RQLEN, &d)
    }

    fn collect(datagram: &[u8], seq: u32) -> Result<(Vec<Vec<u8>>, bool), SockDiagError> {
        let mut got = Vec::new();
        let done = parse_datagram(datagram, seq, W, &mut |p: &[u8]| {
            got.push(p.to_vec());
            Ok(())
        })?;
        Ok((got, done))
    }

    #[test]
    fn requests_have_the_kernel_abi_sizes_and_fields() {
        let r = inet_request(Family::V6, 7);
        assert_eq!(r.len(), 16 + 56);
        assert_eq!(u32_at(&r, 0), Some(72));
        assert_eq!(u16_at(&r, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u16_at(&r, 6), Some(0x301));
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(r[16], libc::AF_INET6 as u8);
        assert_eq!(r[17], libc::IPPROTO_TCP as u8);
        assert_eq!(u32_at(&r, 20), Some(1 << 10));
        let r = unix_request(3);
        assert_eq!(r.len(), 16 + 24);
        assert_eq!(u32_at(&r, 0), Some(40));
        assert_eq!(r[16], libc::AF_UNIX as u8);
        assert_eq!(u32_at(&r, 20), Some(1 << 10));
        assert_eq!(u32_at(&r, 24), Some(0));
        assert_eq!(u32_at(&r, 28), Some(0x11));
    }

    #[test]
    fn datagram_yields_payloads_until_done() {
        let mut d = message(SOCK_DIAG_BY_FAMILY, 5, b"abc");
        d.extend(message(libc::NLMSG_NOOP as u16, 5, b""));
        d.extend(message(SOCK_DIAG_BY_FAMILY, 4, b"other dump"));
        d.extend(message(SOCK_DIAG_BY_FAMILY, 5, b"defgh"));
        let (got, done) = collect(&d, 5).unwrap();
        assert_eq!(got, vec![b"abc".to_vec(), b"defgh".to_vec()]);
        assert!(!done);
        d.extend(message(libc::NLMSG_DONE as u16, 5, &0i32.to_ne_bytes()));
        d.extend(message(SOCK_DIAG_BY_FAMILY, 5, b"after"));
        let (got, done) = collect(&d, 5).unwrap();
        assert_eq!(got.len(), 2);
        assert!(done);
    }

    #[test]
    fn kernel_errors_become_refusals() {
        let d = message(libc::NLMSG_ERROR as u16, 1, &(-libc::EPERM).to_ne_bytes());
        match collect(&d, 1) {
            Err(SockDiagError::Refused { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EPERM))
            }
            other => panic!("{other:?}"),
        }
        let d = message(libc::NLMSG_DONE as u16, 1, &(-libc::ENOENT).to_ne_bytes());
        assert!(matches!(collect(&d, 1), Err(SockDiagError::Refused { .. })));
        // An acknowledgement is not an error.
        let d = message(libc::NLMSG_ERROR as u16, 1, &0i32.to_ne_bytes());
        assert!(collect(&d, 1).is_ok());
        let d = message(libc::NLMSG_ERROR as u16, 1, b"");
        assert!(matches!(
            collect(&d, 1),
            Err(SockDiagError::Malformed { .. })
        ));
        let d = message(libc::NLMSG_ERROR as u16, 1, &i32::MIN.to_ne_bytes());
        assert!(matches!(collect(&d, 1), Err(SockDiagError::Refused { .. })));
    }

    #[test]
    fn bad_lengths_are_errors_never_panics() {
        let good = message(SOCK_DIAG_BY_FAMILY, 1, b"abcd");
        // Too long for what is there, too short for a header, and a header cut in half.
        let mut long = good.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        let mut short = good.clone();
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        for d in [long, short, huge, good[..10].to_vec()] {
            assert!(matches!(
                collect(&d, 1),
                Err(SockDiagError::Malformed { .. })
            ));
        }
        // Every prefix of a real-looking datagram parses or fails cleanly.
        let mut d = message(
            SOCK_DIAG_BY_FAMILY,
            1,
            &inet_msg(2, 10, 80, &[127, 0, 0, 1], 1, 2, 3),
        );
        d.extend(message(libc::NLMSG_DONE as u16, 1, &0i32.to_ne_bytes()));
        for cut in 0..=d.len() {
            let _ = parse_datagram(&d[..cut], 1, W, &mut |p: &[u8]| {
                parse_inet(p, W).map(|_| ())
            });
        }
    }

    #[test]
    fn inet_messages_give_address_queue_and_backlog() {
        let m = inet_msg(libc::AF_INET as u8, 10, 8000, &[127, 0, 0, 1], 5, 7, 99);
        let s = parse_inet(&m, W).unwrap().unwrap();
        assert_eq!(s.kind, Kind::Tcp);
        assert_eq!(s.local, "127.0.0.1:8000");
        assert_eq!((s.queued, s.backlog, s.inode), (5, 7, 99));

        let loopback = Ipv6Addr::LOCALHOST.octets();
        let m = inet_msg(libc::AF_INET6 as u8, 10, 80, &loopback, 0, 4096, 1);
        let s = parse_inet(&m, W).unwrap().unwrap();
        assert_eq!(s.kind, Kind::Tcp6);
        assert_eq!(s.local, "[::1]:80");

        let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
        let m = inet_msg(libc::AF_INET6 as u8, 10, 80, &link_local.octets(), 0, 1, 1);
        assert_eq!(parse_inet(&m, W).unwrap().unwrap().local, "[fe80::1%3]:80");

        // Not listening, or a family we do not know: skipped, not an error.
        let m = inet_msg(libc::AF_INET as u8, 1, 80, &[127, 0, 0, 1], 0, 0, 1);
        assert!(parse_inet(&m, W).unwrap().is_none());
        let m = inet_msg(99, 10, 80, &[127, 0, 0, 1], 0, 0, 1);
        assert!(parse_inet(&m, W).unwrap().is_none());
        // Longer (attributes follow) is fine; shorter is malformed.
        let mut m = inet_msg(libc::AF_INET as u8, 10, 1, &[0, 0, 0, 0], 0, 1, 1);
        m.extend(attr(8, b"\x00"));
        assert_eq!(parse_inet(&m, W).unwrap().unwrap().local, "0.0.0.0:1");
        assert!(parse_inet(&m[..71], W).is_err());
    }

    #[test]
    fn unix_messages_give_name_queue_and_backlog() {
        let m = unix_msg(
            1,
            10,
            1234,
            &[attr(UNIX_DIAG_NAME, b"/run/x.sock\0"), rqlen(4, 9)],
        );
        let s = parse_unix(&m, W).unwrap().unwrap();
        assert_eq!(s.kind, Kind::Unix);
        assert_eq!(s.local, "/run/x.sock");
        assert_eq!((s.queued, s.backlog, s.inode), (4, 9, 1234));

        // Attribute order does not matter, unknown ones are skipped, flag bits in the type are ignored.
        let m = unix_msg(
            1,
            10,
            1,
            &[
                rqlen(0, 128),
                attr(7, &[1, 2, 3, 4, 5]),
                attr(UNIX_DIAG_NAME | 0x8000, b"\0my\0name"),
            ],
        );
        assert_eq!(parse_unix(&m, W).unwrap().unwrap().local, "@my@name");

        // Seqpacket, or not listening: skipped.
        assert!(parse_unix(&unix_msg(5, 10, 1, &[rqlen(0, 1)]), W)
            .unwrap()
            .is_none());
        assert!(parse_unix(&unix_msg(1, 1, 1, &[rqlen(0, 1)]), W)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_unix_messages_are_errors() {
        assert!(parse_unix(&[1, 1, 10], W).is_err());
        // No queue lengths.
        assert!(parse_unix(&unix_msg(1, 10, 1, &[attr(UNIX_DIAG_NAME, b"/x")]), W).is_err());
        // Queue lengths too short.
        assert!(parse_unix(&unix_msg(1, 10, 1, &[attr(UNIX_DIAG_RQLEN, &[0; 4])]), W).is_err());
        // An attribute longer than what is left, and one shorter than its own header.
        let mut m = unix_msg(1, 10, 1, &[rqlen(0, 1)]);
        m[16..18].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse_unix(&m, W).is_err());
        m[16..18].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse_unix(&m, W).is_err());
        // A trailing fragment shorter than an attribute header is ignored, as the kernel's parser does.
        let mut m = unix_msg(1, 10, 1, &[rqlen(2, 3)]);
        m.extend_from_slice(&[0, 0]);
        assert_eq!(parse_unix(&m, W).unwrap().unwrap().queued, 2);
    }

    #[test]
    fn unix_names() {
        assert_eq!(unix_name(b""), "");
        assert_eq!(unix_name(b"/a/b.sock"), "/a/b.sock");
        assert_eq!(unix_name(b"/a/b.sock\0\0junk"), "/a/b.sock");
        assert_eq!(unix_name(b"\0"), "@");
        assert_eq!(unix_name(b"\0abc"), "@abc");
        assert_eq!(unix_name(b"rel\xffative"), "rel\u{fffd}ative");
    }

    #[test]
    fn the_kernel_answers_a_real_dump() {
        let sock = DiagSocket::open().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let found = sock.dump_tcp(Family::V4, 1).unwrap();
        let want = format!("127.0.0.1:{port}");
        assert!(found.iter().any(|s| s.local == want), "{found:?}");
        // The same socket serves a second dump.
        sock.dump_unix(2).unwrap();
    }
}
