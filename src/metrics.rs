//! What anteroom counts, in Prometheus terms. The rooms record into one shared [`Metrics`]; the admin
//! listener encodes it on `GET /metrics` (adding the kernel's listen queues, read at scrape time).

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
    QueueTimeout,
    Quarantined,
    NoWorkers,
    ShuttingDown,
    BodyTooLarge,
    BadRequest,
    /// The request body stalled past --body-timeout (408).
    BodyTimeout,
    /// The request body could not be written to a temp file (503).
    TempFile,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::Quarantined => "quarantined",
            Rejection::NoWorkers => "no_workers",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::BadRequest => "bad_request",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::TempFile => "temp_file",
        }
    }
}

pub struct Metrics {
    pub queue_limit: Gauge,
    pub queue_wait: Histogram,
    pub request_duration: Histogram,
    pub requests: Family<StatusLabels, Counter>,
    pub rejections: Family<ReasonLabels, Counter>,
    pub deaths: Family<CauseLabels, Counter>,
    pub spawns: Counter,
    /// Every open client connection, from accept to close (the connection table's count).
    pub connections: Gauge,
    pub connections_limit: Gauge,
    pub connections_idle_closed: Counter,
    pub connections_refused: Counter,
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
            deaths: Family::default(),
            spawns: Counter::default(),
            connections: Gauge::default(),
            connections_limit: Gauge::default(),
            connections_idle_closed: Counter::default(),
            connections_refused: Counter::default(),
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
            "worker_deaths",
            "Worker processes that ended, by cause (crashed, oom, timeout, retired)",
            m.deaths.clone(),
        );
        registry.register(
            "worker_spawns",
            "Worker processes started",
            m.spawns.clone(),
        );
        registry.register(
            "client_connections",
            "Client connections open now, from accept to close, silent ones included",
            m.connections.clone(),
        );
        registry.register(
            "client_connections_limit",
            "Most client connections open at once (--max-connections, or from RLIMIT_NOFILE)",
            m.connections_limit.clone(),
        );
        registry.register(
            "client_connections_idle_closed",
            "Idle client connections (silent, or kept alive between requests) closed to make room at the limit",
            m.connections_idle_closed.clone(),
        );
        registry.register(
            "client_connections_refused",
            "New client connections refused at the limit because none was idle (HTTP: 503)",
            m.connections_refused.clone(),
        );
        Metrics { registry, ..m }
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

    pub fn answered(&self, outcome: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&StatusLabels { outcome, status })
            .inc();
        self.request_duration.observe(took.as_secs_f64());
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
            out.contains("anteroom_request_duration_seconds_bucket"),
            "{out}"
        );
    }
}
