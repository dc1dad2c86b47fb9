//! The HTTP/1.x front: accept every connection at once, read each request whole, queue it, relay the answer.
//!
//! hyper does the protocol (keep-alive, HTTP/1.0, chunked bodies, pipelining); this file adds the limits
//! and the hand-off to the queue. A body is read with `--body-timeout` between reads (then 408), into memory
//! or, when large, into a temp file (see [`crate::spill`]); a client that hangs up mid-body is counted as
//! 499, as nginx does, not as a bad request. The request's handler future lives as long as the client's connection: if
//! the client hangs up while its request waits, hyper drops the future, the [`Ticket`] with it, and the
//! request leaves the queue before any worker sees it.
//!
//! [`Ticket`]: crate::queue::Ticket

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;

use super::acceptor::{serve_each, Acceptor, Conn, Refusal};
use super::conns::{ConnHandle, Table};
use super::listen::Listener;
use super::timeout_io::{ArmOnDrop, HeadTimeoutIo};
use crate::config::Config;
use crate::metrics::{Metrics, Rejection};
use crate::quarantine::Quarantine;
use crate::queue::{Queue, Rejected};
use crate::request::{
    client_closed, error_response, request_id, unavailable, ClientClosed, Job, Origin, Reply,
    RequestBody, RequestHead, Timing, WorkerFailed, REQUEST_ID,
};
use crate::spill::BodyWriter;

pub struct Front {
    pub cfg: Arc<Config>,
    pub queue: Arc<Queue>,
    pub quarantine: Arc<Quarantine>,
    pub metrics: Arc<Metrics>,
}

/// Serves HTTP on `listener`: a dedicated thread accepts, each connection is a task tracked by `conns` and
/// counted in `table` (which may close it while it is idle, to make room for a new one).
pub fn start(
    listener: Listener,
    front: Arc<Front>,
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
                    Conn::Tcp(s, peer) => {
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
                    Conn::Unix(s) => {
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

async fn serve_conn<S>(io: S, origin: Origin, front: Arc<Front>, entry: ConnHandle)
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
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
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

async fn handle(req: Request<Incoming>, front: &Front, origin: Origin) -> Reply {
    let started = Instant::now();
    let id = request_id(req.headers());
    let line = front.cfg.access_log.then(|| AccessLine::new(&req, &origin));
    let mut resp = admit(req, front, origin, &id).await;
    account(front, started, &resp);
    if let Some(line) = line {
        line.log(&id, &resp);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Counts an answer in the metrics: served by a worker, refused by anteroom, failed at a worker, or never
/// complete because the client left.
pub fn account(front: &Front, started: Instant, resp: &Reply) {
    let ext = resp.extensions();
    let outcome = if ext.get::<ClientClosed>().is_some() {
        "client_closed"
    } else if let Some(r) = ext.get::<Rejection>() {
        front.metrics.reject(*r);
        "refused"
    } else if ext.get::<WorkerFailed>().is_some() {
        "failed"
    } else {
        "served"
    };
    front
        .metrics
        .answered(outcome, resp.status().as_u16(), started.elapsed());
}

pub fn refused(mut r: Reply, why: Rejection) -> Reply {
    r.extensions_mut().insert(why);
    r
}

async fn admit(req: Request<Incoming>, front: &Front, origin: Origin, id: &str) -> Reply {
    let (parts, body) = req.into_parts();
    let max = front.cfg.max_body_size;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return refused(too_large(id, max), Rejection::BodyTooLarge);
    }
    let body = match read_body(body, declared, front, id).await {
        Ok(b) => b,
        Err(r) => return r,
    };

    let job = Job {
        id: id.to_string(),
        head: RequestHead {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        },
        body,
        origin,
        enqueued: Instant::now(),
        reply: None,
        deaths: 0,
        dispatched: None,
        cgi_params: None,
    };
    dispatch(front, job).await
}

/// Reads the whole body, in memory or into a temp file, allowing `--body-timeout` between two reads.
async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    front: &Front,
    id: &str,
) -> Result<RequestBody, Reply> {
    let cfg = &front.cfg;
    let mut w = BodyWriter::new(crate::spill::settings(), declared);
    loop {
        let frame = match tokio::time::timeout(cfg.body_timeout, body.frame()).await {
            Err(_) => {
                tracing::debug!(%id, received = w.len(), "no body bytes for {:?}: 408", cfg.body_timeout);
                return Err(refused(body_timeout(id), Rejection::BodyTimeout));
            }
            Ok(None) => break,
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) if malformed(&e) => {
                tracing::debug!(%id, "could not read the request body: {e}");
                let r = error_response(
                    StatusCode::BAD_REQUEST,
                    id,
                    "The request body could not be read.",
                );
                return Err(refused(r, Rejection::BadRequest));
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(%id, received = w.len(), "the client left mid-body: {e}");
                return Err(client_closed(id));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not passed on
        };
        if w.len() + data.len() as u64 > cfg.max_body_size {
            return Err(refused(
                too_large(id, cfg.max_body_size),
                Rejection::BodyTooLarge,
            ));
        }
        if let Err(e) = w.push(&data).await {
            return Err(no_temp_file(id, &e));
        }
    }
    w.finish().await.map_err(|e| no_temp_file(id, &e))
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

/// 408 for a body that stalled past --body-timeout; the connection closes after it.
pub fn body_timeout(id: &str) -> Reply {
    let mut r = error_response(
        StatusCode::REQUEST_TIMEOUT,
        id,
        "The request body did not arrive in time.",
    );
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The disk is full (or out of descriptors): the body has nowhere to wait.
pub fn no_temp_file(id: &str, e: &std::io::Error) -> Reply {
    let dir = &crate::spill::settings().dir;
    tracing::warn!(%id, dir = %dir.display(), "cannot write a request body to a temp file: {e}; answered 503");
    refused(
        unavailable(
            id,
            "The server has no room for the request body at the moment.",
            5,
        ),
        Rejection::TempFile,
    )
}

/// Queues a complete request and waits for its answer, or refuses it on purpose. Shared by every front.
pub async fn dispatch(front: &Front, job: Job) -> Reply {
    let id = job.id.clone();
    let id = id.as_str();
    if let Some((fp, left)) = front.quarantine.blocked_job(&job) {
        let r = unavailable(
            id,
            &format!("Requests for {fp} have been crashing workers; they are refused for now."),
            left,
        );
        return refused(r, Rejection::Quarantined);
    }
    let queue = &front.queue;
    let mut ticket = match queue.push(job) {
        Ok(t) => t,
        Err(Rejected::Full) => {
            tracing::debug!(%id, limit = queue.max(), "queue full: refused with 503");
            let r = unavailable(
                id,
                "All workers are busy and the queue is full.",
                queue.retry_after_secs(),
            );
            return refused(r, Rejection::QueueFull);
        }
        Err(Rejected::NoWorkers) => {
            let r = unavailable(
                id,
                "No worker can start at the moment; see the server log.",
                queue.retry_after_secs().max(5),
            );
            return refused(r, Rejection::NoWorkers);
        }
        Err(Rejected::ShuttingDown) => {
            let r = unavailable(id, "The server is shutting down.", 1);
            return refused(r, Rejection::ShuttingDown);
        }
    };
    let answer = tokio::select! {
        r = &mut ticket.reply => r,
        () = tokio::time::sleep(queue.timeout()) => {
            if ticket.withdraw() {
                tracing::debug!(%id, "waited {:?} in the queue: refused with 503", queue.timeout());
                let r = unavailable(
                    id,
                    "No worker became free in time.",
                    queue.retry_after_secs(),
                );
                return refused(r, Rejection::QueueTimeout);
            }
            // A worker took it just now: its answer is coming.
            (&mut ticket.reply).await
        }
    };
    match answer {
        Ok(resp) => resp,
        // The queue dropped it: expired at the moment a worker looked, or anteroom is stopping.
        Err(_) => refused(
            unavailable(
                id,
                "No worker became free in time.",
                queue.retry_after_secs(),
            ),
            Rejection::QueueTimeout,
        ),
    }
}

fn too_large(id: &str, max: u64) -> Reply {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        id,
        &format!("The request body is larger than the limit of {max} bytes."),
    )
}

/// The combined log format, plus the request id, queue wait and worker time.
struct AccessLine {
    remote: String,
    request_line: String,
    referer: String,
    user_agent: String,
}

impl AccessLine {
    fn new(req: &Request<Incoming>, origin: &Origin) -> AccessLine {
        let h = |n: http::header::HeaderName| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .replace('"', "\\\"")
        };
        AccessLine {
            remote: origin
                .peer
                .map_or_else(|| "unix".to_string(), |p| p.ip().to_string()),
            request_line: format!(
                "{} {} {:?}",
                req.method(),
                req.uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .replace('"', "%22"),
                req.version()
            ),
            referer: h(http::header::REFERER),
            user_agent: h(http::header::USER_AGENT),
        }
    }

    fn log(self, id: &str, resp: &Reply) {
        let bytes = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let (queue_ms, worker_ms) = match resp.extensions().get::<Timing>() {
            Some(t) => (
                format!("{:.1}", t.queue_wait.as_secs_f64() * 1e3),
                format!("{:.1}", t.worker.as_secs_f64() * 1e3),
            ),
            None => ("-".into(), "-".into()),
        };
        tracing::info!(
            target: "access",
            "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\" id={id} queue_ms={queue_ms} worker_ms={worker_ms}",
            self.remote,
            crate::request::clf_time(std::time::SystemTime::now()),
            self.request_line,
            resp.status().as_u16(),
            bytes,
            self.referer,
            self.user_agent,
        );
    }
}
