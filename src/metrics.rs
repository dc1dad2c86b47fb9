//! What anteroom counts, in Prometheus terms. The rooms record into one shared [`Metrics`]; the admin
//! listener encodes it on `GET /metrics` (adding the kernel's listen queues, read at scrape time).
//!
//! prometheus-client's counter families and histograms can be encoded but not read back, and `/status`
//! wants the request totals and the queue wait: those are also kept in [`Totals`], which the same calls
//! update, so that the admin report reads numbers rather than parsing our own Prometheus text.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// served (a worker answered), refused (anteroom answered on purpose), failed (a worker failed),
    /// client_closed (the client left before its request was complete: 499).
    pub outcome: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

/// Why anteroom refused a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    QueueFull,
    /// The client had --max-queue-per-client requests waiting.
    ClientLimit,
    /// In overload mode, the request would have waited longer than --queue-target.
    Overload,
    QueueTimeout,
    Quarantined,
    NoWorkers,
    ShuttingDown,
    BodyTooLarge,
    BadRequest,
    /// A method anteroom does not pass on (CONNECT): 405.
    MethodNotAllowed,
    /// The request body stalled past --body-timeout (408).
    BodyTimeout,
    /// The request head was larger than --max-header-size, or had too many fields (431).
    HeadTooLarge,
    /// The request head did not arrive within --header-timeout (408).
    HeadTimeout,
    /// The request body could not be written to a temp file (503).
    TempFile,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::ClientLimit => "client_limit",
            Rejection::Overload => "overload",
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::Quarantined => "quarantined",
            Rejection::NoWorkers => "no_workers",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::BadRequest => "bad_request",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::HeadTooLarge => "head_too_large",
            Rejection::HeadTimeout => "head_timeout",
            Rejection::TempFile => "temp_file",
        }
    }
}

/// Why a response whose head had gone (or was going) did not reach its client whole: the access log's
/// `end=` field and `anteroom_responses_incomplete_total{reason}` (nginx's `$request_completion` is empty
/// for these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// The body broke off on anteroom's side: the worker died, closed short of its length or last chunk,
    /// or its client aborted it; or the spilled body could not be read back.
    AbortedUpstream,
    /// The client hung up, or its connection failed, before the response was all written (on the FastCGI
    /// front: the peer aborted the request or its connection ended).
    ClientGone,
    /// The client took nothing for `--send-timeout`.
    SendTimeout,
}

impl Incomplete {
    pub fn as_str(self) -> &'static str {
        match self {
            Incomplete::AbortedUpstream => "aborted_upstream",
            Incomplete::ClientGone => "client_gone",
            Incomplete::SendTimeout => "send_timeout",
        }
    }
}

/// What the admin report reads back: the request totals and the queue wait, as numbers.
#[derive(Debug, Default)]
struct Totals {
    /// Requests answered, by (outcome, status), as `anteroom_requests_total`.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// The sum of the queue waits in microseconds, and how many there were.
    wait_sum_us: AtomicU64,
    wait_count: AtomicU64,
}

/// The totals at one moment (see [`Metrics::totals`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TotalsSnapshot {
    /// Requests answered, by (outcome, status).
    pub requests: BTreeMap<(&'static str, u16), u64>,
    /// Sum of the queue waits of the requests a worker took, in seconds.
    pub wait_sum: f64,
    /// How many requests a worker took.
    pub wait_count: u64,
}

pub struct Metrics {
    pub queue_limit: Gauge,
    queue_wait: Histogram,
    pub request_duration: Histogram,
    pub requests: Family<StatusLabels, Counter>,
    pub rejections: Family<ReasonLabels, Counter>,
    incomplete: Family<ReasonLabels, Counter>,
    pub deaths: Family<CauseLabels, Counter>,
    pub spawns: Counter,
    /// Every open client connection, from accept to close (the connection table's count).
    pub connections: Gauge,
    pub connections_limit: Gauge,
    pub connections_idle_closed: Counter,
    pub connections_refused: Counter,
    pub connections_bad_proxy_header: Counter,
    totals: Totals,
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ]
    .into_iter()
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("anteroom");
        let m = Metrics {
            queue_limit: Gauge::default(),
            queue_wait: Histogram::new(latency_buckets()),
            request_duration: Histogram::new(latency_buckets()),
            requests: Family::default(),
            rejections: Family::default(),
            incomplete: Family::default(),
            deaths: Family::default(),
            spawns: Counter::default(),
            connections: Gauge::default(),
            connections_limit: Gauge::default(),
            connections_idle_closed: Counter::default(),
            connections_refused: Counter::default(),
            connections_bad_proxy_header: Counter::default(),
            totals: Totals::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_limit",
            "Most requests that may wait for a worker (--max-queue)",
            m.queue_limit.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time requests waited in the queue before a worker took them",
            m.queue_wait.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a complete request to its response head, queue wait included",
            m.request_duration.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by outcome and HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "rejections",
            "Requests anteroom refused itself, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "responses_incomplete",
            "Responses the client did not get whole, by reason (aborted_upstream, client_gone, send_timeout)",
            m.incomplete.clone(),
        );
        registry.register(
            "worker_deaths",
            "Worker processes that ended, by cause (crashed, oom, timeout, retired)",
            m.deaths.clone(),
        );
        registry.register(
            "worker_spawns",
            "Worker processes started",
            m.spawns.clone(),
        );
        m.register_connections(&mut registry);
        Metrics { registry, ..m }
    }

    /// The client connection table's series.
    fn register_connections(&self, registry: &mut Registry) {
        registry.register(
            "client_connections",
            "Client connections open now, from accept to close, silent ones included",
            self.connections.clone(),
        );
        registry.register(
            "client_connections_limit",
            "Most client connections open at once (--max-connections, or from RLIMIT_NOFILE)",
            self.connections_limit.clone(),
        );
        registry.register(
            "client_connections_idle_closed",
            "Idle client connections (silent, or kept alive between requests) closed to make room at the limit",
            self.connections_idle_closed.clone(),
        );
        registry.register(
            "client_connections_refused",
            "New client connections refused at the limit because none was idle (HTTP: 503)",
            self.connections_refused.clone(),
        );
        registry.register(
            "client_connections_bad_proxy_header",
            "Client connections closed for a missing, malformed or late PROXY protocol header (--proxy-protocol)",
            self.connections_bad_proxy_header.clone(),
        );
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn reject(&self, why: Rejection) {
        self.rejections
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    /// A response that did not reach its client whole (also counted in `requests` by the status sent).
    pub fn incomplete(&self, why: Incomplete) {
        self.incomplete
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn answered(&self, outcome: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&StatusLabels { outcome, status })
            .inc();
        *crate::sync::lock(&self.totals.requests)
            .entry((outcome, status))
            .or_default() += 1;
        self.request_duration.observe(took.as_secs_f64());
    }

    /// A worker took a request that waited `wait` in the queue.
    pub fn queue_waited(&self, wait: Duration) {
        self.queue_wait.observe(wait.as_secs_f64());
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.totals.wait_sum_us.fetch_add(us, Relaxed);
        self.totals.wait_count.fetch_add(1, Relaxed);
    }

    /// The request totals and the queue wait now.
    pub fn totals(&self) -> TotalsSnapshot {
        TotalsSnapshot {
            requests: crate::sync::lock(&self.totals.requests).clone(),
            wait_sum: self.totals.wait_sum_us.load(Relaxed) as f64 / 1e6,
            wait_count: self.totals.wait_count.load(Relaxed),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix() {
        let m = Metrics::new();
        m.reject(Rejection::QueueFull);
        m.answered("served", 200, Duration::from_millis(3));
        m.incomplete(Incomplete::SendTimeout);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, m.registry()).unwrap();
        assert!(
            out.contains("anteroom_rejections_total{reason=\"queue_full\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("anteroom_requests_total{outcome=\"served\",status=\"200\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("anteroom_responses_incomplete_total{reason=\"send_timeout\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("anteroom_request_duration_seconds_bucket"),
            "{out}"
        );
    }

    #[test]
    fn totals_follow_the_counters() {
        let m = Metrics::new();
        m.answered("served", 200, Duration::from_millis(3));
        m.answered("served", 200, Duration::from_millis(3));
        m.answered("failed", 502, Duration::from_millis(3));
        m.queue_waited(Duration::from_millis(10));
        m.queue_waited(Duration::from_millis(30));
        let t = m.totals();
        assert_eq!(t.requests.get(&("served", 200)), Some(&2));
        assert_eq!(t.requests.get(&("failed", 502)), Some(&1));
        assert_eq!(t.wait_count, 2);
        assert!((t.wait_sum - 0.040).abs() < 1e-9, "{}", t.wait_sum);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, m.registry()).unwrap();
        assert!(out.contains("anteroom_queue_wait_seconds_count 2"), "{out}");
    }
}
