//! The request as it travels from a front to a worker, and the answers anteroom gives on its own.
//!
//! A [`Job`] is a complete request (head and buffered body) plus where it came from and the channel its
//! answer goes back on. Responses that anteroom makes itself (503, 502, 413...) are built here so that they
//! all carry the request id and a `Retry-After` where one makes sense.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, oneshot};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body anteroom sends to a client.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub const REQUEST_ID: &str = "x-request-id";

/// Who sent the request and on which listener.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// None for a unix-socket client.
    pub peer: Option<SocketAddr>,
    /// None for a unix-socket listener.
    pub local: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

pub struct Job {
    pub id: String,
    pub head: RequestHead,
    pub body: Bytes,
    pub origin: Origin,
    pub enqueued: Instant,
    /// Set by the queue when the job is admitted.
    pub reply: Option<oneshot::Sender<Reply>>,
    /// Workers that died holding this request; one death earns an idempotent request one retry.
    pub deaths: u8,
}

impl Job {
    /// Sends the answer to the waiting client; false if it has gone.
    pub fn respond(&mut self, reply: Reply) -> bool {
        match self.reply.take() {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Safe to send again after a worker died on it (RFC 9110 9.2.2).
    pub fn idempotent(&self) -> bool {
        use http::Method;
        matches!(
            self.head.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        )
    }

    pub fn client_gone(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    /// `GET /path?query`, for log lines.
    pub fn summary(&self) -> String {
        format!(
            "{} {}",
            self.head.method,
            self.head.uri.path_and_query().map_or("/", |p| p.as_str())
        )
    }
}

pub type Reply = Response<Body>;

/// A body fed by the worker's task while the client reads it: the worker is released as soon as it has
/// finished writing, however slowly the client reads (as nginx's proxy buffering does).
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Result<Bytes, BoxError>>,
}

pub type BodySender = mpsc::UnboundedSender<Result<Bytes, BoxError>>;

impl ChannelBody {
    pub fn new() -> (BodySender, ChannelBody) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, ChannelBody { rx })
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// A plain-text answer of anteroom's own, naming the request id so that a user's report can be matched
/// with the log.
pub fn error_response(status: StatusCode, id: &str, why: &str) -> Reply {
    let text = format!(
        "{} {}\n{why}\nrequest id: {id}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(REQUEST_ID, v);
    }
    r
}

/// A 503 that tells the client when to come back.
pub fn unavailable(id: &str, why: &str, retry_after: u64) -> Reply {
    let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, id, why);
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// The client's `X-Request-Id` when it is sane (so ids can be followed across hosts), else a new one.
pub fn request_id(headers: &HeaderMap) -> String {
    if let Some(v) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if (1..=128).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return v.to_string();
        }
    }
    format!("{:016x}", fastrand::u64(..))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn job(path: &str) -> Job {
        Job {
            id: "t".into(),
            head: RequestHead {
                method: Method::GET,
                uri: path.parse().unwrap(),
                version: Version::HTTP_11,
                headers: HeaderMap::new(),
            },
            body: Bytes::new(),
            origin: Origin::default(),
            enqueued: Instant::now(),
            reply: None,
            deaths: 0,
        }
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 16);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static("bad id;<script>"));
        assert_ne!(request_id(&h), "bad id;<script>");
    }
}
