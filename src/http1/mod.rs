//! anteroom's own HTTP/1.1 codec, on `httparse`: the request head, the chunked body, the response head
//! (`response`, for the fronts' clients), and a worker's response head (`client`, for `worker/http`). Pure
//! functions over bytes, no I/O, so that they can be tested case by case and fuzzed
//! (`fuzz/fuzz_targets/http1_request.rs`, `http1_response.rs`); the connections that drive them are
//! `front/http` and `worker/http`.
//!
//! Why our own and not hyper's: a request waiting in the queue is the product, and hyper keeps fixed 8 KiB
//! buffers per connection from the first byte to the last (about 19 KiB per waiting request, measured). Here
//! the front reads a head into a buffer that starts small and grows only for large heads, turns it into a
//! parsed head, and lets the buffer go: a waiting request holds its head and nothing else.
//!
//! Strict where a lenient reading could let two parsers disagree about where a request ends (request
//! smuggling): one `Content-Length` of digits only, `Transfer-Encoding` exactly `chunked` and never next to
//! a `Content-Length`, chunk sizes of hex digits only with CRLF after every line, no obs-fold, no control
//! bytes, no whitespace before a colon (httparse's defaults). Lenient where RFC 9112 says a recipient may
//! be: empty lines before the request line, a bare LF ending a head line (as hyper and nginx accept; the
//! request is written out again for the worker, so no other parser sees these bytes).

mod chunked;
mod client;
mod request;
mod response;

pub use chunked::{ChunkError, ChunkedDecoder, Step};
pub use client::{
    parse_response, ParsedResponse, ResponseError, ResponseFraming, ResponseHead, MAX_RESPONSE_HEAD,
};
pub use request::{parse_request, Framing, Head, HeadError, Limits, Parsed};
pub use response::{encode_head, BodyFraming};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, and `Proxy-Connection`); they go
/// neither from a client to a worker nor from a worker to a client.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
];

/// HTTP/1.0 or HTTP/1.1, from httparse's minor version (it accepts no other major).
fn version(minor: u8) -> http::Version {
    if minor == 0 {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    }
}

/// The parsed header lines as a map; the error names the part that is not a valid header.
fn header_map(raw: &[httparse::Header<'_>]) -> Result<http::HeaderMap, &'static str> {
    let mut headers = http::HeaderMap::with_capacity(raw.len());
    for h in raw {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "header name")?;
        let value = http::HeaderValue::from_bytes(h.value).map_err(|_| "header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Whether the comma-separated values of `name` hold `token` (case-insensitive).
fn has_token(headers: &http::HeaderMap, name: &http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// What httparse found wrong, in words; `token` names what a bad token is in this kind of head.
fn syntax(e: httparse::Error, token: &'static str) -> &'static str {
    match e {
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status",
        httparse::Error::Token => token,
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "HTTP version",
    }
}

/// A Content-Length value: 1*DIGIT and nothing else (no sign, no spaces, no list), without overflow.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}
