//! The client's half of the codec: a worker's response head, read by `worker/http` (the body's chunks go
//! through the same [`ChunkedDecoder`](super::ChunkedDecoder) as a request's).
//!
//! Why our own and not hyper's client: the exchange with an HTTP worker then runs on the slot's task that
//! holds the request, with no connection task, no channel between the two and no `shutdown(2)` before the
//! close, which wakes the worker's process for nothing (measured: hyper's client cost about a third of
//! anteroom's CPU per request towards gunicorn's sync worker).
//!
//! The framing is RFC 9112 §6.3 for a response, as strict as the request's, since the client sees the
//! body anteroom found: no body for a HEAD request, a 1xx, 204 or 304; `Transfer-Encoding` exactly
//! `chunked` (any other coding is refused: anteroom could not re-frame it, and a worker has no reason to
//! send one to a proxy); one `Content-Length` of digits; else the body runs until the worker closes. A
//! response with both, a list or repeated `Content-Length`, a malformed or oversized head is refused:
//! the client gets a 502 rather than a body whose end two readers could disagree on.

use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, StatusCode, Version};

use super::request::MAX_HEADERS;

/// The largest response head (status line to the empty line) a worker may send; nginx's
/// `proxy_buffer_size` is 4 or 8 KiB, a head beyond 64 KiB is a broken worker.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;

/// How the body after a response head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// None at all: a response to HEAD, a 204 or a 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the worker closes the connection (which is then never reused).
    Close,
}

/// A parsed final response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// As received, the hop-by-hop ones included: the caller removes those.
    pub headers: HeaderMap,
    pub framing: ResponseFraming,
    /// The worker keeps the connection after this response: HTTP/1.1 unless `Connection: close`, HTTP/1.0
    /// only with `Connection: keep-alive`, never when the body runs until close.
    pub keep_alive: bool,
}

// Returned once per head and taken apart at once, as the request's `Parsed`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ParsedResponse {
    /// More bytes are needed.
    Partial,
    /// An interim 1xx head of this many bytes, to be skipped: the final head follows it.
    Interim(usize),
    /// The final head and its length in bytes; the body starts after it.
    Complete(ResponseHead, usize),
}

/// What is wrong with a worker's response head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the response head is larger than {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
    #[error("the response has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed response head: {0}")]
    Syntax(&'static str),
    /// 101 Switching Protocols: anteroom asked for no upgrade.
    #[error("status {0} answers no request anteroom sends")]
    Status(u16),
    #[error("the response's Content-Length is not one number")]
    BadLength,
    #[error("the response has both Content-Length and Transfer-Encoding: its length is ambiguous")]
    LengthAndEncoding,
    #[error("the response's Transfer-Encoding {0:?} is not exactly chunked")]
    Coding(String),
    #[error("an HTTP/1.0 response cannot have a Transfer-Encoding")]
    EncodingInHttp10,
}

/// Parses the response head at the start of `buf`, the answer to a request that was a HEAD if `is_head`.
pub fn parse_response(buf: &[u8], is_head: bool) -> Result<ParsedResponse, ResponseError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(ParsedResponse::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooManyHeaders),
        Err(e) => return Err(ResponseError::Syntax(super::syntax(e, "token"))),
    };
    if len > MAX_RESPONSE_HEAD {
        return Err(ResponseError::TooLarge);
    }
    // httparse leaves these None only on a partial parse.
    let (Some(code), Some(minor)) = (resp.code, resp.version) else {
        return Err(ResponseError::Syntax("incomplete status line"));
    };
    let status = StatusCode::from_u16(code).map_err(|_| ResponseError::Syntax("status"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ResponseError::Status(code));
    }
    let version = super::version(minor);
    let headers = super::header_map(resp.headers).map_err(ResponseError::Syntax)?;
    // Checked whatever the status: a worker that frames even a bodiless response ambiguously is broken.
    let declared = framing(&headers, version)?;
    if status.is_informational() {
        return Ok(ParsedResponse::Interim(len));
    }
    let framing =
        if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            ResponseFraming::Empty
        } else {
            declared
        };
    let keep_alive = framing != ResponseFraming::Close
        && if version == Version::HTTP_11 {
            !super::has_token(&headers, &CONNECTION, "close")
        } else {
            super::has_token(&headers, &CONNECTION, "keep-alive")
        };
    let head = ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    };
    Ok(ParsedResponse::Complete(head, len))
}

/// RFC 9112 §6.3 for a response with a body, refusing every case where two readers could disagree.
fn framing(headers: &HeaderMap, version: Version) -> Result<ResponseFraming, ResponseError> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(v), None) => Some(content_length(v.as_bytes())?),
        (Some(_), Some(_)) => return Err(ResponseError::BadLength),
    };
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    let Some(coding) = codings.next() else {
        return Ok(length.map_or(ResponseFraming::Close, ResponseFraming::Length));
    };
    if length.is_some() {
        return Err(ResponseError::LengthAndEncoding);
    }
    if version == Version::HTTP_10 {
        return Err(ResponseError::EncodingInHttp10);
    }
    if codings.next().is_some() || !coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
        let all: Vec<_> = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        return Err(ResponseError::Coding(all.join(", ")));
    }
    Ok(ResponseFraming::Chunked)
}

fn content_length(v: &[u8]) -> Result<u64, ResponseError> {
    super::digits(v).ok_or(ResponseError::BadLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<ParsedResponse, ResponseError> {
        parse_response(raw, false)
    }

    fn head(raw: &[u8]) -> (ResponseHead, usize) {
        match parse(raw) {
            Ok(ParsedResponse::Complete(h, n)) => (h, n),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    fn framing_of(raw: &str) -> ResponseFraming {
        head(raw.as_bytes()).0.framing
    }

    fn refused(raw: &str) -> ResponseError {
        match parse(raw.as_bytes()) {
            Err(e) => e,
            other => panic!("{raw:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn framing_by_rfc_9112() {
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            ResponseFraming::Length(12)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: ChunKed\r\n\r\n"),
            ResponseFraming::Chunked
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\n\r\n"),
            ResponseFraming::Close
        );
        for bodiless in ["204 No Content", "304 Not Modified"] {
            let raw = format!("HTTP/1.1 {bodiless}\r\nContent-Length: 5\r\n\r\n");
            assert_eq!(framing_of(&raw), ResponseFraming::Empty, "{raw}");
        }
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        match parse_response(raw, true) {
            Ok(ParsedResponse::Complete(h, n)) => {
                assert_eq!(h.framing, ResponseFraming::Empty);
                assert_eq!(h.headers[CONTENT_LENGTH], "5");
                assert_eq!(n, raw.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keep_alive_rules() {
        let keep = |raw: &str| head(raw.as_bytes()).0.keep_alive;
        assert!(keep("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nConnection: x, Close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(keep(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        ));
        // Close-delimited: the close is the end of the body.
        assert!(!keep("HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn interim_heads_are_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let Ok(ParsedResponse::Interim(n)) = parse(raw) else {
            panic!()
        };
        assert_eq!(n, 25);
        let Ok(ParsedResponse::Interim(m)) = parse(&raw[n..]) else {
            panic!()
        };
        let (h, _) = head(&raw[n + m..]);
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(
            refused("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
            ResponseError::Status(101)
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                ResponseError::LengthAndEncoding,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                ResponseError::BadLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n",
                ResponseError::BadLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
                ResponseError::BadLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                ResponseError::BadLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                ResponseError::Coding("gzip, chunked".into()),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                ResponseError::Coding("chunked, chunked".into()),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
                ResponseError::Coding("identity".into()),
            ),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                ResponseError::EncodingInHttp10,
            ),
            // Even where no body follows.
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
                ResponseError::LengthAndEncoding,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(refused(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn malformed_heads_are_refused() {
        for raw in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 OK\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX\0: a\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n",
            "ICY 200 OK\r\n\r\n",
        ] {
            assert!(matches!(refused(raw), ResponseError::Syntax(_)), "{raw:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            refused(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
            ResponseError::TooManyHeaders
        );
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_RESPONSE_HEAD));
        assert_eq!(refused(&huge), ResponseError::TooLarge);
        let big = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_RESPONSE_HEAD)
        );
        assert_eq!(refused(&big), ResponseError::TooLarge);
    }

    /// Every prefix of a head is partial (or, for interim heads, the same interim head), whatever the split.
    #[test]
    fn split_at_every_byte() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello";
        let interim = 25;
        for cut in 0..raw.len() {
            let r = parse(&raw[..cut]);
            if cut < interim {
                assert!(matches!(r, Ok(ParsedResponse::Partial)), "{cut}: {r:?}");
            } else {
                assert!(matches!(r, Ok(ParsedResponse::Interim(25))), "{cut}: {r:?}");
            }
        }
        let rest = &raw[interim..];
        let full = rest.len() - 5;
        for cut in 0..full {
            let r = parse(&rest[..cut]);
            assert!(matches!(r, Ok(ParsedResponse::Partial)), "{cut}: {r:?}");
        }
        for cut in full..=rest.len() {
            let (h, n) = head(&rest[..cut]);
            assert_eq!((h.framing, n), (ResponseFraming::Length(5), full));
            assert!(h.keep_alive);
        }
    }
}
