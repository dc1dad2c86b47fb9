//! The admin listener: metrics, status and health, never on the public listeners.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus / OpenMetrics text: the shared registry, plus gauges read at scrape time (queue depth, workers by state, the kernel's accept queue of each public listener, its listen overflow counters). |
//! | `GET /status` | JSON: queue, scoreboard, recent deaths, listeners, kernel counters, request totals and rates. |
//! | `GET /` | The status page (`status.html`, embedded; no external resource) that polls `/status` every second. |
//! | `GET /health/live` | 200 while the process serves. |
//! | `GET /health/ready` | 200 when a request would be served; 503 with the reason otherwise, and from SIGTERM on (`--drain-delay`). |
//!
//! Anything else is 404; a method other than GET or HEAD is 405. The admin listener is small and local:
//! one task per connection, a head-read deadline, and at most [`ADMIN_CONNS`] connections (the oldest idle
//! one is closed for a new one), whose descriptors are kept back from the public listeners so that health
//! checks and metrics answer even while clients hold every connection they may.
//!
//! Running and crashed requests are shown by path only: query strings often carry tokens and passwords.
//! `--status-show-query` shows them whole.
//!
//! `agent` serves HAProxy's agent-check (`--agent`) on a listener of its own, from the same state.

pub mod agent;
mod report;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ListenAddr};
use crate::front::conns::{ConnHandle, Limits, Table, TableMetrics, ADMIN_CONNS};
use crate::front::listen::Listener;
use crate::metrics::Metrics;
use crate::pool::PoolView;
use crate::queue::Queue;
use crate::ratelog::LogLimit;

use report::Sampler;

/// Everything the admin listener reads; all of it is shared with the serving path, read-only here.
pub struct AdminState {
    pub cfg: Arc<Config>,
    pub queue: Arc<Queue>,
    pub pool: PoolView,
    pub metrics: Arc<Metrics>,
    /// The public listeners' connection table.
    pub conns: Arc<Table>,
    /// The public listeners, whose kernel accept queues are reported.
    pub listeners: Vec<ListenAddr>,
    pub started: Instant,
    /// Whether the process is leaving, as balancers should hear it.
    pub phase: Arc<Lifecycle>,
}

/// Where the process is in its life, as a balancer should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// SIGUSR2: a new process is starting on our sockets (back to serving if it fails).
    Upgrading,
    /// SIGTERM: from the start of `--drain-delay` to the end.
    Stopping,
}

/// The process's [`Phase`], set by `app` and read by the health check and the agent.
#[derive(Debug, Default)]
pub struct Lifecycle(AtomicU8);

impl Lifecycle {
    pub fn set(&self, phase: Phase) {
        let v = match phase {
            Phase::Serving => 0,
            Phase::Upgrading => 1,
            Phase::Stopping => 2,
        };
        self.0.store(v, Ordering::Release);
    }

    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Upgrading,
            _ => Phase::Stopping,
        }
    }
}

/// The status page, served on `GET /`.
const STATUS_HTML: &str = include_str!("status.html");
/// How often the request and queue-wait totals are sampled, for the per-second rates of `/status`.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// An admin client slower than this to send its request head is disconnected.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one admin connection's handlers share.
struct Admin {
    state: Arc<AdminState>,
    sampler: Sampler,
}

/// Serves the admin endpoints on `listener` until `stop`.
pub async fn serve(listener: Listener, state: Arc<AdminState>, stop: CancellationToken) {
    let admin = Arc::new(Admin {
        sampler: Sampler::default(),
        state,
    });
    // Samples the totals a few times a second so that /status can say what the last second was like
    // whoever polls it, and however often.
    let sampling = {
        let admin = admin.clone();
        every(SAMPLE_EVERY, stop.clone(), move || {
            admin.sampler.record(report::sample(&admin.state.metrics));
        })
    };
    let table = Table::new("admin", Limits::fixed(ADMIN_CONNS), TableMetrics::default());
    static ACCEPT_FAILED: LogLimit = LogLimit::new(Duration::from_secs(10));
    while let Some(stream) = next_conn(&listener, &stop, "admin", &ACCEPT_FAILED).await {
        // Beyond the bound with nothing idle to close: the connection is just closed.
        let Some(entry) = table.count().and_then(|c| table.admit(c).ok()) else {
            continue;
        };
        match stream {
            Stream::Tcp(s) => tokio::spawn(serve_conn(s, admin.clone(), entry, stop.clone())),
            Stream::Unix(s) => tokio::spawn(serve_conn(s, admin.clone(), entry, stop.clone())),
        };
    }
    let _ = sampling.await;
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// The next connection on `listener`, or None once `stop` is cancelled. A failed accept (out of descriptors,
/// say) is logged as `what`'s, within `log`'s limit, and tried again a little later.
/// Runs `f` every `period` until `stop` (a sampler of the state that the answers average over time).
fn every(
    period: Duration,
    stop: CancellationToken,
    mut f: impl FnMut() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => f(),
            }
        }
    })
}

async fn next_conn(
    listener: &Listener,
    stop: &CancellationToken,
    what: &'static str,
    log: &'static LogLimit,
) -> Option<Stream> {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            a = accept(listener) => a,
        };
        match accepted {
            Ok(s) => return Some(s),
            Err(e) => {
                if let Some(suppressed) = log.check() {
                    tracing::warn!(listener = %listener.local_addr(), suppressed, "{what} accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept(l: &Listener) -> std::io::Result<Stream> {
    match l {
        Listener::Tcp(t) => {
            let (s, _) = t.accept().await?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
        Listener::Unix { listener, .. } => Ok(Stream::Unix(listener.accept().await?.0)),
    }
}

async fn serve_conn<S>(io: S, admin: Arc<Admin>, entry: ConnHandle, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let in_table = entry.clone();
    let svc = service_fn(move |req| {
        let admin = admin.clone();
        // The answer is whole when the handler returns: the request ends with it.
        let in_progress = in_table.request_started();
        async move {
            let r = route(req, &admin).await;
            drop(in_progress);
            Ok::<_, Infallible>(r)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        // Closed to make room for a new admin client while idle.
        () = entry.closed() => Ok(()),
    };
    if let Err(e) = result {
        tracing::debug!("admin connection ended: {e}");
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(req: Request<Incoming>, admin: &Admin) -> Reply {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/" | "/metrics" | "/status" | "/health/live" | "/health/ready"
    );
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let st = &admin.state;
    match path {
        "/" => {
            let mut r = reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(STATUS_HTML.as_bytes()),
            );
            r.headers_mut().insert(
                "content-security-policy",
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src data:",
                ),
            );
            r
        }
        "/health/live" => text(StatusCode::OK, "ok\n"),
        "/health/ready" => match not_ready(st) {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let kernel = kernel_view(st).await;
            match report::metrics_text(st, &kernel) {
                Ok(body) => no_store(reply(StatusCode::OK, OPENMETRICS, body.into())),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode the metrics: {e}\n"),
                ),
            }
        }
        "/status" => {
            let kernel = kernel_view(st).await;
            let now = report::sample(&st.metrics);
            let rates = admin.sampler.rates(&now);
            let body = report::status_json(st, &kernel, &now, &rates, not_ready(st));
            no_store(reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&body).unwrap_or_default().into(),
            ))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Why a request sent now would not be served, if it would not.
fn not_ready(st: &AdminState) -> Option<String> {
    if st.phase.get() == Phase::Stopping {
        return Some("stopping (draining)".into());
    }
    // Derived from every slot's state machine and the queue, in one place (`pool::slot`).
    st.pool.not_ready()
}

/// The kernel's view, read off the async threads: netlink and /proc reads block.
async fn kernel_view(st: &AdminState) -> report::Kernel {
    let listeners = st.listeners.clone();
    tokio::task::spawn_blocking(move || report::Kernel::read(&listeners))
        .await
        .unwrap_or_default()
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    no_store(reply(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.into()),
    ))
}

fn no_store(mut r: Reply) -> Reply {
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
