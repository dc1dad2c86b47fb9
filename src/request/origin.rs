//! Who the client is: the connection's peer, unless a proxy anteroom was told to trust (`--trusted-proxy`)
//! names another one.
//!
//! Behind nginx or a load balancer every connection comes from the proxy, so an app that logs or limits by
//! client address would see one client; the proxy names the real one in a header. Believing that header
//! from anyone would let any client choose its address, so it is believed only from a peer in
//! `--trusted-proxy`, and only in the one header `--forwarded-header` names (`X-Forwarded-For` by default,
//! or RFC 7239's `Forwarded`). Never both: a proxy that sets one passes the other on from its client as it
//! came, and whichever it is would then be a client's word.
//!
//! The address taken is the rightmost one that is not itself trusted (RFC 7239 section 7.4, nginx's
//! `real_ip_recursive on`): each proxy appends the peer it saw, so everything right of the first untrusted
//! address was written by trusted proxies, and everything left of it by whoever that was. An entry that is
//! not an address (`unknown`, an obfuscated `_name`, garbage) ends the walk at the last address known. The
//! scheme (`X-Forwarded-Proto`, `proto=`) is the one the chosen client used, as the same proxy said.
//!
//! A peer that is not trusted changes nothing: its headers reach the worker as they came (the app may log
//! them), but REMOTE_ADDR, the queue's per-client lines and the access log use its own address. This is
//! pure (no I/O): [`resolve`] is called by the HTTP front for each request. The FastCGI front takes
//! REMOTE_ADDR from its web server's params as they are (nginx has already chosen the client).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

use crate::config::{ForwardedHeader, TrustedProxy};

/// Who sent the request and on which listener.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The client: the connection's peer (after a PROXY protocol header), or the address a trusted proxy
    /// named. None for a unix-socket client.
    pub peer: Option<SocketAddr>,
    /// None for a unix-socket listener.
    pub local: Option<SocketAddr>,
    /// Set when the request came through a trusted proxy that said something of its client.
    /// Boxed: a connection's origin never has one, and every connection holds its origin.
    pub proxied: Option<Box<Proxied>>,
}

/// What a trusted proxy said beyond the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// The trusted peer the request came from (None: a unix socket), whom an HTTP worker's
    /// `X-Forwarded-For` names as the last hop, as any proxy would.
    pub hop: Option<SocketAddr>,
    /// The scheme the client used: Some(true) for `https`, Some(false) for `http`, None when not said.
    pub https: Option<bool>,
}

impl Origin {
    /// The address that connected to anteroom, for `X-Forwarded-For` towards HTTP workers.
    pub fn hop(&self) -> Option<SocketAddr> {
        self.proxied.as_ref().map_or(self.peer, |p| p.hop)
    }

    /// True when a trusted proxy said the client used HTTPS.
    pub fn https(&self) -> bool {
        self.proxied.as_ref().and_then(|p| p.https) == Some(true)
    }

    /// A connection's origin as text, for an upgrade that passes the connection to a new process after its
    /// PROXY header was read (`peer=ADDR local=ADDR`, `-` for none). A request's `proxied` part is not
    /// a connection's and is left out.
    pub fn to_note(&self) -> String {
        let addr = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        format!("peer={} local={}", addr(self.peer), addr(self.local))
    }

    /// The origin [`Origin::to_note`] wrote; None for anything else.
    pub fn from_note(note: &[u8]) -> Option<Origin> {
        let text = std::str::from_utf8(note).ok()?;
        let addr = |part: Option<&str>, key: &str| -> Option<Option<SocketAddr>> {
            match part?.strip_prefix(key)? {
                "-" => Some(None),
                a => a.parse().ok().map(Some),
            }
        };
        let mut parts = text.split(' ');
        let peer = addr(parts.next(), "peer=")?;
        let local = addr(parts.next(), "local=")?;
        parts.next().is_none().then_some(Origin {
            peer,
            local,
            proxied: None,
        })
    }
}

/// Whether `peer` (None: a unix socket) is one of `trusted`.
pub fn is_trusted(trusted: &[TrustedProxy], peer: Option<SocketAddr>) -> bool {
    match peer {
        None => trusted.contains(&TrustedProxy::Unix),
        Some(a) => trusted.iter().any(|t| t.contains(a.ip())),
    }
}

/// The request's origin when its connection's peer is trusted and named a client or a scheme; None when
/// the connection's `conn` stands as it is.
pub fn resolve(
    conn: &Origin,
    headers: &HeaderMap,
    trusted: &[TrustedProxy],
    which: ForwardedHeader,
) -> Option<Origin> {
    if trusted.is_empty() || !is_trusted(trusted, conn.peer) {
        return None;
    }
    let (hops, protos) = match which {
        ForwardedHeader::XForwardedFor => {
            let hops: Vec<Option<SocketAddr>> = list(headers, "x-forwarded-for")
                .map(|e| parse_node(e.trim_matches('"')))
                .collect();
            let protos: Vec<Option<bool>> =
                list(headers, "x-forwarded-proto").map(scheme).collect();
            (hops, protos)
        }
        ForwardedHeader::Forwarded => forwarded(headers).into_iter().unzip(),
    };
    if hops.is_empty() && protos.is_empty() {
        return None;
    }
    let mut peer = conn.peer;
    let mut chosen = None;
    for (i, hop) in hops.iter().enumerate().rev() {
        let Some(addr) = *hop else { break };
        peer = Some(addr);
        chosen = Some(i);
        if !is_trusted(trusted, peer) {
            break;
        }
    }
    // The scheme the chosen client used: said beside its address when each proxy appends both, else by the
    // proxy nearest anteroom (the usual single `X-Forwarded-Proto`).
    let https = match chosen {
        Some(i) if protos.len() == hops.len() => protos[i],
        _ => protos.last().copied().flatten(),
    };
    Some(Origin {
        peer,
        local: conn.local,
        proxied: Some(Box::new(Proxied {
            hop: conn.peer,
            https,
        })),
    })
}

/// The comma-separated entries of every `name` header, in order.
fn list<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

fn scheme(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("https") {
        Some(true)
    } else if s.eq_ignore_ascii_case("http") {
        Some(false)
    } else {
        None
    }
}

/// A node as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711`. None for anything else (`unknown`, `_hidden`, garbage). Port 0 when not given.
fn parse_node(s: &str) -> Option<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip: std::net::Ipv6Addr = ip.parse().ok()?;
        let port = match after {
            "" => 0,
            p => port(p.strip_prefix(':')?)?,
        };
        return Some(SocketAddr::new(IpAddr::V6(ip), port));
    }
    let (ip, p) = s.split_once(':')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    Some(SocketAddr::new(IpAddr::V4(ip), port(p)?))
}

/// A port as RFC 7239 writes it (digits; an obfuscated `_port` is not one).
fn port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// Each element of every `Forwarded` header (RFC 7239): its `for=` node and `proto=` scheme.
fn forwarded(headers: &HeaderMap) -> Vec<(Option<SocketAddr>, Option<bool>)> {
    let mut out = Vec::new();
    for value in headers.get_all("forwarded") {
        let Ok(v) = value.to_str() else {
            // A header that cannot be read could hide an element: nothing left of it is believed.
            out.push((None, None));
            continue;
        };
        for element in split_unquoted(v, ',') {
            let (mut node, mut proto) = (None, None);
            for pair in split_unquoted(element, ';') {
                let Some((name, value)) = pair.trim().split_once('=') else {
                    continue;
                };
                let value = unquote(value.trim());
                if name.trim().eq_ignore_ascii_case("for") {
                    node = parse_node(&value);
                } else if name.trim().eq_ignore_ascii_case("proto") {
                    proto = scheme(&value);
                }
            }
            out.push((node, proto));
        }
    }
    out
}

/// `s` split at `sep` outside quoted strings (RFC 7239 quotes IPv6 nodes: `for="[2001:db8::1]:80"`).
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// A token, or a quoted-string without its quotes and escapes.
fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' {
                    chars.next().unwrap_or(c)
                } else {
                    c
                });
            }
            out
        }
        None => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_origin_reads_back_from_its_note() {
        for (peer, local) in [
            (Some("203.0.113.7:4242"), Some("10.0.0.1:8000")),
            (Some("[2001:db8::1]:443"), None),
            (None, None),
        ] {
            let o = Origin {
                peer: peer.map(|p| p.parse().unwrap()),
                local: local.map(|l| l.parse().unwrap()),
                proxied: None,
            };
            let back = Origin::from_note(o.to_note().as_bytes()).unwrap();
            assert_eq!(
                (back.peer, back.local),
                (o.peer, o.local),
                "{}",
                o.to_note()
            );
        }
        for bad in [
            "",
            "peer=1.2.3.4:5",
            "peer=x local=-",
            "peer=- local=- more",
            "local=- peer=-",
        ] {
            assert!(Origin::from_note(bad.as_bytes()).is_none(), "{bad}");
        }
        let longest = "peer=[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535 local=[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535";
        assert!(longest.len() <= crate::upgrade::MAX_NOTE);
    }
    use http::HeaderValue;

    fn trusted(list: &[&str]) -> Vec<TrustedProxy> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn conn(peer: &str) -> Origin {
        Origin {
            peer: Some(peer.parse().unwrap()),
            local: Some("127.0.0.1:8000".parse().unwrap()),
            proxied: None,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    /// The client address (and whether HTTPS) for a request from `peer` with `pairs`.
    fn client(
        peer: &str,
        pairs: &[(&'static str, &'static str)],
        t: &[&str],
        which: ForwardedHeader,
    ) -> (String, bool) {
        let c = conn(peer);
        let o = resolve(&c, &headers(pairs), &trusted(t), which).unwrap_or(c);
        (o.peer.unwrap().to_string(), o.https())
    }

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;
    const FWD: ForwardedHeader = ForwardedHeader::Forwarded;

    #[test]
    fn trusted_proxy_syntax() {
        let t = |s: &str| s.parse::<TrustedProxy>();
        assert_eq!(t("unix"), Ok(TrustedProxy::Unix));
        assert_eq!(t("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(t("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(t("::1").unwrap().to_string(), "::1/128");
        assert_eq!(t("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert!(t("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(t("10.0.0.0/33").is_err());
        assert!(t("fd00::/129").is_err());
        assert!(t("nowhere").is_err());
        let net = t("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(t("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(t("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(!t("fd00::/8").unwrap().contains("fe80::1".parse().unwrap()));
        assert!(!TrustedProxy::Unix.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn untrusted_peers_change_nothing() {
        let h = [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
        ];
        assert_eq!(
            client("192.0.2.9:4000", &h, &[], XFF),
            ("192.0.2.9:4000".into(), false)
        );
        assert_eq!(
            client("192.0.2.9:4000", &h, &["10.0.0.0/8"], XFF),
            ("192.0.2.9:4000".into(), false)
        );
        let h = [("forwarded", "for=6.6.6.6;proto=https")];
        assert_eq!(
            client("192.0.2.9:4000", &h, &["10.0.0.0/8"], FWD),
            ("192.0.2.9:4000".into(), false)
        );
    }

    #[test]
    fn rightmost_untrusted() {
        let t = ["10.0.0.0/8", "127.0.0.1"];
        let one =
            |xff: &'static str| client("127.0.0.1:5000", &[("x-forwarded-for", xff)], &t, XFF).0;
        assert_eq!(one("203.0.113.7"), "203.0.113.7:0");
        // A client's spoofed entry is left of the one the trusted proxy wrote.
        assert_eq!(one("6.6.6.6, 203.0.113.7"), "203.0.113.7:0");
        assert_eq!(one("6.6.6.6, 203.0.113.7, 10.1.1.1"), "203.0.113.7:0");
        // All trusted: the leftmost, as nginx does.
        assert_eq!(one("10.2.2.2, 10.1.1.1"), "10.2.2.2:0");
        // Garbage ends the walk at the last address known.
        assert_eq!(one("6.6.6.6, unknown"), "127.0.0.1:5000");
        assert_eq!(one("6.6.6.6, unknown, 10.1.1.1"), "10.1.1.1:0");
        assert_eq!(one("203.0.113.7:4711"), "203.0.113.7:4711");
        assert_eq!(one("[2001:db8::1]:4711"), "[2001:db8::1]:4711");
        assert_eq!(one("2001:db8::1"), "[2001:db8::1]:0");
        assert_eq!(one(""), "127.0.0.1:5000");
        // Several header lines are one list, in order.
        let (c, _) = client(
            "127.0.0.1:5000",
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-for", "198.51.100.2"),
            ],
            &t,
            XFF,
        );
        assert_eq!(c, "198.51.100.2:0");
    }

    #[test]
    fn scheme() {
        let t = ["127.0.0.1"];
        let h = [
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
        ];
        assert_eq!(
            client("127.0.0.1:1", &h, &t, XFF),
            ("203.0.113.7:0".into(), true)
        );
        // The proto alone, without an address, still says the scheme.
        let (c, https) = client("127.0.0.1:1", &[("x-forwarded-proto", "HTTPS")], &t, XFF);
        assert_eq!((c.as_str(), https), ("127.0.0.1:1", true));
        // One proto per hop: the chosen client's.
        let h = [
            ("x-forwarded-for", "203.0.113.7, 127.0.0.1"),
            ("x-forwarded-proto", "https, http"),
        ];
        assert_eq!(
            client("127.0.0.1:1", &h, &t, XFF),
            ("203.0.113.7:0".into(), true)
        );
        let h = [
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "gopher"),
        ];
        assert!(!client("127.0.0.1:1", &h, &t, XFF).1);
    }

    #[test]
    fn rfc7239() {
        let t = ["127.0.0.1", "10.0.0.0/8"];
        let one = |v: &'static str| client("127.0.0.1:1", &[("forwarded", v)], &t, FWD);
        assert_eq!(
            one("for=192.0.2.60;proto=https;by=203.0.113.43"),
            ("192.0.2.60:0".into(), true)
        );
        assert_eq!(
            one("For=\"[2001:db8:cafe::17]:4711\""),
            ("[2001:db8:cafe::17]:4711".into(), false)
        );
        assert_eq!(
            one("for=6.6.6.6, for=192.0.2.43;proto=http, for=10.0.0.1"),
            ("192.0.2.43:0".into(), false)
        );
        assert_eq!(
            one("for=6.6.6.6, for=unknown"),
            ("127.0.0.1:1".into(), false)
        );
        assert_eq!(
            one("for=6.6.6.6, for=_hidden"),
            ("127.0.0.1:1".into(), false)
        );
        // A comma or semicolon inside quotes does not split.
        assert_eq!(
            one("for=\"6.6.6.6,\", for=192.0.2.1;x=\"a;b\""),
            ("192.0.2.1:0".into(), false)
        );
        // The X-Forwarded-For of a proxy that sets Forwarded is its client's word.
        let h = [
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-for", "6.6.6.6"),
        ];
        assert_eq!(client("127.0.0.1:1", &h, &t, FWD).0, "192.0.2.1:0");
        let h = [
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "192.0.2.1"),
        ];
        assert_eq!(client("127.0.0.1:1", &h, &t, XFF).0, "192.0.2.1:0");
    }

    #[test]
    fn unix_peers() {
        let c = Origin::default();
        let h = headers(&[("x-forwarded-for", "203.0.113.7")]);
        assert!(resolve(&c, &h, &trusted(&["127.0.0.1"]), XFF).is_none());
        let o = resolve(&c, &h, &trusted(&["unix"]), XFF).unwrap();
        assert_eq!(o.peer, Some("203.0.113.7:0".parse().unwrap()));
        // The hop towards an HTTP worker stays the unix socket: no address.
        assert_eq!(o.hop(), None);
        assert_eq!(
            conn("192.0.2.1:5").hop(),
            Some("192.0.2.1:5".parse().unwrap())
        );
    }

    proptest::proptest! {
        /// Never a panic, whatever the proxy wrote.
        #[test]
        fn any_header(v in "[ -~]{0,80}") {
            let Ok(value) = HeaderValue::from_str(&v) else { return Ok(()) };
            for name in ["x-forwarded-for", "forwarded", "x-forwarded-proto"] {
                let mut h = HeaderMap::new();
                h.insert(name, value.clone());
                for which in [XFF, FWD] {
                    let _ = resolve(&conn("127.0.0.1:1"), &h, &trusted(&["0.0.0.0/0"]), which);
                }
            }
        }
    }
}
