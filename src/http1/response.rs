//! The response head: status line, the response's own headers, and the framing and connection headers that
//! are the codec's to decide (a worker's `Connection` or `Transfer-Encoding` describe its connection to
//! anteroom, not the client's).

use std::cell::RefCell;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{CONTENT_LENGTH, DATE};
use http::{HeaderMap, StatusCode, Version};

/// How the response body is delimited on the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Length(u64),
    Chunked,
    /// Until the connection closes: an HTTP/1.0 client and a body of unknown length.
    Close,
    /// No body is sent (HEAD, 1xx, 204, 304); `length` is the one the response declares, if any, which
    /// HEAD and 304 repeat.
    NoBody {
        length: Option<u64>,
    },
}

/// Writes the head of a response to a request of `version` into `out`.
pub fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    framing: BodyFraming,
    version: Version,
    keep_alive: bool,
    out: &mut Vec<u8>,
) {
    let reason = status.canonical_reason().unwrap_or("Unknown");
    // Writes into a Vec cannot fail.
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_u16());
    for (name, value) in headers {
        if name == CONTENT_LENGTH || is_connection_header(name.as_str()) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(DATE) {
        out.extend_from_slice(b"date: ");
        with_date(|d| out.extend_from_slice(d.as_bytes()));
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        BodyFraming::Length(n) | BodyFraming::NoBody { length: Some(n) } => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyFraming::Close | BodyFraming::NoBody { length: None } => {}
    }
    if !keep_alive || framing == BodyFraming::Close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The hop-by-hop headers of a response that the codec writes itself or drops.
fn is_connection_header(name: &str) -> bool {
    super::HOP_BY_HOP.contains(&name)
}

/// The `Date` value, formatted once a second per thread.
fn with_date(f: impl FnOnce(&str)) {
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        f(&c.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(headers: &HeaderMap, framing: BodyFraming, v: Version, keep: bool) -> String {
        let mut out = Vec::new();
        encode_head(StatusCode::OK, headers, framing, v, keep, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_codec_decides_framing_and_connection() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("content-length", HeaderValue::from_static("99"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("date", HeaderValue::from_static("then"));
        let s = head(&h, BodyFraming::Length(5), Version::HTTP_11, true);
        assert_eq!(
            s,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: then\r\ncontent-length: 5\r\n\r\n"
        );
        let s = head(&h, BodyFraming::Close, Version::HTTP_10, true);
        assert!(
            s.ends_with("date: then\r\nconnection: close\r\n\r\n"),
            "{s}"
        );
        let s = head(
            &HeaderMap::new(),
            BodyFraming::Chunked,
            Version::HTTP_10,
            true,
        );
        assert!(s.contains("\r\ndate: "), "{s}");
        assert!(
            s.ends_with("transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"),
            "{s}"
        );
        let s = head(
            &HeaderMap::new(),
            BodyFraming::NoBody { length: Some(7) },
            Version::HTTP_11,
            false,
        );
        assert!(
            s.ends_with("content-length: 7\r\nconnection: close\r\n\r\n"),
            "{s}"
        );
    }
}
