//! `--proxy-protocol`: the PROXY header a load balancer (HAProxy's `send-proxy`, `send-proxy-v2`) sends
//! before anything else on a connection, read before the first HTTP head.
//!
//! The header says which client the connection carries. It is required on every connection of the HTTP
//! listeners (a plain request is not a header: closed), must be whole within `--header-timeout`, and is
//! believed only from a `--trusted-proxy` peer: from anyone else it is read past and its address ignored,
//! since anyone who can connect could write one. A connection whose header is malformed or late is closed,
//! counted (`anteroom_client_connections_bad_proxy_header_total`) and logged at most once a second; no
//! other connection is affected. The bytes read past the header are the first of the HTTP stream.
//!
//! The codec is [`crate::proxy_protocol`]; this is only its reading, on the front's own [`Socket`].

use std::time::Duration;

use bytes::BytesMut;

use super::conns::ConnHandle;
use super::http::Socket;
use crate::config::TrustedProxy;
use crate::proxy_protocol::{self, Header, Parsed, ProxyError, V2_MAX};
use crate::ratelog::LogLimit;
use crate::request::{is_trusted, Origin};

/// Why a connection was closed before its header was whole.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("{0}")]
    Malformed(#[from] ProxyError),
    #[error("no whole PROXY protocol header within --header-timeout ({0} bytes)")]
    Late(usize),
    /// Closed, silent, or closed by the table to make room: nothing to say.
    #[error("gone")]
    Gone,
}

/// Reads the header on `io`, whose peer and listener `conn` gives; the connection's origin as the header
/// says (if its peer is trusted) and the bytes that followed it, or None when the connection must close.
pub(super) async fn accept<S: Socket>(
    io: &S,
    conn: &Origin,
    trusted: &[TrustedProxy],
    timeout: Duration,
    entry: &ConnHandle,
) -> Option<(Origin, BytesMut)> {
    let mut buf = BytesMut::new();
    let read = tokio::select! {
        r = tokio::time::timeout(timeout, read_header(io, &mut buf)) => r.ok(),
        () = entry.closed() => Some(Err(Failed::Gone)),
    };
    let read = read.unwrap_or(Err(Failed::Late(buf.len())));
    let peer = conn
        .peer
        .map_or_else(|| "unix".to_string(), |p| p.to_string());
    let header = match read {
        Ok(h) => h,
        Err(Failed::Gone | Failed::Late(0)) => return None,
        Err(e) => {
            static BAD: LogLimit = LogLimit::per_second();
            entry.bad_proxy_header();
            if let Some(suppressed) = BAD.check() {
                tracing::warn!(%peer, suppressed, "connection closed: {e}");
            }
            return None;
        }
    };
    if !is_trusted(trusted, conn.peer) {
        static UNTRUSTED: LogLimit = LogLimit::per_second();
        if let Some(suppressed) = UNTRUSTED.check() {
            tracing::warn!(
                %peer,
                suppressed,
                "a PROXY protocol header from a peer that is not a --trusted-proxy: its address is ignored"
            );
        }
        return Some((conn.clone(), buf));
    }
    let origin = match header {
        Header::Proxied {
            source,
            destination,
        } => Origin {
            peer: Some(source),
            local: Some(destination),
            proxied: None,
        },
        Header::Unix => Origin {
            peer: None,
            ..conn.clone()
        },
        Header::Local => conn.clone(),
    };
    Some((origin, buf))
}

/// Reads until `buf` begins with a whole header, which it then holds no more: only what followed it.
async fn read_header<S: Socket>(io: &S, buf: &mut BytesMut) -> Result<Header, Failed> {
    buf.reserve(256);
    loop {
        match proxy_protocol::parse(buf)? {
            Parsed::Complete(h, len) => {
                let _ = buf.split_to(len);
                return Ok(h);
            }
            Parsed::Partial => {}
        }
        if buf.len() >= V2_MAX {
            // The parser refuses before this; a bound of its own all the same.
            return Err(Failed::Malformed(ProxyError::V2TooLong(buf.len())));
        }
        super::http::readable(io).await.map_err(|_| Failed::Gone)?;
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len());
        }
        match io.try_read_buf(buf) {
            Ok(0) if buf.is_empty() => return Err(Failed::Gone),
            Ok(0) => return Err(Failed::Malformed(ProxyError::Truncated(buf.len()))),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Failed::Gone),
        }
    }
}
