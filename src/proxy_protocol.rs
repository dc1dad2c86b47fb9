//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer sends first on a connection to
//! say which client it carries, since the connection itself comes from the load balancer.
//!
//! A codec in the manner of [`crate::http1`]: a pure function over the bytes read so far ([`parse`]), which
//! says whether the header is whole, how long it is, and what it says; the front does the reading
//! (`front/proxy.rs`). The header is refused rather than guessed at: a listener that expects one closes a
//! connection whose first bytes are not a valid header (a plain HTTP request included), since believing
//! half a header would let its sender choose the client address. Fuzzed (`fuzz/fuzz_targets/proxy_header.rs`).
//!
//! The specification is HAProxy's `doc/proxy-protocol.txt`. Version 1 is one text line of at most 107 bytes
//! (`PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n`); version 2 is a 16-byte binary head (a 12-byte
//! signature, the version and command, the address family and the length of the rest), the addresses, then
//! TLVs, which are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2's signature, which no text protocol can begin with.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// Version 1's longest line, CRLF included (the specification's own bound).
pub const V1_MAX: usize = 107;
/// The longest version 2 header taken, TLVs included: HAProxy's own TLVs (SSL details, a unique id...) fit
/// well within it, and a connection cannot make anteroom hold more than this before it is refused.
pub const V2_MAX: usize = 4096;

/// What the header says of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy carries a client from `source`, which connected to `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The proxy carries a client of one of its unix sockets: a local client, with no address.
    Unix,
    /// The connection is the proxy's own (version 2 LOCAL: a health check), or the proxy does not know the
    /// client (version 1 UNKNOWN, version 2 UNSPEC): the connection's own peer stands.
    Local,
}

/// How far the bytes read so far go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning: read more.
    Partial,
    /// A whole header of this many bytes; what follows belongs to the protocol it carries.
    Complete(Header, usize),
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection does not begin with a PROXY protocol header")]
    NotProxy,
    #[error("a version 1 header longer than 107 bytes")]
    V1TooLong,
    #[error("a version 1 header with a bad {0}")]
    V1Bad(&'static str),
    #[error("a version 2 header of version {0}, not 2")]
    V2Version(u8),
    #[error("a version 2 header with command {0}, neither LOCAL nor PROXY")]
    V2Command(u8),
    #[error("a version 2 header with address family {0}")]
    V2Family(u8),
    #[error("a version 2 header too short for its addresses ({0} bytes)")]
    V2Short(usize),
    #[error("a version 2 header of {0} bytes, beyond the {V2_MAX} taken")]
    V2TooLong(usize),
    #[error("the connection closed after {0} bytes of a PROXY protocol header")]
    Truncated(usize),
}

/// Reads the header at the start of `buf`, the bytes a connection has sent so far.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.is_empty() {
        return Ok(Parsed::Partial);
    }
    if buf[0] == V1_PREFIX[0] {
        parse_v1(buf)
    } else if buf[0] == V2_SIGNATURE[0] {
        parse_v2(buf)
    } else {
        Err(ProxyError::NotProxy)
    }
}

/// True when `buf` is a beginning of `whole` or begins with it.
fn agrees(buf: &[u8], whole: &[u8]) -> bool {
    let n = buf.len().min(whole.len());
    buf[..n] == whole[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if !agrees(buf, V1_PREFIX) {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    // The first line end decides, so that a longer read never turns a refusal into a header.
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(Parsed::Partial)
        };
    };
    if window[cr] == b'\n' {
        return Err(ProxyError::V1Bad("line end"));
    }
    match buf.get(cr + 1) {
        None if cr + 1 >= V1_MAX => return Err(ProxyError::V1TooLong),
        None => return Ok(Parsed::Partial),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::V1Bad("line end")),
    }
    let line = &buf[..cr];
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Bad("character"))?;
    let rest = line.strip_prefix("PROXY ").ok_or(ProxyError::NotProxy)?;
    let header = v1_fields(rest)?;
    Ok(Parsed::Complete(header, cr + 2))
}

/// The fields after `PROXY `, separated by single spaces.
fn v1_fields(rest: &str) -> Result<Header, ProxyError> {
    // UNKNOWN may be followed by anything (the specification asks the receiver to ignore it).
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        return Ok(Header::Local);
    }
    let mut f = rest.split(' ');
    let family = f.next().unwrap_or("");
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(ProxyError::V1Bad("protocol")),
    };
    let mut addr = || -> Result<IpAddr, ProxyError> {
        let ip: IpAddr = f
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or(ProxyError::V1Bad("address"))?;
        if ip.is_ipv6() != v6 {
            return Err(ProxyError::V1Bad("address"));
        }
        Ok(ip)
    };
    let (src, dst) = (addr()?, addr()?);
    let mut port = || -> Result<u16, ProxyError> {
        let p = f.next().unwrap_or("");
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProxyError::V1Bad("port"));
        }
        p.parse().map_err(|_| ProxyError::V1Bad("port"))
    };
    let (sport, dport) = (port()?, port()?);
    if f.next().is_some() {
        return Err(ProxyError::V1Bad("field count"));
    }
    Ok(Header::Proxied {
        source: SocketAddr::new(src, sport),
        destination: SocketAddr::new(dst, dport),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if !agrees(buf, V2_SIGNATURE) {
        return Err(ProxyError::NotProxy);
    }
    if buf.len() < 16 {
        // The version and command can be judged as soon as they are in.
        if let Some(&vc) = buf.get(12) {
            check_version_command(vc)?;
        }
        return Ok(Parsed::Partial);
    }
    let command = check_version_command(buf[12])?;
    let family = buf[13] >> 4;
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX {
        return Err(ProxyError::V2TooLong(len));
    }
    if buf.len() < len {
        return Ok(Parsed::Partial);
    }
    let body = &buf[16..len];
    let need = match family {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        f => return Err(ProxyError::V2Family(f)),
    };
    if body.len() < need {
        return Err(ProxyError::V2Short(len));
    }
    if command == Command::Local {
        // Addresses, if any, are the proxy's own: ignored.
        return Ok(Parsed::Complete(Header::Local, len));
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let header = match family {
        1 => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[at],
                    body[at + 1],
                    body[at + 2],
                    body[at + 3],
                ))
            };
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 => {
            let ip = |at: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        3 => Header::Unix,
        _ => Header::Local,
    };
    Ok(Parsed::Complete(header, len))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Local,
    Proxy,
}

fn check_version_command(vc: u8) -> Result<Command, ProxyError> {
    if vc >> 4 != 2 {
        return Err(ProxyError::V2Version(vc >> 4));
    }
    match vc & 0x0f {
        0 => Ok(Command::Local),
        1 => Ok(Command::Proxy),
        c => Err(ProxyError::V2Command(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(src: &str, dst: &str) -> Header {
        Header::Proxied {
            source: sa(src),
            destination: sa(dst),
        }
    }

    /// Every prefix of a valid header is Partial, and the whole is Complete with its length.
    fn whole(bytes: &[u8], tail: &[u8]) -> Header {
        for i in 0..bytes.len() {
            assert_eq!(parse(&bytes[..i]), Ok(Parsed::Partial), "prefix {i}");
        }
        let mut all = bytes.to_vec();
        all.extend_from_slice(tail);
        match parse(&all) {
            Ok(Parsed::Complete(h, n)) => {
                assert_eq!(n, bytes.len());
                h
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1() {
        let h = whole(
            b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n",
            b"GET / HTTP/1.1\r\n",
        );
        assert_eq!(h, proxied("192.0.2.1:56324", "198.51.100.1:443"));
        let h = whole(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n", b"");
        assert_eq!(h, proxied("[2001:db8::1]:1", "[::1]:65535"));
        assert_eq!(whole(b"PROXY UNKNOWN\r\n", b"x"), Header::Local);
        assert_eq!(
            whole(b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n", b""),
            Header::Local
        );
    }

    #[test]
    fn v1_refusals() {
        let bad = |s: &[u8]| parse(s).unwrap_err();
        assert_eq!(bad(b"GET / HTTP/1.1\r\n"), ProxyError::NotProxy);
        assert_eq!(bad(b"PROXZ"), ProxyError::NotProxy);
        assert_eq!(
            bad(b"PROXY TCP4 192.0.2.1 ::1 1 2\r\n"),
            ProxyError::V1Bad("address")
        );
        assert_eq!(
            bad(b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n"),
            ProxyError::V1Bad("address")
        );
        assert_eq!(
            bad(b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n"),
            ProxyError::V1Bad("port")
        );
        assert_eq!(
            bad(b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n"),
            ProxyError::V1Bad("port")
        );
        assert_eq!(
            bad(b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n"),
            ProxyError::V1Bad("address")
        );
        assert_eq!(
            bad(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n"),
            ProxyError::V1Bad("field count")
        );
        assert_eq!(
            bad(b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n"),
            ProxyError::V1Bad("protocol")
        );
        assert_eq!(
            bad(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n"),
            ProxyError::V1Bad("line end")
        );
        assert_eq!(
            bad(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX"),
            ProxyError::V1Bad("line end")
        );
        // Found by the fuzzer: a bare LF before the CR is refused whatever follows.
        assert_eq!(bad(b"PROXY \nY \r"), ProxyError::V1Bad("line end"));
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 200]].concat();
        assert_eq!(bad(&long), ProxyError::V1TooLong);
        // Exactly at the bound without its line end: never whole.
        assert_eq!(bad(&long[..V1_MAX]), ProxyError::V1TooLong);
        assert_eq!(parse(&long[..V1_MAX - 1]), Ok(Parsed::Partial));
    }

    fn v2(vc: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(vc);
        v.push(fam);
        v.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_addresses() {
        let body = [192, 0, 2, 1, 198, 51, 100, 1, 0xdc, 0x04, 1, 0xbb];
        let h = whole(&v2(0x21, 0x11, &body), b"GET /");
        assert_eq!(h, proxied("192.0.2.1:56324", "198.51.100.1:443"));
        // TLVs after the addresses are skipped.
        let mut with_tlv = body.to_vec();
        with_tlv.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]);
        let h = whole(&v2(0x21, 0x11, &with_tlv), b"");
        assert_eq!(h, proxied("192.0.2.1:56324", "198.51.100.1:443"));

        let mut b6 = vec![0u8; 36];
        b6[0] = 0x20;
        b6[1] = 0x01;
        b6[15] = 1;
        b6[31] = 1;
        b6[32..34].copy_from_slice(&8080u16.to_be_bytes());
        b6[34..36].copy_from_slice(&80u16.to_be_bytes());
        let h = whole(&v2(0x21, 0x21, &b6), b"");
        assert_eq!(h, proxied("[2001::1]:8080", "[::1]:80"));

        assert_eq!(whole(&v2(0x21, 0x31, &[0u8; 216]), b""), Header::Unix);
        assert_eq!(whole(&v2(0x21, 0x00, &[]), b""), Header::Local);
        // LOCAL: the proxy's own connection, whatever addresses it carries.
        assert_eq!(whole(&v2(0x20, 0x11, &body), b""), Header::Local);
        assert_eq!(whole(&v2(0x20, 0x00, &[]), b""), Header::Local);
    }

    #[test]
    fn v2_refusals() {
        let body = [192, 0, 2, 1, 198, 51, 100, 1, 0, 1, 0, 2];
        let bad = |v: &[u8]| parse(v).unwrap_err();
        assert_eq!(bad(&v2(0x11, 0x11, &body)), ProxyError::V2Version(1));
        assert_eq!(bad(&v2(0x11, 0x11, &body)[..13]), ProxyError::V2Version(1));
        assert_eq!(bad(&v2(0x22, 0x11, &body)), ProxyError::V2Command(2));
        assert_eq!(bad(&v2(0x21, 0x41, &body)), ProxyError::V2Family(4));
        assert_eq!(bad(&v2(0x21, 0x11, &body[..11])), ProxyError::V2Short(27));
        assert_eq!(bad(&v2(0x21, 0x21, &body)), ProxyError::V2Short(28));
        assert_eq!(bad(b"\r\n\r\nX"), ProxyError::NotProxy);
        let mut huge = v2(0x21, 0x11, &body);
        huge[14..16].copy_from_slice(&5000u16.to_be_bytes());
        assert_eq!(bad(&huge), ProxyError::V2TooLong(5016));
    }

    proptest::proptest! {
        /// Never a panic, and a Complete length is within what was given.
        #[test]
        fn any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Ok(Parsed::Complete(_, n)) = parse(&bytes) {
                proptest::prop_assert!(n <= bytes.len());
            }
        }
    }
}
