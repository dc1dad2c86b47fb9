//! The HTTP client side: one request at a time to a worker that speaks HTTP/1.1 (gunicorn and the like).
//!
//! The request body goes out with its length, a chunk at a time from memory or from its temp file. A large
//! or unsized response streams through a [`ChannelBody`], which spills what the client has not read beyond
//! `--response-buffer-size` to a temp file.

use std::path::Path;

use http::header::{HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::{BadResponse, Progress, WorkerError};
use crate::cgi::is_hop_by_hop;
use crate::request::{ChannelBody, Job, REQUEST_ID};
use crate::spill::BodyStream;

pub struct HttpConn {
    sender: SendRequest<BodyStream>,
    /// False once the worker said it closes the connection after its response (`Connection: close`, as
    /// gunicorn's sync worker does on every one, or HTTP/1.0 without keep-alive): reusing it would race
    /// the worker's close and could lose the next request.
    keep: bool,
}

impl HttpConn {
    pub async fn connect(path: &Path) -> Result<HttpConn, WorkerError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(WorkerError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| WorkerError::Connect(std::io::Error::other(e)))?;
        // The connection task ends when the worker closes the socket or the sender is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn { sender, keep: true })
    }

    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    pub fn keep(&self) -> bool {
        self.keep
    }

    pub async fn serve(
        &mut self,
        job: &mut Job,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        let req = build_request(job)?;
        progress.sent_bytes = job.body.len() as u64;
        // Not ready means the connection is already closed: nothing was written.
        self.sender
            .ready()
            .await
            .map_err(|e| WorkerError::NotDelivered(std::io::Error::other(e)))?;
        let reply = &mut job.reply;
        let gone = async {
            match reply {
                Some(r) => r.closed().await,
                None => std::future::pending().await,
            }
        };
        let sent = tokio::select! {
            r = self.sender.try_send_request(req) => r,
            // Dropping the connection is how an HTTP worker learns that nobody waits any more.
            () = gone => return Err(WorkerError::ClientGone),
        };
        let resp = sent.map_err(|mut e| {
            let not_written = e.take_message().is_some();
            let e = e.into_error();
            if not_written || broken_pipe(&e) {
                // Handed back unwritten, or the first write found the worker's end already closed.
                WorkerError::NotDelivered(std::io::Error::other(e))
            } else if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
                WorkerError::Closed
            } else if e.is_parse() {
                WorkerError::Protocol(BadResponse::Http(e))
            } else {
                WorkerError::Io(std::io::Error::other(e))
            }
        })?;
        let (mut parts, incoming) = resp.into_parts();
        if parts.headers.contains_key(CONTENT_LENGTH)
            && parts.headers.contains_key(TRANSFER_ENCODING)
        {
            // Nothing of it goes to the client (a 502 does), and the connection is not reused: its body
            // is unread and the worker's framing is in doubt.
            return Err(WorkerError::Protocol(BadResponse::LengthAndEncoding));
        }
        self.keep = keeps_alive(&parts);
        let hop: Vec<_> = parts
            .headers
            .keys()
            .filter(|n| is_hop_by_hop(n))
            .cloned()
            .collect();
        for n in hop {
            parts.headers.remove(n);
        }
        parts.version = Version::HTTP_11;
        // A small body of known length is read whole and sent in one piece: one hand-off to the client's
        // task instead of one per frame, which is most of what a proxy adds to a short request's latency.
        let small = incoming
            .size_hint()
            .exact()
            .is_some_and(|n| n <= super::WHOLE_BODY as u64);
        if small {
            let body = incoming.collect().await.map_err(|e| {
                if e.is_incomplete_message() {
                    WorkerError::Closed
                } else {
                    WorkerError::Protocol(BadResponse::Http(e))
                }
            })?;
            let body = body.to_bytes();
            progress.received_bytes += body.len() as u64;
            let body = crate::spill::whole(crate::spill::settings(), body).await;
            job.respond(Response::from_parts(parts, body));
            progress.head_sent = true;
            return Ok(());
        }
        relay(parts, incoming, job, progress).await
    }
}

/// A large or unsized body: the head goes to the client now, the body follows through a channel (which
/// spills what the client has not read) frame by frame.
async fn relay(
    parts: http::response::Parts,
    mut incoming: hyper::body::Incoming,
    job: &mut Job,
    progress: &mut Progress,
) -> Result<(), WorkerError> {
    let (mut tx, body) = ChannelBody::new();
    job.respond(Response::from_parts(parts, body.boxed_unsync()));
    progress.head_sent = true;
    loop {
        let frame = tokio::select! {
            f = incoming.frame() => f,
            () = tx.closed() => return Err(WorkerError::ClientGone),
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                tx.fail("the worker's response was cut short");
                return Err(if e.is_incomplete_message() {
                    WorkerError::Closed
                } else {
                    WorkerError::Protocol(BadResponse::Http(e))
                });
            }
        };
        if let Ok(data) = frame.into_data() {
            progress.received_bytes += data.len() as u64;
            tx.send(data).await;
        }
    }
    tx.finish();
    Ok(())
}

/// Whether the worker keeps the connection open after this response (RFC 9112 9.3).
fn keeps_alive(parts: &http::response::Parts) -> bool {
    let tokens = |t: &str| {
        parts
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|x| x.trim().eq_ignore_ascii_case(t))
    };
    if parts.version == Version::HTTP_10 {
        tokens("keep-alive")
    } else {
        !tokens("close")
    }
}

/// The write failed with EPIPE: the worker had closed its end before our first byte, so it read nothing.
fn broken_pipe(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::BrokenPipe;
        }
        source = s.source();
    }
    false
}

fn build_request(job: &Job) -> Result<Request<BodyStream>, WorkerError> {
    let head = &job.head;
    let mut req = Request::new(job.body.stream());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|e: http::uri::InvalidUri| BadResponse::Request(Box::new(e)))?;
    let h = req.headers_mut();
    // The fronts have removed hop-by-hop headers and names with `_` (`RequestHead::check`); this holds for
    // any `Job`, as `cgi::params` does for FastCGI workers.
    for (name, value) in head.headers.iter() {
        let forwarded = !is_hop_by_hop(name) && !name.as_str().contains('_');
        if forwarded && name != CONTENT_LENGTH && name != REQUEST_ID {
            h.append(name.clone(), value.clone());
        }
    }
    if !h.contains_key(HOST) {
        // HTTP/1.0 clients may send none; HTTP/1.1 requires one towards the worker.
        h.insert(HOST, HeaderValue::from_static("localhost"));
    }
    if !job.body.is_empty() || head.headers.contains_key(CONTENT_LENGTH) {
        h.insert(CONTENT_LENGTH, HeaderValue::from(job.body.len()));
    }
    if let Ok(v) = HeaderValue::from_str(&job.id) {
        h.insert(REQUEST_ID, v);
    }
    // The peer that connected, as any proxy appends it: the worker's own trusted-proxy rules then decide.
    if let Some(peer) = job.origin.hop() {
        let ip = peer.ip().to_string();
        let xff = match head
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
    }
    Ok(req)
}
