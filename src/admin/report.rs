//! What the admin endpoints say: the `/status` document, the gauges `/metrics` adds at scrape time, the
//! kernel's view of the public listeners, and the per-second rates derived from sampled totals.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::AdminState;
use crate::config::ListenAddr;
use crate::front::conns::TableView;
use crate::metrics::Metrics;
use crate::pool::{Death, SlotState, WorkerInfo};
use crate::queue::delay::Mode;

/// The states a scoreboard row can be in; each gets a `anteroom_workers` sample, zero or not.
const WORKER_STATES: [SlotState; 6] = SlotState::ALL;
/// Rates are computed over at least this much time.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Samples older than this are dropped.
const KEEP_SAMPLES: Duration = Duration::from_secs(5);

/// The request totals and queue-wait sums at one moment.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    at: Instant,
    wait_sum: f64,
    wait_count: u64,
    served: u64,
    refused: u64,
    failed: u64,
    by_status: BTreeMap<u16, u64>,
}

/// Reads the totals now.
pub(super) fn sample(metrics: &Metrics) -> Sample {
    let t = metrics.totals();
    let mut s = Sample {
        at: Instant::now(),
        wait_sum: t.wait_sum,
        wait_count: t.wait_count,
        served: 0,
        refused: 0,
        failed: 0,
        by_status: BTreeMap::new(),
    };
    for ((outcome, status), n) in t.requests {
        match outcome {
            "served" => s.served += n,
            "refused" => s.refused += n,
            "failed" => s.failed += n,
            _ => {}
        }
        *s.by_status.entry(status).or_default() += n;
    }
    s
}

/// Recent samples, so that a rate over the last second is at hand whoever asks and whenever.
#[derive(Default)]
pub(super) struct Sampler {
    ring: Mutex<VecDeque<Sample>>,
}

/// What happened over the last second or so.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Rates {
    window_s: Option<f64>,
    served_per_s: Option<f64>,
    refused_per_s: Option<f64>,
    failed_per_s: Option<f64>,
    /// Mean queue wait of the requests a worker took in the window; None if it took none.
    wait_mean_ms: Option<f64>,
}

impl Sampler {
    pub(super) fn record(&self, s: Sample) {
        let mut ring = crate::sync::lock(&self.ring);
        while ring
            .front()
            .is_some_and(|o| s.at.duration_since(o.at) > KEEP_SAMPLES)
        {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    /// Rates from the newest sample at least a second older than `now`.
    pub(super) fn rates(&self, now: &Sample) -> Rates {
        let ring = crate::sync::lock(&self.ring);
        let Some(base) = ring
            .iter()
            .rev()
            .find(|s| now.at.saturating_duration_since(s.at) >= RATE_WINDOW)
        else {
            return Rates::default();
        };
        let secs = now.at.duration_since(base.at).as_secs_f64();
        let per_s = |a: u64, b: u64| Some(a.saturating_sub(b) as f64 / secs);
        let taken = now.wait_count.saturating_sub(base.wait_count);
        Rates {
            window_s: Some(secs),
            served_per_s: per_s(now.served, base.served),
            refused_per_s: per_s(now.refused, base.refused),
            failed_per_s: per_s(now.failed, base.failed),
            wait_mean_ms: (taken > 0)
                .then(|| (now.wait_sum - base.wait_sum).max(0.0) / taken as f64 * 1e3),
        }
    }
}

/// One public listener's kernel accept queue; None where the kernel's dump did not have it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ListenerQueue {
    listen: String,
    /// Connections the kernel completed that anteroom has not accepted yet.
    queued: Option<u32>,
    /// The backlog in effect (after the kernel's clamp to somaxconn).
    backlog: Option<u32>,
}

/// What the kernel says about the public listeners and about listen queues in general.
#[derive(Debug, Clone, Default)]
pub(super) struct Kernel {
    listeners: Vec<ListenerQueue>,
    somaxconn: Option<u32>,
    overflows: Option<u64>,
    drops: Option<u64>,
}

impl Kernel {
    /// Blocks briefly (one netlink round trip per socket kind, two small /proc reads).
    pub(super) fn read(listeners: &[ListenAddr]) -> Kernel {
        static WARNED: AtomicBool = AtomicBool::new(false);
        let sockets = match crate::sockdiag::listening_sockets() {
            Ok(s) => s,
            Err(e) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("cannot read the kernel's listen queues: {e}");
                }
                Vec::new()
            }
        };
        let (overflows, drops) = crate::sockdiag::listen_counters().unzip();
        Kernel {
            listeners: listeners
                .iter()
                .map(|addr| {
                    let found = sockets.iter().find(|s| matches_listener(addr, s));
                    ListenerQueue {
                        listen: addr.to_string(),
                        queued: found.map(|s| s.queued),
                        backlog: found.map(|s| s.backlog),
                    }
                })
                .collect(),
            somaxconn: crate::sockdiag::somaxconn(),
            overflows,
            drops,
        }
    }
}

/// Whether the kernel's socket is this listener. The address is what anteroom bound (a port of 0 is
/// never found: the kernel knows only the port it chose); a unix path is the one given to bind(2).
fn matches_listener(addr: &ListenAddr, s: &crate::sockdiag::ListenSocket) -> bool {
    use crate::sockdiag::Kind;
    match addr {
        ListenAddr::Tcp(sa) => {
            matches!(s.kind, Kind::Tcp | Kind::Tcp6) && s.local == sa.to_string()
        }
        ListenAddr::Unix(p) => s.kind == Kind::Unix && p.to_str() == Some(s.local.as_str()),
    }
}

/// The registry as OpenMetrics text, then the gauges read now, then `# EOF`.
pub(super) fn metrics_text(st: &AdminState, k: &Kernel) -> Result<String, std::fmt::Error> {
    type Labels = Vec<(&'static str, String)>;
    let mut out = String::with_capacity(8192);
    encode_registry(&mut out, st.metrics.registry())?;

    let mut now = Registry::with_prefix("anteroom");
    let depth: Gauge = Gauge::default();
    depth.set(st.queue.len() as i64);
    now.register("queue_depth", "Requests waiting for a worker now", depth);
    let clients: Gauge = Gauge::default();
    clients.set(st.queue.clients() as i64);
    now.register(
        "queue_clients",
        "Distinct clients (IP addresses) with requests waiting now; they are served in turns",
        clients,
    );
    delay_gauges(&mut now, st);
    // Every connection and request is a task: a leak shows here first.
    let tasks: Gauge = Gauge::default();
    tasks.set(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as i64,
    );
    now.register("runtime_tasks", "Tasks alive in anteroom's runtime", tasks);
    let idle: Gauge = Gauge::default();
    idle.set(st.conns.view().idle as i64);
    now.register(
        "client_connections_idle",
        "Client connections open with no request in progress (silent, or kept alive between requests)",
        idle,
    );

    let workers = Family::<Labels, Gauge>::default();
    for state in WORKER_STATES {
        workers
            .get_or_create(&vec![("state", state.to_string())])
            .set(0);
    }
    for w in st.pool.scoreboard() {
        workers
            .get_or_create(&vec![("state", w.state.to_string())])
            .inc();
    }
    now.register(
        "workers",
        "Worker slots by state (idle, busy, starting, backoff, stopping, exited)",
        workers,
    );

    kernel_gauges(&mut now, k);
    encode_registry(&mut out, &now)?;
    encode_eof(&mut out)?;
    Ok(out)
}

/// The controlled delay's mode and its transitions (none of it while `--queue-target` is 0).
fn delay_gauges(now: &mut Registry, st: &AdminState) {
    type Labels = Vec<(&'static str, String)>;
    let Some((mode, _, entered, left)) = st.queue.delay_status() else {
        return;
    };
    let modes = Family::<Labels, Gauge>::default();
    for m in [Mode::Normal, Mode::Overload] {
        modes
            .get_or_create(&vec![("mode", m.as_str().to_string())])
            .set(i64::from(m == mode));
    }
    now.register(
        "queue_mode",
        "1 for the queue's mode now: normal, or overload (requests that would wait over --queue-target are refused)",
        modes,
    );
    let transitions = Family::<Labels, Counter>::default();
    for (to, n) in [(Mode::Overload, entered), (Mode::Normal, left)] {
        transitions
            .get_or_create(&vec![("to", to.as_str().to_string())])
            .inc_by(n);
    }
    now.register(
        "queue_mode_transitions",
        "Times the queue entered overload mode (to=overload) and left it (to=normal)",
        transitions,
    );
}

/// The kernel's listen queues of the public listeners, somaxconn and the listen drop counters.
fn kernel_gauges(now: &mut Registry, k: &Kernel) {
    type Labels = Vec<(&'static str, String)>;
    let queued = Family::<Labels, Gauge>::default();
    let backlog = Family::<Labels, Gauge>::default();
    for l in &k.listeners {
        let labels = vec![("listener", l.listen.clone())];
        if let (Some(q), Some(b)) = (l.queued, l.backlog) {
            queued.get_or_create(&labels).set(i64::from(q));
            backlog.get_or_create(&labels).set(i64::from(b));
        }
    }
    now.register(
        "listen_queue",
        "Connections in the kernel's accept queue of each public listener, not yet accepted",
        queued,
    );
    now.register(
        "listen_backlog",
        "Backlog in effect of each public listener (after the clamp to net.core.somaxconn)",
        backlog,
    );
    if let Some(max) = k.somaxconn {
        let g: Gauge = Gauge::default();
        g.set(i64::from(max));
        now.register(
            "kernel_somaxconn",
            "net.core.somaxconn: the largest listen backlog the kernel grants",
            g,
        );
    }
    if let Some(n) = k.overflows {
        now.register(
            "kernel_listen_overflows",
            "TCP connections the kernel dropped because an accept queue was full (ListenOverflows, whole machine)",
            ConstCounter::new(n),
        );
    }
    if let Some(n) = k.drops {
        now.register(
            "kernel_listen_drops",
            "TCP connections the kernel dropped while listening, for any reason (ListenDrops, whole machine)",
            ConstCounter::new(n),
        );
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Status {
    version: &'static str,
    pid: u32,
    /// Seconds since the Unix epoch, as the deaths' `at`.
    now: f64,
    uptime_s: f64,
    ready: bool,
    /// Why not, when not ready.
    not_ready: Option<String>,
    app: App,
    queue: QueueStatus,
    requests: Requests,
    workers: Vec<WorkerInfo>,
    /// `--slowlog-timeout`, in seconds; null when off.
    slowlog_timeout_s: Option<f64>,
    /// The requests a worker has held longer than that, longest first.
    slow_requests: Vec<SlowRunning>,
    /// Newest first.
    deaths: Vec<Death>,
    listeners: Vec<ListenerQueue>,
    /// The public listeners' connection table.
    connections: TableView,
    kernel: KernelStatus,
}

/// A request running longer than `--slowlog-timeout`.
#[derive(Debug, Serialize)]
struct SlowRunning {
    slot: usize,
    pid: u32,
    request_id: Option<String>,
    request: Option<String>,
    running_ms: u64,
}

#[derive(Debug, Serialize)]
struct App {
    command: String,
    protocol: String,
    workers: usize,
}

#[derive(Debug, Serialize)]
struct QueueStatus {
    depth: usize,
    limit: usize,
    /// Distinct clients with requests waiting, served in turns.
    clients: usize,
    /// `--max-queue-per-client`; 0 for none.
    per_client_limit: usize,
    timeout_s: f64,
    /// The controlled delay: "normal", "overload", or "off" (`--queue-target 0`).
    mode: &'static str,
    /// `--queue-target` and `--queue-interval`; null when off.
    target_s: Option<f64>,
    interval_s: Option<f64>,
    /// Times the queue entered overload mode.
    overloads: u64,
    /// Mean wait of the requests a worker took over the last `window_s`; null if it took none.
    wait_mean_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Requests {
    /// A worker answered.
    served: u64,
    /// anteroom answered on purpose (queue full, queue timeout, quarantine, ...).
    refused: u64,
    /// A worker failed (502, 504).
    failed: u64,
    by_status: BTreeMap<u16, u64>,
    /// The window the rates below (and `queue.wait_mean_ms`) cover, about a second.
    window_s: Option<f64>,
    served_per_s: Option<f64>,
    refused_per_s: Option<f64>,
    failed_per_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct KernelStatus {
    somaxconn: Option<u32>,
    listen_overflows: Option<u64>,
    listen_drops: Option<u64>,
}

pub(super) fn status_json(
    st: &AdminState,
    k: &Kernel,
    now: &Sample,
    rates: &Rates,
    not_ready: Option<String>,
) -> Status {
    let mut deaths = st.pool.recent_deaths();
    deaths.reverse();
    let mut workers = st.pool.scoreboard();
    if !st.cfg.status_show_query {
        for w in &mut workers {
            if let Some(r) = &mut w.request {
                strip_query(r);
            }
        }
        for d in &mut deaths {
            if let Some(r) = &mut d.request {
                strip_query(&mut r.target);
            }
        }
    }
    let slow_requests = slow_requests(&workers);
    let round = |x: Option<f64>| x.map(|v| (v * 1000.0).round() / 1000.0);
    let delay = st.queue.delay_status();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        now: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        uptime_s: (st.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        ready: not_ready.is_none(),
        not_ready,
        app: App {
            command: if st.cfg.command.is_empty() {
                "(built-in demo app)".into()
            } else {
                st.cfg.command.join(" ")
            },
            protocol: st.cfg.worker_protocol.to_string(),
            workers: st.cfg.workers,
        },
        queue: QueueStatus {
            depth: st.queue.len(),
            limit: st.queue.max(),
            clients: st.queue.clients(),
            per_client_limit: st.queue.per_client(),
            timeout_s: st.queue.timeout().as_secs_f64(),
            mode: delay.map_or("off", |(m, ..)| m.as_str()),
            target_s: delay.map(|(_, d, ..)| d.target.as_secs_f64()),
            interval_s: delay.map(|(_, d, ..)| d.interval.as_secs_f64()),
            overloads: delay.map_or(0, |(_, _, entered, _)| entered),
            wait_mean_ms: round(rates.wait_mean_ms),
        },
        requests: Requests {
            served: now.served,
            refused: now.refused,
            failed: now.failed,
            by_status: now.by_status.clone(),
            window_s: round(rates.window_s),
            served_per_s: round(rates.served_per_s),
            refused_per_s: round(rates.refused_per_s),
            failed_per_s: round(rates.failed_per_s),
        },
        workers,
        slowlog_timeout_s: st.cfg.slowlog_timeout.map(|d| d.as_secs_f64()),
        slow_requests,
        deaths,
        listeners: k.listeners.clone(),
        connections: st.conns.view(),
        kernel: KernelStatus {
            somaxconn: k.somaxconn,
            listen_overflows: k.overflows,
            listen_drops: k.drops,
        },
    }
}

/// The requests running longer than `--slowlog-timeout`, longest first.
fn slow_requests(workers: &[WorkerInfo]) -> Vec<SlowRunning> {
    let mut slow: Vec<SlowRunning> = workers
        .iter()
        .filter(|w| w.slow)
        .map(|w| SlowRunning {
            slot: w.slot,
            pid: w.pid,
            request_id: w.request_id.clone(),
            request: w.request.clone(),
            running_ms: w.state_ms,
        })
        .collect();
    slow.sort_by_key(|r| std::cmp::Reverse(r.running_ms));
    slow
}

/// Cuts a request target (or "METHOD target") at its query string: queries carry tokens and passwords.
fn strip_query(target: &mut String) {
    if let Some(i) = target.find('?') {
        target.truncate(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_cut() {
        let mut t = "GET /login?user=a&password=secret".to_string();
        strip_query(&mut t);
        assert_eq!(t, "GET /login");
        let mut t = "/plain".to_string();
        strip_query(&mut t);
        assert_eq!(t, "/plain");
    }

    #[test]
    fn requests_are_summed_from_the_totals() {
        let m = Metrics::new();
        m.answered("served", 200, Duration::from_millis(1));
        m.answered("served", 200, Duration::from_millis(1));
        m.answered("served", 404, Duration::from_millis(1));
        m.answered("refused", 503, Duration::from_millis(1));
        m.answered("failed", 502, Duration::from_millis(1));
        let s = sample(&m);
        assert_eq!((s.served, s.refused, s.failed), (3, 1, 1));
        assert_eq!(s.by_status.get(&200), Some(&2));
        assert_eq!(s.by_status.get(&503), Some(&1));
    }

    #[test]
    fn rates_need_a_second_of_history() {
        let m = Metrics::new();
        let sampler = Sampler::default();
        let mut old = sample(&m);
        old.at -= Duration::from_secs(2);
        sampler.record(old);
        let mut recent = sample(&m);
        recent.at -= Duration::from_millis(300);
        sampler.record(recent);
        for _ in 0..10 {
            m.answered("served", 200, Duration::from_millis(1));
        }
        m.queue_waited(Duration::from_millis(10));
        m.queue_waited(Duration::from_millis(30));
        let r = sampler.rates(&sample(&m));
        let secs = r.window_s.unwrap();
        assert!((1.9..2.5).contains(&secs), "{secs}");
        assert!((r.served_per_s.unwrap() - 10.0 / secs).abs() < 1e-9);
        assert!((r.wait_mean_ms.unwrap() - 20.0).abs() < 1e-6);

        let empty = Sampler::default();
        assert!(empty.rates(&sample(&m)).served_per_s.is_none());
    }
}
