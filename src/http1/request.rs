//! The request head: bytes in, a parsed head and how its body is framed out, or the reason it is refused.

use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

/// The most header fields a request may have (hyper's limit too).
pub const MAX_HEADERS: usize = 100;

/// What a head may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The whole head, request line to the empty line (`--max-header-size`).
    pub max_head: usize,
}

/// How the body after the head is delimited (RFC 9112 §6.3, for a request: never by closing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither `Content-Length` nor `Transfer-Encoding`: no body.
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// As received, including the hop-by-hop ones: `RequestHead::check` removes those.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The client wants the connection kept after the response (HTTP/1.1 unless `Connection: close`;
    /// HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request with a body: the client waits for a `100 Continue`.
    pub expect_continue: bool,
}

// Returned once per head and taken apart at once: boxing the head would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// The head and its length in bytes; the body (or the next request) starts after it.
    Complete(Head, usize),
}

/// Why a head is refused; [`HeadError::status`] is the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request head is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed request head: {0}")]
    Syntax(&'static str),
    #[error("HTTP version {0}.x is not supported")]
    Version(u8),
    #[error("the request target is not a valid URI")]
    BadTarget,
    #[error("the Content-Length is not one number")]
    BadLength,
    #[error("the request has both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    #[error("the Transfer-Encoding does not end with chunked, once")]
    ChunkedNotLast,
    #[error("the transfer coding {0:?} is not supported")]
    UnknownCoding(String),
    #[error("an HTTP/1.0 request cannot have a Transfer-Encoding")]
    EncodingInHttp10,
}

impl HeadError {
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::Version(_) => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            // RFC 9112 §6.1: a coding the server does not understand is a 501.
            HeadError::UnknownCoding(_) => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Parses the head at the start of `buf`.
pub fn parse_request(buf: &[u8], limits: Limits) -> Result<Parsed, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Err(HeadError::TooLarge(limits.max_head))
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(version_error(buf)),
        Err(e) => return Err(HeadError::Syntax(super::syntax(e, "method or target"))),
    };
    if len > limits.max_head {
        return Err(HeadError::TooLarge(limits.max_head));
    }
    // httparse leaves these None only on a partial parse.
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Syntax("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Syntax("method"))?;
    // RFC 9112 §3.2: no fragment, only the URI's ASCII; `*` for OPTIONS alone. (httparse lets bytes above
    // 0x7f through, and http's Uri would drop a fragment silently.)
    if path.bytes().any(|b| b == b'#' || !b.is_ascii())
        || (path == "*" && method != Method::OPTIONS)
    {
        return Err(HeadError::BadTarget);
    }
    let uri = Uri::try_from(path).map_err(|_| HeadError::BadTarget)?;
    let version = super::version(minor);
    let headers = super::header_map(req.headers).map_err(HeadError::Syntax)?;
    let framing = framing(&headers, version)?;
    let keep_alive = if version == Version::HTTP_11 {
        !super::has_token(&headers, &CONNECTION, "close")
    } else {
        super::has_token(&headers, &CONNECTION, "keep-alive")
    };
    let expect_continue = version == Version::HTTP_11
        && framing != Framing::Empty
        && framing != Framing::Length(0)
        && headers
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let head = Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
    };
    Ok(Parsed::Complete(head, len))
}

/// `HTTP/2.0` and above get a 505; anything else that is not `HTTP/1.0` or `HTTP/1.1` is a bad request.
fn version_error(buf: &[u8]) -> HeadError {
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = buf[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..line_end]);
    match line.rsplit(|&b| b == b' ').next() {
        Some([b'H', b'T', b'T', b'P', b'/', major @ b'2'..=b'9', b'.', b'0'..=b'9']) => {
            HeadError::Version(major - b'0')
        }
        _ => HeadError::Syntax("HTTP version"),
    }
}

/// RFC 9112 §6.1-6.3 for a request, refusing every case where two readers could disagree.
fn framing(headers: &HeaderMap, version: Version) -> Result<Framing, HeadError> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(v), None) => Some(content_length(v.as_bytes())?),
        // Two fields, even equal: a list-form or repeated length is refused rather than reconciled.
        (Some(_), Some(_)) => return Err(HeadError::BadLength),
    };
    let mut codings = Vec::new();
    for v in headers.get_all(TRANSFER_ENCODING) {
        let v = v
            .to_str()
            .map_err(|_| HeadError::Syntax("Transfer-Encoding"))?;
        for c in v.split(',') {
            codings.push(c.trim_matches([' ', '\t']).to_ascii_lowercase());
        }
    }
    if codings.is_empty() {
        return Ok(length.map_or(Framing::Empty, Framing::Length));
    }
    if length.is_some() {
        return Err(HeadError::LengthAndEncoding);
    }
    if version == Version::HTTP_10 {
        return Err(HeadError::EncodingInHttp10);
    }
    let chunked = codings.iter().filter(|c| *c == "chunked").count();
    if chunked != 1 || codings.last().map(String::as_str) != Some("chunked") {
        return Err(HeadError::ChunkedNotLast);
    }
    if let Some(other) = codings.iter().find(|c| *c != "chunked") {
        return Err(HeadError::UnknownCoding(other.clone()));
    }
    Ok(Framing::Chunked)
}

fn content_length(v: &[u8]) -> Result<u64, HeadError> {
    super::digits(v).ok_or(HeadError::BadLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_head: 8192 };

    fn parse(raw: &[u8]) -> Result<Parsed, HeadError> {
        parse_request(raw, LIMITS)
    }

    fn head(raw: &[u8]) -> (Head, usize) {
        match parse(raw) {
            Ok(Parsed::Complete(h, n)) => (h, n),
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn refused(raw: &[u8]) -> StatusCode {
        match parse(raw) {
            Err(e) => e.status(),
            other => panic!("{:?} was accepted: {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn a_simple_head_and_where_it_ends() {
        let raw = b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nnext";
        let (h, n) = head(raw);
        assert_eq!(n, raw.len() - 4);
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri, "/a?b=c");
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers["x-a"], "1");
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
    }

    #[test]
    fn partial_heads_wait_for_more_until_the_limit() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..raw.len() {
            assert!(matches!(parse(&raw[..cut]), Ok(Parsed::Partial)), "{cut}");
        }
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        assert_eq!(refused(&big), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[test]
    fn framing_is_one_length_or_chunked_alone() {
        let ok = |raw: &[u8]| head(raw).0.framing;
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Framing::Chunked
        );
        for bad in [
            "Content-Length: 5\r\nContent-Length: 5",
            "Content-Length: 5, 5",
            "Content-Length: +5",
            "Content-Length: -1",
            "Content-Length: 0x5",
            "Content-Length: 99999999999999999999999",
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: xchunked",
        ] {
            let raw = format!("POST / HTTP/1.1\r\n{bad}\r\n\r\n");
            assert_eq!(refused(raw.as_bytes()), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn syntax_that_could_be_read_two_ways_is_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nX : 1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.10\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
            b"GET /\r\n\r\n",
        ] {
            assert_eq!(
                refused(bad),
                StatusCode::BAD_REQUEST,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            refused(b"GET / HTTP/2.0\r\n\r\n"),
            StatusCode::HTTP_VERSION_NOT_SUPPORTED
        );
    }

    #[test]
    fn connection_and_expect() {
        assert!(
            !head(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            head(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n")
                .0
                .expect_continue
        );
        assert!(
            !head(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n")
                .0
                .expect_continue
        );
    }

    #[test]
    fn empty_lines_before_the_request_line_and_bare_lf_are_accepted() {
        let (h, _) = head(b"\r\nGET /x HTTP/1.1\nHost: a\n\n");
        assert_eq!(h.uri, "/x");
        assert_eq!(h.headers["host"], "a");
    }
}
