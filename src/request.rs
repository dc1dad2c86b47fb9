//! The request as it travels from a front to a worker, and the answers anteroom gives on its own.
//!
//! A [`Job`] is a complete request (head and body, in memory or in a temp file: see [`crate::spill`]) plus
//! where it came from and the channel its answer goes back on; a front makes it with [`Job::new`] once the
//! request is whole. Responses that anteroom makes itself (503, 502, 413...) are built with
//! [`error_response`] and [`unavailable`] so that they all carry the request id and a `Retry-After` where
//! one makes sense; the refusals at admission are in `admission::refusal`. Every front checks the head with
//! [`RequestHead::check`] (`request/head.rs`: Host, absolute-form targets, CONNECT, hop-by-hop headers,
//! names with `_`) before it makes the `Job`.

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;

// The body types are defined by `spill`, below this module, which makes them.
pub use crate::spill::{Body, BodySender, ChannelBody, RequestBody};

mod head;
pub use head::{is_hop_by_hop, BadHead, HostRule, HOP_BY_HOP};
pub mod origin;
pub use origin::{is_trusted, resolve as resolve_origin, Origin};

pub const REQUEST_ID: &str = "x-request-id";

#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

impl From<http::request::Parts> for RequestHead {
    fn from(p: http::request::Parts) -> RequestHead {
        RequestHead {
            method: p.method,
            uri: p.uri,
            version: p.version,
            headers: p.headers,
        }
    }
}

pub struct Job {
    pub id: String,
    pub head: RequestHead,
    pub body: RequestBody,
    pub origin: Origin,
    pub enqueued: Instant,
    /// Set by the queue when the job is admitted.
    pub reply: Option<oneshot::Sender<Reply>>,
    /// Workers that died holding this request; one death earns an idempotent request one retry.
    pub deaths: u8,
    /// Workers that lived but closed the connection before answering it: a close also earns one retry,
    /// the same one (never two in all), and is no death (it says nothing of the request: `pool/hidden`).
    pub closes: u8,
    /// When a worker took it.
    pub dispatched: Option<Instant>,
    /// For a request that came in over FastCGI: its params as the peer sent them, passed on to FastCGI
    /// workers unchanged (less HTTP_PROXY). `head` is then derived from them.
    pub cgi_params: Option<Vec<(Bytes, Bytes)>>,
}

/// Marks a 502/504 that anteroom gave because a worker failed (for the metrics' outcome).
#[derive(Debug, Clone, Copy)]
pub struct WorkerFailed;

/// Marks the answer to a client that hung up before its request was complete (nginx's 499): its own
/// outcome in the metrics and the access log, not a 400.
#[derive(Debug, Clone, Copy)]
pub struct ClientClosed;

/// Nginx's code for "client closed request"; no response with it ever reaches a client.
pub const CLIENT_CLOSED: u16 = 499;

/// Put on every response a worker produced, for the access log.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub queue_wait: std::time::Duration,
    pub worker: std::time::Duration,
}

impl Job {
    /// A complete request as a front received it, not yet queued: enqueued now, no worker has seen it.
    pub fn new(id: String, head: RequestHead, body: RequestBody, origin: Origin) -> Job {
        Job {
            id,
            head,
            body,
            origin,
            enqueued: Instant::now(),
            reply: None,
            deaths: 0,
            closes: 0,
            dispatched: None,
            cgi_params: None,
        }
    }

    /// The params of a request that came in over FastCGI, to go to FastCGI workers as they came.
    pub fn with_cgi_params(mut self, params: Vec<(Bytes, Bytes)>) -> Job {
        self.cgi_params = Some(params);
        self
    }

    /// Sends the answer to the waiting client; false if it has gone.
    pub fn respond(&mut self, mut reply: Reply) -> bool {
        if let Some(d) = self.dispatched {
            reply.extensions_mut().insert(Timing {
                queue_wait: d.duration_since(self.enqueued),
                worker: d.elapsed(),
            });
        }
        match self.reply.take() {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// The `--ready-probe` request: `GET path` from anteroom itself.
    pub fn probe(path: &str, reply: oneshot::Sender<Reply>) -> Result<Job, http::uri::InvalidUri> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("localhost"));
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("anteroom-ready-probe"),
        );
        let head = RequestHead {
            method: Method::GET,
            uri: path.parse()?,
            version: Version::HTTP_11,
            headers,
        };
        let id = format!("ready-probe-{:08x}", fastrand::u32(..));
        let mut job = Job::new(id, head, RequestBody::default(), Origin::default());
        job.reply = Some(reply);
        Ok(job)
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

    /// The request target, path and query (`/path?query`): for log lines and the status page.
    pub fn target(&self) -> &str {
        self.head.target()
    }

    /// `GET /path?query`, for log lines.
    pub fn summary(&self) -> String {
        format!("{} {}", self.head.method, self.target())
    }
}

pub type Reply = Response<Body>;

impl ChannelBody {
    /// A body fed by the worker's task while the client reads it: the worker is released as soon as it has
    /// finished writing, however slowly the client reads (as nginx's proxy buffering does), and what the
    /// client has not read yet stays within `--response-buffer-size` of memory (the rest is in a temp file).
    pub fn new() -> (BodySender, ChannelBody) {
        crate::spill::channel(crate::spill::settings())
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

/// The answer recorded for a client that hung up mid-request (499, as nginx logs it).
pub fn client_closed(id: &str) -> Reply {
    let status = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = error_response(
        status,
        id,
        "The client closed the connection before its request was complete.",
    );
    r.extensions_mut().insert(ClientClosed);
    r
}

/// A 503 that tells the client when to come back.
pub fn unavailable(id: &str, why: &str, retry_after: u64) -> Reply {
    let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, id, why);
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// The header that tells the application when anteroom received a request (`t=` and microseconds since the
/// epoch), as Heroku's router and nginx's `t=${msec}` do: New Relic, Judoscale and Sentry subtract it from
/// the time the app starts the request to show, and scale on, the time it waited.
pub const REQUEST_START: http::header::HeaderName =
    http::header::HeaderName::from_static("x-request-start");

/// The value of [`REQUEST_START`] for a request whose head arrived at `at`.
pub fn request_start(at: Instant) -> HeaderValue {
    let wall = std::time::SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or_else(std::time::SystemTime::now);
    let micros = wall
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    HeaderValue::from_str(&format!("t={micros}")).unwrap_or(HeaderValue::from_static("t=0"))
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
    new_request_id()
}

/// A fresh request id, for a request that brought none (or none that can be trusted).
pub fn new_request_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

pub use crate::logfmt::clf_time;

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn job(path: &str) -> Job {
        let head = RequestHead {
            method: Method::GET,
            uri: path.parse().unwrap(),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
        };
        Job::new("t".into(), head, RequestBody::default(), Origin::default())
    }

    #[test]
    fn access_log_time() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(971_186_136);
        assert_eq!(clf_time(t), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(
            clf_time(std::time::UNIX_EPOCH),
            "01/Jan/1970:00:00:00 +0000"
        );
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
