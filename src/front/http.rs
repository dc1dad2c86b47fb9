//! The HTTP/1.x front: accept every connection at once, read each request whole, queue it, relay the answer.
//!
//! hyper does the protocol (keep-alive, HTTP/1.0, chunked bodies, pipelining); this file adds the limits,
//! checks the head as every front does ([`RequestHead::check`]: one Host, valid, the target's authority
//! first, no CONNECT, no hop-by-hop headers nor names with `_` for the worker: 400 or 405 before any worker
//! sees it) and builds the [`Job`]; [`crate::admission`] queues it or refuses it, and ends every request (metrics,
//! access log, request id) as it does for the other fronts. A body is read with `--body-timeout` between
//! reads (then 408), into memory or, when large, into a temp file (see [`crate::spill`]); a client that hangs
//! up mid-body is counted as 499, as nginx does, not as a bad request. The request's handler future lives
//! as long as the client's connection: if the client hangs up while its request waits, hyper drops the
//! future, the [`Ticket`] with it, and the request leaves the queue before any worker sees it.
//!
//! [`Ticket`]: crate::queue::Ticket

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::CONTENT_LENGTH;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::acceptor::{serve_each, Acceptor, ClientStream, Refusal};
use super::conns::{ConnHandle, Table};
use super::listen::Listener;
use super::timeout_io::{ArmOnDrop, HeadTimeoutIo};
use crate::admission::{refusal, Admission};
use crate::config::Config;
use crate::request::{
    client_closed, request_id, request_start, HostRule, Job, Origin, Reply, RequestBody,
    RequestHead, REQUEST_START,
};
use crate::spill::BodyWriter;

/// Serves HTTP on `listener`: a dedicated thread accepts, each connection is a task tracked by `conns` and
/// counted in `table` (which may close it while it is idle, to make room for a new one).
pub fn start(
    listener: Listener,
    front: Arc<Admission>,
    table: Arc<Table>,
    conns: TaskTracker,
) -> std::io::Result<Acceptor> {
    serve_each(
        listener,
        table,
        Refusal::Http503,
        conns,
        move |conn, entry| {
            let front = front.clone();
            async move {
                // No buffers until the client says something: a connection opened ahead of need (browsers,
                // pools, 10,000 idle clients) costs a socket and this small task, not hyper's 8 KiB and more.
                // One that stays silent past the head deadline is closed, as HeadTimeoutIo would; so is one the
                // table closes to make room.
                let limit = front.cfg.header_timeout;
                match conn {
                    ClientStream::Tcp(s, peer) => {
                        tokio::select! {
                            r = tokio::time::timeout(limit, s.readable()) => if !matches!(r, Ok(Ok(()))) {
                                return;
                            },
                            () = entry.closed() => return,
                        }
                        let origin = Origin {
                            peer: Some(peer),
                            local: s.local_addr().ok(),
                        };
                        serve_conn(s, origin, front, entry).await
                    }
                    ClientStream::Unix(s) => {
                        tokio::select! {
                            r = tokio::time::timeout(limit, s.readable()) => if !matches!(r, Ok(Ok(()))) {
                                return;
                            },
                            () = entry.closed() => return,
                        }
                        serve_conn(s, Origin::default(), front, entry).await
                    }
                }
            }
        },
    )
}

async fn serve_conn<S>(io: S, origin: Origin, front: Arc<Admission>, entry: ConnHandle)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = HeadTimeoutIo::new(io, front.cfg.header_timeout).send_timeout(front.cfg.send_timeout);
    let buf_size = front_buf_size(&front.cfg);
    let armed = io.handle();
    let in_table = entry.clone();
    let svc = service_fn(move |req| {
        armed.disarm();
        // Not idle from here until the response has been handed over: the table never closes it meanwhile.
        let in_progress = in_table.request_started();
        let front = front.clone();
        let origin = origin.clone();
        let armed = armed.clone();
        let conn = in_table.clone();
        async move {
            let mut r = handle(req, &front, origin).await;
            // Stopping or upgrading: the client sends its next request on a new connection, to the process
            // that is staying, rather than race the close of this one.
            if conn.draining() {
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            // The next request's head is timed from the moment this response has been written.
            Ok::<_, Infallible>(r.map(|inner| {
                ArmOnDrop {
                    inner: Holding {
                        inner,
                        _guard: in_progress,
                    },
                    arming: armed,
                }
                .boxed_unsync()
            }))
        }
    });
    let mut builder = http1::Builder::new();
    // No hyper timer: the head deadline is HeadTimeoutIo's, which can answer 408.
    builder.keep_alive(true).max_buf_size(buf_size);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!("client connection ended: {e}");
        },
        // Closed by the table while idle: between requests, or before a whole head arrived.
        () = entry.closed() => {}
    }
}

/// A response body that holds `_guard` until hyper has taken all of it (and dropped it).
struct Holding<B, G> {
    inner: B,
    _guard: G,
}

impl<B: http_body::Body + Unpin, G: Unpin> http_body::Body for Holding<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn front_buf_size(cfg: &Config) -> usize {
    cfg.max_header_size.max(8192)
}

async fn handle(req: Request<Incoming>, front: &Admission, origin: Origin) -> Reply {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut head = RequestHead::from(parts);
    // hyper parsed the syntax; what the worker would trust (Host, the target, hop-by-hop headers) is
    // checked here, before the account opens, so that the log shows the head a worker would have seen.
    let checked = head.check(HostRule::Required);
    // Ours, never the client's: an app that autoscales on queue time must not be steered by a client.
    head.headers.insert(REQUEST_START, request_start(started));
    let outcome = front.open(started, request_id(&head.headers), Some((&head, &origin)));
    let resp = match checked {
        Err(why) => outcome
            .span()
            .in_scope(|| refusal::bad_head(outcome.id(), &why)),
        Ok(()) => {
            admit(head, body, front, origin, outcome.id())
                .instrument(outcome.span().clone())
                .await
        }
    };
    outcome.finish(resp)
}

async fn admit(
    head: RequestHead,
    body: Incoming,
    front: &Admission,
    origin: Origin,
    id: &str,
) -> Reply {
    let max = front.cfg.max_body_size;
    let declared = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return refusal::too_large(id, max);
    }
    let body = match read_body(body, declared, front, id).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    front
        .dispatch(Job::new(id.to_string(), head, body, origin))
        .await
}

/// Reads the whole body, in memory or into a temp file, allowing `--body-timeout` between two reads.
async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    front: &Admission,
    id: &str,
) -> Result<RequestBody, Reply> {
    let cfg = &front.cfg;
    let mut w = BodyWriter::new(crate::spill::settings(), declared);
    loop {
        let frame = match tokio::time::timeout(cfg.body_timeout, body.frame()).await {
            Err(_) => {
                tracing::debug!(
                    received = w.len(),
                    "no body bytes for {:?}: 408",
                    cfg.body_timeout
                );
                return Err(refusal::body_timeout(id));
            }
            Ok(None) => break,
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) if malformed(&e) => {
                tracing::debug!("could not read the request body: {e}");
                return Err(refusal::bad_request(
                    id,
                    "The request body could not be read.",
                ));
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(received = w.len(), "the client left mid-body: {e}");
                return Err(client_closed(id));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not passed on
        };
        if w.len() + data.len() as u64 > cfg.max_body_size {
            return Err(refusal::too_large(id, cfg.max_body_size));
        }
        if let Err(e) = w.push(&data).await {
            return Err(refusal::no_temp_file(id, &e));
        }
    }
    w.finish().await.map_err(|e| refusal::no_temp_file(id, &e))
}

/// A body error that is the client's bad encoding (400), not its leaving (499).
fn malformed(e: &hyper::Error) -> bool {
    if e.is_parse() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            );
        }
        cause = c.source();
    }
    false
}
